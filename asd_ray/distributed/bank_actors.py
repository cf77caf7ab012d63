"""The bank actors: one named Ray actor per machine type (``bank:<machine>`` in one namespace; replicas
``bank:<machine>#i``) holding whatever detector was saved there (``load_detector``: a clip k-NN bank, a
local-feature bank, an AE ...) and nothing more (SPEC §4, §8).

Ray restarts a dead one (``max_restarts``), which reloads its bank from storage, and retries the calls that were
in flight (``max_task_retries``), so no request is lost. ``add()`` persists before it returns, so a restarted
actor serves what it had. Also where the saved banks of a fleet are listed and checked before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from asd_ray.bank.memory_bank import BankError
from asd_ray.bank.saved import PREPROCESS_RECORD
from asd_ray.detectors import bank_version, check_bank_folder, configure_detector, frame_settings, load_detector


def actor_name(machine: str, replica: int = 0) -> str:
    return f"bank:{machine}" if replica == 0 else f"bank:{machine}#{replica}"


class BankActor:
    """One machine's saved detector as a Ray actor; ``__init__`` (also after a restart) loads it from ``bank_dir``."""

    def __init__(self, machine: str, bank_dir: str, faiss_threads: int = 1, persist: bool = True,
                 settings: dict[str, Any] | None = None):
        self.machine = machine
        self.bank_dir = Path(bank_dir)
        self.persist = persist  # one replica writes the shared bank_dir; the others only apply the same add
        self.bank = load_detector(self.bank_dir, faiss_threads=faiss_threads)
        self.requested = dict(settings or {})  # score-time settings given in the config (``SCORE_SETTINGS`` keys)
        self.settings = configure_detector(self.bank, self.requested)
        self.version = bank_version(self.bank_dir)
        self.pid = os.getpid()

    def score(self, features: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(m x dim) float32 clip embeddings, or m (T x n_mels) log-mel matrices -> (m,) raw scores, exactly
        the saved detector's ``score``."""
        return self.bank.score(features)

    def loo_scores(self) -> np.ndarray:
        return self.bank.loo_scores()

    def add(self, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> dict:
        """Append normals (first-shot calibration) and persist; ids already in the bank are skipped,
        so a call retried after a restart does not add twice. Only clip k-NN banks take added normals.
        Returns ``stats()`` and ``added``, how many were new."""
        added = self.bank.add_normals(embeddings, ids, domain)
        if added and self.persist:
            self._save()
        return {**self.stats(), "added": added}

    def _save(self) -> None:
        tmp, old = self.bank_dir.with_name(self.bank_dir.name + ".new"), self.bank_dir.with_name(self.bank_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.bank.save(tmp)
        # how its clips were pre-processed stays with the bank
        if (self.bank_dir / PREPROCESS_RECORD).is_file():
            shutil.copy2(self.bank_dir / PREPROCESS_RECORD, tmp / PREPROCESS_RECORD)
        shutil.rmtree(old, ignore_errors=True)
        self.bank_dir.rename(old)
        tmp.rename(self.bank_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.version = bank_version(self.bank_dir)

    def stats(self) -> dict:
        """What the actor serves: the detector's kind, size and dimension, its score-time settings with where
        each came from ({config key: (value, "config" | "saved bank")}), the bank version and the process."""
        return {"machine": self.machine, "kind": self.bank.kind, "features": self.bank.features,
                "size": self.bank.size, "dim": self.bank.dim, "takes_normals": self.bank.takes_normals,
                **{key: self.bank.score_settings().get(key) for key in ("k", "metric")}, "settings": self.settings,
                "requested": self.requested, "version": self.version, "pid": self.pid,
                "bank_dir": str(self.bank_dir)}


def saved_banks(bank_root: str | Path, *, empty_ok: bool = False) -> tuple[Path, list[str]]:
    """(the bank folder, the machines with a bank saved in it, sorted). A missing folder is a FileNotFoundError;
    so are one machine's bank folder (its domain banks would pass for machines named source and target) and,
    unless ``empty_ok``, a folder without a bank (a fleet over it would serve nothing: most often the run's
    folder given for its ``banks/``). Every fleet, serve and stream command lists its banks here."""
    root = Path(bank_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"bank folder not found: {root}")
    if (root / "bank.json").is_file():
        raise FileNotFoundError(f"{root} is one machine's bank: give the folder that holds a folder per machine "
                                f"({root.parent}?)")
    machines = sorted(d.name for d in root.iterdir() if (d / "bank.json").is_file())
    if not machines and not empty_ok:
        inner = root / "banks"
        hint = (f": did you mean {inner}?" if inner.is_dir() and any((d / "bank.json").is_file() for d in inner.iterdir())
                else " (asd-ray run saves them to <out>/banks: a folder per machine holding its bank.json)")
        raise FileNotFoundError(f"no saved bank in {root}{hint}")
    return root, machines


def check_saved_banks(bank_root: str | Path, config) -> tuple[Path, list[str]]:
    """``saved_banks``, then every machine's bank read and checked as a load would (``check_bank_folder``: frame
    detectors against the ``config``'s ``frames.n_mels``, the clips' pre-processing against its ``preprocess``):
    a corrupt or mismatched bank is refused in one line naming its folder and file before Ray starts, not by a
    bank actor or a replica after it."""
    root, machines = saved_banks(bank_root)
    for machine in machines:
        check_bank_folder(root / machine, n_mels=frame_settings(config).get("n_mels"),  # a backbone's frames: none
                          preprocess=dataclasses.asdict(config.preprocess))
    return root, machines


def start_banks(bank_root: str | Path, *, machines: Iterable[str] | None = None, replicas: int = 1,
                namespace: str = "asd-ray", faiss_threads: int = 1,
                settings: dict[str, Any] | None = None, detached: bool = False) -> dict[str, list]:
    """Start (or find) the bank actors of every machine saved under ``bank_root/<machine>``.

    ``settings``: score-time settings given in the config ({``SCORE_SETTINGS`` key: value}); each saved
    detector takes those of its kind and keeps its saved values for the rest (``configure_detector``).
    Actors take no CPU slot (they mostly wait; FAISS threads are set explicitly), restart forever and
    retry their calls. An actor found running with another bank folder or other settings is an error (a
    restart would bring back its own). ``detached``: the actors outlive the process that starts them (a
    service's: Serve replicas come and go, a submitted job's driver ends); else they go with it.
    Returns {machine: [actor handles, replica 0 first]}.
    """
    import ray

    root, found = saved_banks(bank_root)
    wanted = set(machines) if machines is not None else None
    missing = sorted(wanted - set(found)) if wanted else []
    if missing:
        raise FileNotFoundError(f"no saved bank for {missing} under {root} (banks there: {found})")
    remote = ray.remote(BankActor)

    def start(machine: str, r: int):
        return (remote.options(name=actor_name(machine, r), namespace=namespace, get_if_exists=True, num_cpus=0,
                               max_restarts=-1, max_task_retries=-1, max_concurrency=1,
                               lifetime="detached" if detached else None)
                .remote(machine, str(root / machine), faiss_threads, r == 0, dict(settings or {})))

    banks = {machine: [start(machine, r) for r in range(replicas)]
             for machine in found if wanted is None or machine in wanted}
    stats = _started(banks, start, root, namespace)
    for s in stats:
        if s["bank_dir"] != str(root / s["machine"]) or s["requested"] != dict(settings or {}):
            raise BankError(f"{actor_name(s['machine'])} in namespace {namespace!r} already runs {s['bank_dir']} "
                            f"with settings {s['requested']}; asked for {root / s['machine']} with {settings or {}}: "
                            f"use another fleet.namespace, or stop that fleet first")
    return banks


_OUT_OF_SCOPE = "all references to the actor were removed"  # Ray's words for an actor ended with its last handle
_NAME_FREED_S = 10.0


def _started(banks: dict[str, list], start: Callable, root: Path, namespace: str) -> list[dict]:
    """Each bank actor's ``stats`` once it has loaded, or a ``BankError`` with the reason it cannot.

    ``get_if_exists`` can hand back an actor that is being ended because the process that started it dropped its
    last handle (two fleets started one after the other in one driver): Ray keeps its name until it is dead. Such an
    actor is started again once its name is free. Not covered: an actor whose end begins after its ``stats``
    answered (its later calls fail), and a handle got through ``get_if_exists`` does not keep alive an actor that
    another handle started (Ray ties a non-detached actor's life to its creator's handles); ``detached`` fleets
    have neither problem."""
    import ray

    stats = {}
    for (machine, r), ref in [((m, r), a.stats.remote()) for m, actors in banks.items() for r, a in enumerate(actors)]:
        for attempt in range(3):
            try:
                stats[machine, r] = ray.get(ref)
                break
            except ray.exceptions.RayActorError as err:  # a bank that cannot be loaded or take the settings
                if _OUT_OF_SCOPE not in str(err) or attempt == 2:
                    raise BankError(f"a bank actor under {root} could not start: {err}") from None
            _await_name_freed(actor_name(machine, r), namespace)
            banks[machine][r] = start(machine, r)
            ref = banks[machine][r].stats.remote()
    return list(stats.values())


def _await_name_freed(name: str, namespace: str) -> None:
    import ray

    deadline = time.monotonic() + _NAME_FREED_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:  # no live actor holds the name
            return
        time.sleep(0.05)
