"""The detector registry: config name -> class -> config section, and saved kind -> class. No ray here.

The one place that knows the detectors by name (``detector`` in the config): ``make_detector`` builds one from the
config, ``load_detector`` loads a saved one by the ``kind`` in its ``bank.json``, and the questions a run asks
before it builds anything (what a detector eats, whether it takes noise-only clips, how many frames it stacks,
whether it trains a model) are answered from the classes (``bank/base.py``'s ``Detector``), not from names.

The detectors:
- ``knn``: the clip k-NN bank over the backbone's embeddings (``bank/memory_bank.py``, SPEC §4);
- ``pooled``: the clip k-NN bank over a clip's log-mel frames pooled over time (``bank/pooling.py``);
- ``local``: the local-feature bank over windows of log-mel frames (``bank/local_bank.py``);
- ``ae-mse`` / ``ae-maha``: the DCASE AE baseline (``models/autoencoder.py``);
- ``bands``: a pooled bank per group of log-mel bands, combined as a fusion (``sub_bands.py``);
- ``fusion``: several of these on the same features, each z-normalised by its own leave-one-out train
  scores, combined (``fusion.py``).
With ``supplemental.noise_profile``, a frame detector is wrapped in ``NoiseRemovedDetector`` (``noise_removed.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from pathlib import Path
from typing import Any

from asd_ray.bank.base import Detector, DetectorEntry
from asd_ray.bank.saved import check_preprocess, one_line, read_meta
from asd_ray.config import ConfigError, RunConfig
from asd_ray.errors import BankError, BankFolderError

# saved kind -> "module:class", imported when first used (torch only where an AE is built or loaded)
KINDS = {
    "MemoryBank": "asd_ray.bank.memory_bank:MemoryBank",
    "DomainAwareBank": "asd_ray.bank.domain_bank:DomainAwareBank",
    "PooledBank": "asd_ray.bank.pooling:PooledBank",
    "LocalFeatureBank": "asd_ray.bank.local_bank:LocalFeatureBank",
    "AEDetector": "asd_ray.models.autoencoder:AEDetector",
    "FusionDetector": "asd_ray.detectors.fusion:FusionDetector",
    "SubBandDetector": "asd_ray.detectors.sub_bands:SubBandDetector",
    "BandSlice": "asd_ray.detectors.sub_bands:BandSlice",
    "NoiseRemovedDetector": "asd_ray.detectors.noise_removed:NoiseRemovedDetector",
}

# config name -> its class (saved kind), config section and words (``knn``: ``bank.strategy`` picks the class)
ENTRIES = {e.name: e for e in (
    DetectorEntry("knn", "MemoryBank", "bank", "clip k-NN bank over backbone embeddings"),
    DetectorEntry("pooled", "PooledBank", "pooled", "clip k-NN bank over pooled log-mel frames"),
    DetectorEntry("rhythm", "PooledBank", "pooled", "clip k-NN bank over the rhythm of log-mel frames (when events "
                                                  "come, not the spectrum)", {"pooling": "rhythm"}),
    DetectorEntry("bands", "SubBandDetector", "bands", "per-band pooled banks over groups of log-mel bands"),
    DetectorEntry("local", "LocalFeatureBank", "local", "local-feature bank over log-mel windows"),
    DetectorEntry("ae-mse", "AEDetector", "ae", "the DCASE AE baseline, reconstruction MSE", {"score_kind": "mse"}),
    DetectorEntry("ae-maha", "AEDetector", "ae", "the DCASE AE baseline, Mahalanobis distance of the reconstruction "
                                                 "error", {"score_kind": "maha"}),
    DetectorEntry("fusion", "FusionDetector", "fusion", "fusion of detectors on the same features"),
)}
NOISE_REMOVED = "NoiseRemovedDetector"  # the wrapper of every frame detector under ``supplemental.noise_profile``


class Registry:
    """Detectors by config name and by saved kind (``ENTRIES``, ``KINDS``)."""

    def __init__(self, entries: dict[str, DetectorEntry], kinds: dict[str, str]):
        self.entries, self.kinds = entries, kinds

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> DetectorEntry:
        if name not in self.entries:
            raise ConfigError(f"unknown detector {name!r} (known: {', '.join(self.entries)})")
        return self.entries[name]

    def kind(self, kind: str) -> type[Detector]:
        """The class saved as ``kind``."""
        module, cls = self.kinds[kind].split(":")
        return vars(importlib.import_module(module))[cls]

    def cls(self, name: str) -> tuple[type[Detector], DetectorEntry]:
        entry = self.entry(name)
        return self.kind(entry.kind), entry

    def make(self, config: RunConfig, name: str | None = None, *, device: str = "cpu") -> Detector:
        """An unfitted detector called ``name`` (default ``config.detector``), keywords from the config; with
        ``supplemental.noise_profile``, the run's frame detector comes wrapped in ``NoiseRemovedDetector`` (a
        fusion as a whole: its members see the same cleaned frames)."""
        if name is None:
            detector = self.make(config, config.detector, device=device)
            sup = config.supplemental
            if sup.noise_profile and detector.features == "frames":
                return self.kind(NOISE_REMOVED)(detector, floor_db=sup.floor_db, time_quantile=sup.time_quantile,
                                                band_quantile=sup.band_quantile)
            return detector
        cls, entry = self.cls(name)
        return cls.from_config(config, entry, self, device=device)

    def load(self, directory: str | Path, *, faiss_threads: int = 1, device: str = "cpu") -> Detector:
        """Whichever detector was saved in ``directory`` (by the ``kind`` in its ``bank.json``); a fault in its
        files is a ``BankFolderError`` naming the file."""
        kind = read_meta(directory).get("kind")
        if kind not in self.kinds:
            raise BankFolderError(directory, "bank.json", f"unknown detector kind {kind!r} (known: {sorted(self.kinds)})")
        return self.kind(kind).load(directory, faiss_threads=faiss_threads, device=device, registry=self)

    def features(self, config: RunConfig, name: str | None = None) -> str:
        """What detector ``name`` (default ``config.detector``) eats: ``clip`` or ``frames``; nothing is built."""
        cls, entry = self.cls(name or config.detector)
        return cls.features_for(config, entry, self)

    def reads(self, config: RunConfig, name: str) -> set[str]:
        """The config sections and keys detector ``name`` reads (a frame detector: ``supplemental`` too, and over a
        backbone's frames ``embed`` in place of ``frames``)."""
        cls, entry = self.cls(name)
        out = cls.settings_read(config, entry, self)
        if "frames" not in out:
            return out
        if config.embed.backbone != "logmel":
            out = (out - {"frames"}) | {"embed"}
        return out | {"supplemental"}

    def frames_needed(self, config: RunConfig, name: str | None = None) -> int:
        cls, entry = self.cls(name or config.detector)
        return cls.frames_needed(config, entry, self)

    def needs_log_mel(self, config: RunConfig, name: str | None = None) -> bool:
        cls, entry = self.cls(name or config.detector)
        return cls.needs_log_mel(config, entry, self)

    def trains_a_model(self, config: RunConfig, name: str | None = None) -> bool:
        cls, entry = self.cls(name or config.detector)
        return cls.trains_a_model(config, entry, self)

    def describe(self, config: RunConfig, name: str | None = None) -> str:
        cls, entry = self.cls(name or config.detector)
        return cls.describe(config, entry, self)


REGISTRY = Registry(ENTRIES, KINDS)
make_detector = REGISTRY.make
load_detector = REGISTRY.load
detector_features = REGISTRY.features
detector_names = REGISTRY.names


def features_key(config: RunConfig) -> tuple:
    """What a run's features depend on: equal keys, equal features (for sharing them between detectors)."""
    kind = detector_features(config)
    return kind, config.preprocess, config.embed if kind == "clip" or config.embed.backbone != "logmel" else config.frames


def frame_settings(config: RunConfig) -> dict:
    """The keywords of the frames a frame detector eats (``models.backbones.frame_extractor``): ``LogMelFrames``'s
    (``frames`` + the sample rate), or with ``embed.backbone`` a checkpoint, ``EmbedConfig``'s (the backbone's
    frames before pooling)."""
    if config.embed.backbone != "logmel":
        return {k: v for k, v in dataclasses.asdict(config.embed).items() if k not in ("batch_size", "pooling")}
    return {"sample_rate": config.preprocess.sample_rate, **dataclasses.asdict(config.frames)}


def uses_noise(config: RunConfig) -> bool:
    """Whether the run's detector takes the noise-only supplemental clips (so they must be embedded)."""
    return bool(config.supplemental.noise_profile) and detector_features(config) == "frames"


def configure_detector(detector: Detector, settings: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Apply to a loaded detector (and the detectors inside it) the score-time ``settings`` ({config key: value}:
    the ``SCORE_SETTINGS`` keys a user gave) that each takes (its ``score_keys``).

    Returns each score-time setting of the detector as {key: (value in use, "config" or "saved bank")};
    a fusion's members are reported under ``member_<i>.<key>``.
    """
    out: dict[str, tuple[Any, str]] = {}
    for prefix, part in detector.parts():
        out.update({f"{prefix}{k}": v for k, v in configure_detector(part, settings).items()})
    keys = detector.score_keys
    if not keys:
        return out
    detector.configure(**{kw: settings[key] for key, kw in keys.items() if key in settings})
    now = detector.score_settings()
    out.update({key: (now[kw], "config" if key in settings else "saved bank") for key, kw in keys.items()})
    return out


def check_bank_folder(directory: str | Path, *, n_mels: int | None = None, preprocess: dict | None = None) -> None:
    """Refuse a saved detector that cannot be served as it is, before anything starts: its files are read and
    checked as a load does (JSON, format version, kind, fields, FAISS files, calibration arrays, dimensions
    against the indices, members against each other) and, with ``n_mels`` (the ``frames.n_mels`` the clips will
    be turned into), a frame detector's bands against it; with ``preprocess`` (the service's ``PreprocessConfig`` as
    a dict), the pre-processing its clips had (``preprocess.json``). Raises ``BankFolderError(directory, file, what)``."""
    d = Path(directory)
    if preprocess is not None:
        check_preprocess(d, preprocess)
    try:
        detector = load_detector(d)
    except BankFolderError as err:
        raise err.under(d) from None
    except (BankError, ConfigError, ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        raise BankFolderError(d, "", f"cannot be loaded: {type(err).__name__}: {one_line(err)}") from None
    if n_mels is not None and detector.features == "frames" and detector.dim != n_mels:
        raise BankFolderError(d, "bank.json", f"fitted on {detector.dim}-band log-mel frames but frames.n_mels is "
                                              f"{n_mels}: the clips' frames would not fit it (use --set "
                                              f"frames.n_mels={detector.dim}, the value it was fitted with)")


def bank_version(directory: str | Path) -> str:
    """A short digest of every file of a saved detector: equal digests, equal banks (first-shot additions
    change it; a restart that reloads the same files does not)."""
    digest = hashlib.sha1()
    root = Path(directory)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]
