"""Detectors: a machine's normal train features in, anomaly scores of its clips out. No ray here.

Every detector has one shape (``Detector``): ``fit(features, ids, domains=...)`` on a machine's normal
train clips, ``score(features)`` of any clips (higher: more anomalous), ``loo_scores()`` of train clips
with each clip left out of its own score where the detector can (for thresholds and fusion; ``loo_ids()``
names them), ``save(directory)`` and the class's ``load(directory)``. ``kind`` names the class in the
saved ``bank.json``; ``features`` says what a detector eats: ``clip`` (one embedding per clip from the
backbone, an n x dim array) or ``frames`` (one T x n_mels log-mel matrix per clip, a list).

The detectors (``detector`` in the config):
- ``knn``: the clip k-NN bank over the backbone's embeddings (``bank/memory_bank.py``, SPEC §4);
- ``pooled``: the clip k-NN bank over a clip's log-mel frames pooled over time (``bank/pooling.py``);
- ``local``: the local-feature bank over windows of log-mel frames (``bank/local_bank.py``);
- ``ae-mse`` / ``ae-maha``: the DCASE AE baseline (``models/autoencoder.py``);
- ``fusion``: several of these on the same features, each z-normalised by its own leave-one-out train
  scores, combined (``FusionDetector``).
With ``supplemental.noise_profile``, a frame detector is wrapped in ``NoiseRemovedDetector``: its ``fit`` also
takes the machine's noise-only supplemental clips (``noise=``; detectors that take them say so with
``uses_noise``) and every clip's frames lose that noise profile before the inner detector sees them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from asd_ray.bank.local_bank import LocalFeatureBank
from asd_ray.bank.memory_bank import STRATEGIES, BankError, DomainAwareBank, MemoryBank, _read_meta, _write_meta
from asd_ray.bank.noise import noise_profile, subtract_noise
from asd_ray.bank.pooling import PooledBank
from asd_ray.config import ConfigError, RunConfig


class Detector(Protocol):
    """What every detector offers (see the module docstring)."""

    kind: str
    features: str  # "clip" or "frames"

    @property
    def size(self) -> int: ...  # members of its bank(s), or train clips of a model

    def fit(self, features: Any, ids: Sequence[str] | None = None, *,
            domains: Sequence[str] | None = None) -> "Detector": ...

    def score(self, features: Any) -> np.ndarray: ...

    def loo_scores(self) -> np.ndarray: ...

    def loo_ids(self) -> list[str]: ...

    def save(self, directory: str | Path) -> Path: ...


COMBINE = ("min", "mean", "max")


def znormalise(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(s - mean(reference)) / std(reference): scores in units of a detector's own train-score spread
    (a zero spread counts as 1)."""
    ref = np.asarray(reference, dtype=np.float64)
    sd = float(ref.std())
    return (np.asarray(scores, dtype=np.float64) - float(ref.mean())) / (sd if sd > 0 else 1.0)


def combine(z: np.ndarray, how: str = "mean") -> np.ndarray:
    """(members x m) z-scores -> (m,) by ``min``, ``mean`` or ``max`` over members."""
    if how not in COMBINE:
        raise ValueError(f"fusion combine {how!r}: use one of {COMBINE}")
    return getattr(np.asarray(z, dtype=np.float64), how)(axis=0)


class FusionDetector:
    """Label-free fusion: each member detector's scores z-normalised by its own leave-one-out train scores,
    then combined (``combine``). Members must eat the same features. Its ``loo_scores`` combine the members'
    normalised leave-one-out scores of the train clips every member has scores for."""

    kind = "FusionDetector"

    def __init__(self, members: Sequence[Detector], *, combine: str = "mean"):
        if not members:
            raise ConfigError("fusion needs at least one member detector")
        kinds = {m.features for m in members}
        if len(kinds) != 1:
            raise ConfigError(f"fusion members must eat the same features, got {sorted(kinds)}")
        if combine not in COMBINE:
            raise ConfigError(f"fusion combine {combine!r}: use one of {COMBINE}")
        self.members = list(members)
        self.combine = combine
        self.features = kinds.pop()
        self._references: list[np.ndarray] | None = None  # each member's leave-one-out scores, computed once

    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def dim(self) -> int | None:
        return getattr(self.members[0], "dim", None)

    def fit(self, features, ids=None, *, domains=None) -> "FusionDetector":
        for m in self.members:
            m.fit(features, ids, domains=domains)
        self._references = None
        return self

    def references(self) -> list[np.ndarray]:
        """Each member's leave-one-out train scores (its z-normalisation reference), computed once: a clip
        bank's leave-one-out pass costs far more than scoring one clip."""
        if self._references is None:
            self._references = [m.loo_scores() for m in self.members]
        return self._references

    def score(self, features) -> np.ndarray:
        return combine(np.stack([znormalise(m.score(features), ref)
                                 for m, ref in zip(self.members, self.references())]), self.combine)

    def configure(self, *, combine: str | None = None) -> "FusionDetector":
        """Score-time settings: how member scores combine. The members' normalisation references are
        measured again (a member's own settings may have changed: ``configure_detector``)."""
        if combine is not None:
            if combine not in COMBINE:
                raise ConfigError(f"fusion combine {combine!r}: use one of {COMBINE}")
            self.combine = combine
        self._references = None
        return self

    def score_settings(self) -> dict:
        return {"combine": self.combine}

    def loo_ids(self) -> list[str]:
        common = set.intersection(*(set(m.loo_ids()) for m in self.members))
        return [i for i in self.members[0].loo_ids() if i in common]

    def loo_scores(self) -> np.ndarray:
        ids = self.loo_ids()
        z = []
        for m, ref in zip(self.members, self.references()):
            own = dict(zip(m.loo_ids(), znormalise(ref, ref)))
            z.append([own[i] for i in ids])
        return combine(np.array(z), self.combine)

    def save(self, directory: str | Path) -> Path:
        d = _write_meta(directory, self.kind, combine=self.combine, members=len(self.members))
        for i, m in enumerate(self.members):
            m.save(d / f"member_{i}")
        return d

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> "FusionDetector":
        d = Path(directory)
        meta = _read_meta(d, cls.kind)
        return cls([load_detector(d / f"member_{i}", **kwargs) for i in range(meta["members"])],
                   combine=meta["combine"])


class NoiseRemovedDetector:
    """A frame detector whose clips lose their machine's noise profile first (``bank/noise.py``): ``fit`` takes
    the machine's noise-only clips as ``noise`` (T_i x n_mels dB each); without any, clips pass unchanged (DCASE
    gives supplemental clips for some machines only). Keywords are ``SupplementalConfig``'s."""

    kind = "NoiseRemovedDetector"
    features = "frames"
    uses_noise = True

    def __init__(self, inner: Detector, *, floor_db: float = -13.0, time_quantile: float = 0.1,
                 band_quantile: float = 0.05):
        if inner.features != "frames":
            raise ConfigError(f"supplemental.noise_profile applies to frame detectors, not to {inner.kind}")
        self.inner = inner
        self.params = {"floor_db": floor_db, "time_quantile": time_quantile, "band_quantile": band_quantile}
        self.profile: np.ndarray | None = None  # (n_mels,) dB; None: no noise-only clips, clips unchanged

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def dim(self) -> int | None:
        return getattr(self.inner, "dim", None)

    def transform(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each (T x n_mels) dB clip with the noise profile subtracted (unchanged without a profile)."""
        if self.profile is None:
            return list(clips)
        return [subtract_noise(c, self.profile, **self.params) for c in clips]

    def fit(self, features, ids=None, *, domains=None, noise: Sequence[np.ndarray] | None = None
            ) -> "NoiseRemovedDetector":
        self.profile = noise_profile(noise) if noise is not None and len(noise) else None
        self.inner.fit(self.transform(features), ids, domains=domains)
        return self

    def score(self, features) -> np.ndarray:
        return self.inner.score(self.transform(features))

    def loo_scores(self) -> np.ndarray:
        return self.inner.loo_scores()

    def loo_ids(self) -> list[str]:
        return self.inner.loo_ids()

    def save(self, directory: str | Path) -> Path:
        d = _write_meta(directory, self.kind, **self.params,
                        profile=None if self.profile is None else self.profile.tolist())
        self.inner.save(d / "inner")
        return d

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> "NoiseRemovedDetector":
        d = Path(directory)
        meta = _read_meta(d, cls.kind)
        out = cls(load_detector(d / "inner", **kwargs), **{k: meta[k] for k in ("floor_db", "time_quantile",
                                                                               "band_quantile")})
        out.profile = None if meta["profile"] is None else np.asarray(meta["profile"], dtype=np.float64)
        return out


KINDS = {c.kind: c for c in (MemoryBank, DomainAwareBank, PooledBank, LocalFeatureBank, FusionDetector,
                             NoiseRemovedDetector)}


def load_detector(directory: str | Path, *, faiss_threads: int = 1, device: str = "cpu") -> Detector:
    """Load whichever detector was saved in ``directory`` (by the ``kind`` in its ``bank.json``)."""
    p = Path(directory) / "bank.json"
    if not p.is_file():
        raise BankError(f"no saved detector in {directory} (bank.json missing)")
    kind = json.loads(p.read_text()).get("kind")
    if kind == "AEDetector":
        from asd_ray.models.autoencoder import AEDetector  # torch only where an AE was saved

        return AEDetector.load(directory, device=device)
    if kind not in KINDS:
        raise BankError(f"{p}: unknown detector kind {kind!r}")
    return KINDS[kind].load(directory, faiss_threads=faiss_threads)


# Settings a saved detector takes at score time (the rest is fixed when it is fitted): config key ->
# (the kinds it applies to, the ``configure`` keyword). They mirror ``make_detector``: ``bank.metric`` is the
# pooled bank's distance too, its k is ``pooled.k``.
SCORE_SETTINGS = {
    "bank.k": (("MemoryBank", "DomainAwareBank"), "k"),
    "bank.metric": (("MemoryBank", "DomainAwareBank", "PooledBank"), "metric"),
    "pooled.k": (("PooledBank",), "k"),
    "fusion.combine": (("FusionDetector",), "combine"),
}

# Config sections and keys that describe how a detector is fitted: a saved one keeps what it was fitted with.
FIT_SECTIONS = ("bank", "pooled", "local", "fusion", "ae", "supplemental")


def given_score_settings(config: RunConfig, given: Iterable[str]) -> dict[str, Any]:
    """The ``SCORE_SETTINGS`` keys among ``given`` (``config.given_keys``) with the config's values."""
    given = set(given)
    return {key: functools.reduce(getattr, key.split("."), config) for key in SCORE_SETTINGS if key in given}


def fit_time_keys(given: Iterable[str]) -> list[str]:
    """The keys among ``given`` that a saved detector cannot take (fixed at fit time)."""
    runtime = {"bank.faiss_threads", "local.faiss_threads"}
    return sorted(k for k in given if (k == "detector" or k.split(".")[0] in FIT_SECTIONS)
                  and k not in SCORE_SETTINGS and k not in runtime)


def configure_detector(detector: Detector, settings: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Apply to a loaded detector the score-time ``settings`` ({config key: value}: the ``SCORE_SETTINGS``
    keys a user gave) that its kind takes.

    Returns each score-time setting of the detector as {key: (value in use, "config" or "saved bank")};
    a fusion's members are reported under ``member_<i>.<key>``.
    """
    if isinstance(detector, NoiseRemovedDetector):
        return configure_detector(detector.inner, settings)
    out: dict[str, tuple[Any, str]] = {}
    for i, member in enumerate(detector.members if isinstance(detector, FusionDetector) else []):
        out.update({f"member_{i}.{k}": v for k, v in configure_detector(member, settings).items()})
    keys = {key: kw for key, (kinds, kw) in SCORE_SETTINGS.items() if detector.kind in kinds}
    if not keys:
        return out
    detector.configure(**{kw: settings[key] for key, kw in keys.items() if key in settings})
    now = detector.score_settings()
    out.update({key: (now[kw], "config" if key in settings else "saved bank") for key, kw in keys.items()})
    return out


def bank_version(directory: str | Path) -> str:
    """A short digest of every file of a saved detector: equal digests, equal banks (first-shot additions
    change it; a restart that reloads the same files does not)."""
    digest = hashlib.sha1()
    root = Path(directory)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]


def detector_features(config: RunConfig) -> str:
    """What ``config.detector`` eats: ``clip`` (backbone embeddings) or ``frames`` (log-mel matrices)."""
    return make_detector(config).features


def features_key(config: RunConfig) -> tuple:
    """What a run's features depend on: equal keys, equal features (for sharing them between detectors)."""
    kind = detector_features(config)
    return kind, config.preprocess, config.embed if kind == "clip" else config.frames


def make_detector(config: RunConfig, name: str | None = None, *, device: str = "cpu") -> Detector:
    """An unfitted detector of kind ``name`` (default ``config.detector``), keywords from the config's sections;
    with ``supplemental.noise_profile``, a frame detector comes wrapped in ``NoiseRemovedDetector`` (a fusion as a
    whole: its members see the same cleaned frames)."""
    if name is None:
        detector = make_detector(config, config.detector, device=device)
        sup = config.supplemental
        if sup.noise_profile and detector.features == "frames":
            return NoiseRemovedDetector(detector, floor_db=sup.floor_db, time_quantile=sup.time_quantile,
                                        band_quantile=sup.band_quantile)
        return detector
    if name == "knn":
        bank = dataclasses.asdict(config.bank)
        return STRATEGIES[bank.pop("strategy")](**bank)
    if name == "pooled":
        b = config.bank
        return PooledBank(**dataclasses.asdict(config.pooled), metric=b.metric, seed=b.seed,
                          faiss_threads=b.faiss_threads)
    if name == "local":
        return LocalFeatureBank(**dataclasses.asdict(config.local))
    if name in ("ae-mse", "ae-maha"):
        from asd_ray.models.autoencoder import AEDetector

        ae = config.ae
        return AEDetector(score_kind=name.removeprefix("ae-"), context=ae.frames, hidden=ae.hidden,
                          bottleneck=ae.bottleneck, layers=ae.layers, epochs=ae.epochs, batch_size=ae.batch_size,
                          lr=ae.lr, seed=ae.seed, threads=ae.threads, device=device)
    if name == "fusion":
        if "fusion" in config.fusion.members:
            raise ConfigError("fusion.members cannot name fusion itself")
        return FusionDetector([make_detector(config, m, device=device) for m in config.fusion.members],
                              combine=config.fusion.combine)
    raise ConfigError(f"unknown detector {name!r}")
