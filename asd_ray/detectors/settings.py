"""Which settings each detector reads, and which a saved one takes at score time. No ray here.

A setting a user gives that the run's detectors do not read is an error naming what applies instead
(``unread_settings``); a saved detector takes only its ``score_keys`` at score time (``SCORE_SETTINGS``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterable, Sequence

from asd_ray.config import RunConfig
from asd_ray.detectors.registry import REGISTRY

# Settings a saved detector takes at score time (the rest is fixed when it is fitted): the ``score_keys`` of the
# detector classes, each applied to the classes that declare it (``configure_detector``).
SCORE_SETTINGS = ("bank.k", "bank.metric", "pooled.k", "fusion.combine", "bands.combine")

# Config sections and keys that describe how a detector is fitted: a saved one keeps what it was fitted with.
FIT_SECTIONS = ("bank", "pooled", "local", "fusion", "bands", "ae", "supplemental")

# Sections some detectors read; the others (preprocess, post, ray ...) belong to every run.
DETECTOR_SECTIONS = ("bank", "embed", "pooled", "local", "ae", "frames", "fusion", "bands", "supplemental")


def given_score_settings(config: RunConfig, given: Iterable[str]) -> dict[str, Any]:
    """The ``SCORE_SETTINGS`` keys among ``given`` (``config.given_keys``) with the config's values."""
    given = set(given)
    return {key: functools.reduce(getattr, key.split("."), config) for key in SCORE_SETTINGS if key in given}


def fit_time_keys(given: Iterable[str]) -> list[str]:
    """The keys among ``given`` that a saved detector cannot take (fixed at fit time)."""
    runtime = {"bank.faiss_threads", "local.faiss_threads"}
    return sorted(k for k in given if (k == "detector" or k.split(".")[0] in FIT_SECTIONS)
                  and k not in SCORE_SETTINGS and k not in runtime)


def settings_read(config: RunConfig, name: str) -> set[str]:
    """The sections and keys that detector ``name`` reads under ``config`` (its class's ``settings_read``; a
    fusion's members too; a frame detector the ``supplemental`` section)."""
    return REGISTRY.reads(config, name)


# Settings of the embedding actors, which a run starts only for clip embeddings by a backbone with weights: log-mel
# frames, and the ``logmel`` backbone's clip embeddings, are computed inside the Ray Data tasks.
ACTOR_SETTINGS = ("ray.embed_actors", "ray.actor_cpus")


def unread_settings(config: RunConfig, given: Iterable[str], names: Sequence[str]) -> list[str]:
    """One line per setting among ``given`` (``config.given_keys``) that none of the detectors ``names`` reads,
    naming the settings of the same name that do apply (``bank.k`` with ``fusion``: ``local.k`` / ``pooled.k``)
    or else the detectors that read it; and the embedding actors' settings when no actor would run."""
    lines = _unread_detector_settings(config, given, names)
    backbone = config.embed.backbone
    if ("embed.trust_remote_code" in given and not any(line.startswith("embed.trust_remote_code ") for line in lines)
            and (backbone == "logmel" or Path(backbone).expanduser().is_file())):
        lines.append(f"embed.trust_remote_code is read only for a checkpoint folder or hub id with its own model "
                     f"code (EAT's Hugging Face folders); backbone {backbone} has none")
    actors = config.embed.backbone != "logmel" and any(REGISTRY.features(config, n) == "clip" for n in names)
    for key in sorted(set(given) & set(ACTOR_SETTINGS)) if not actors else ():
        lines.append(f"{key} is not read by detector {', '.join(names)} with backbone {config.embed.backbone}: no "
                     f"embedding actor runs (frames, and the logmel backbone's clip embeddings, are computed in the Ray "
                     f"Data tasks): use ray.preprocess_cpus")
    return lines


def _unread_detector_settings(config: RunConfig, given: Iterable[str], names: Sequence[str]) -> list[str]:
    read = set().union(*(settings_read(config, n) for n in names))

    def reads(key: str, keys: set[str]) -> bool:
        return key in keys or key.split(".")[0] in keys

    known = [f"{sec}.{f.name}" for sec in DETECTOR_SECTIONS for f in dataclasses.fields(getattr(config, sec))]
    lines = []
    for key in sorted(given):
        if key.split(".")[0] not in DETECTOR_SECTIONS or reads(key, read):
            continue
        leaf = key.split(".")[-1]
        instead = [k for k in known if k.endswith(f".{leaf}") and reads(k, read)]
        readers = [n for n in REGISTRY.names() if reads(key, settings_read(config, n))]
        lines.append(f"{key} is not read by detector {', '.join(names)}: "
                     + (f"use {' / '.join(instead)}" if instead else
                        f"only {', '.join(readers)} read{'s' if len(readers) == 1 else ''} it" if readers else
                        "no detector reads it"))
    return lines
