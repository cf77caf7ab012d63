"""Label-free fusion of detectors that eat the same features (``fusion`` in the config). No ray here."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.saved import choice, read_meta, write_meta
from asd_ray.config import ConfigError, FusionConfig
from asd_ray.errors import BankError, BankFolderError

COMBINE = ("min", "mean", "max")


def znormalise(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(s - mean(reference)) / std(reference): scores in units of a detector's own train-score spread
    (a zero spread counts as 1)."""
    ref = np.asarray(reference, dtype=np.float64)
    sd = float(ref.std())
    return (np.asarray(scores, dtype=np.float64) - float(ref.mean())) / (sd if sd > 0 else 1.0)


def combine(z: np.ndarray, how: str) -> np.ndarray:
    """(members x m) z-scores -> (m,) by ``min``, ``mean`` or ``max`` over members."""
    if how not in COMBINE:
        raise ValueError(f"fusion combine {how!r}: use one of {COMBINE}")
    return getattr(np.asarray(z, dtype=np.float64), how)(axis=0)


LOG_MEL_MEMBERS = ("local", "pooled", "rhythm")  # chosen on three corpus styles, 2 seeds each (README)
BACKBONE_MEMBERS = ("local", "pooled")  # rhythm reads log-mel band levels, which a backbone's frames are not


def default_members(config) -> tuple[str, ...]:
    """The members of a fusion whose ``fusion.members`` is not given: by the frames it eats."""
    return LOG_MEL_MEMBERS if config.embed.backbone == "logmel" else BACKBONE_MEMBERS


class FusionDetector(Detector):
    """Label-free fusion: each member detector's scores z-normalised by its own leave-one-out train scores,
    then combined (``combine``). Members must eat the same features. Its ``loo_scores`` combine the members'
    normalised leave-one-out scores of the train clips every member has scores for."""

    kind = "FusionDetector"
    score_keys = {"fusion.combine": "combine"}

    def __init__(self, members: Sequence[Detector], *, combine: str = FusionConfig.combine):
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

    # --- built from the config: its members are detectors of the registry -----------------------------------
    @staticmethod
    def _member_names(config, entry) -> tuple[str, ...]:
        if entry.name in config.fusion.members:
            raise ConfigError(f"fusion.members cannot name {entry.name} itself")
        return tuple(config.fusion.members) or default_members(config)

    @classmethod
    def from_config(cls, config, entry, registry, *, device="cpu") -> "FusionDetector":
        return cls([registry.make(config, m, device=device) for m in cls._member_names(config, entry)],
                   combine=config.fusion.combine)

    @classmethod
    def settings_read(cls, config, entry, registry) -> set[str]:
        return {entry.section, *cls.reads}.union(*(registry.reads(config, m) for m in cls._member_names(config, entry)))

    @classmethod
    def features_for(cls, config, entry, registry) -> str:
        kinds = {registry.features(config, m) for m in cls._member_names(config, entry)}
        if len(kinds) != 1:
            raise ConfigError(f"fusion members must eat the same features, got {sorted(kinds)}")
        return kinds.pop()

    @classmethod
    def frames_needed(cls, config, entry, registry) -> int:
        return max(registry.frames_needed(config, m) for m in cls._member_names(config, entry))

    @classmethod
    def trains_a_model(cls, config, entry, registry) -> bool:
        return any(registry.trains_a_model(config, m) for m in cls._member_names(config, entry))

    @classmethod
    def needs_log_mel(cls, config, entry, registry) -> bool:
        return any(registry.needs_log_mel(config, m) for m in cls._member_names(config, entry))

    @classmethod
    def describe(cls, config, entry, registry) -> str:
        members = " + ".join(cls._member_names(config, entry))
        return f"fusion ({config.fusion.combine}) of {members}, each z-scored by its train scores"

    # --- what it is ----------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(m.size for m in self.members)

    @property
    def dim(self) -> int | None:
        """What a query row must have: the members' (None when every member takes any: a rhythm pooling)."""
        return next((m.dim for m in self.members if m.dim is not None), None)

    def parts(self) -> list[tuple[str, Detector]]:
        return [(f"member_{i}.", m) for i, m in enumerate(self.members)]

    def fit(self, features, ids=None, *, domains=None) -> "FusionDetector":
        for m in self.members:
            m.fit(features, ids, domains=domains)
        self._references = None
        return self

    def fit_key(self) -> tuple | None:
        """Its members' keys (``combine`` is a score-time setting: a fusion that combines otherwise shares the
        fit); None when a member shares none."""
        keys = tuple(m.fit_key() for m in self.members)
        return None if None in keys else (self.kind, keys)

    def adopt(self, fitted: "FusionDetector") -> "FusionDetector":
        """Each member takes the fit of ``fitted``'s member in its place (a fusion with this one's ``fit_key``)."""
        if fitted.fit_key() != self.fit_key():
            raise BankError(f"adopt: a fitted fusion of members like this one's is needed ({fitted.fit_key()} vs "
                            f"{self.fit_key()})")
        for m, f in zip(self.members, fitted.members):
            m.adopt(f)
        self._references = None
        return self

    def shared_fits(self) -> dict[tuple, Detector]:
        """Itself and each member's (a later ``local`` takes this fusion's local member)."""
        out = super().shared_fits()
        for m in self.members:
            out.update(m.shared_fits())
        return out

    def can_adopt(self, shared: dict[tuple, Detector]) -> bool:
        """Its whole fit, or each member's (a ``local`` and a ``pooled`` fitted before)."""
        return super().can_adopt(shared) or all(m.can_adopt(shared) for m in self.members)

    def adopt_from(self, shared: dict[tuple, Detector]) -> "FusionDetector":
        if super().can_adopt(shared):
            return super().adopt_from(shared)
        for m in self.members:
            m.adopt_from(shared)
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
        d = write_meta(directory, self.kind, combine=self.combine, members=len(self.members))
        for i, m in enumerate(self.members):
            m.save(d / f"member_{i}")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, registry=None, **kwargs) -> "FusionDetector":
        d = Path(directory)
        meta = read_meta(d, cls.kind, {"combine": str, "members": int})
        choice(d, meta, "combine", COMBINE)
        if meta["members"] < 1:
            raise BankFolderError(d, "bank.json", f"'members' is {meta['members']}: a fusion needs at least one")
        members = [registry.load(d / f"member_{i}", **kwargs) for i in range(meta["members"])]
        # each member against the first that has a query width (a rhythm pooling takes any band count: any fits it)
        ref = next((i for i, m in enumerate(members) if m.dim is not None), 0)
        for i, m in enumerate(members):
            if m.features != members[ref].features or m.dim not in (None, members[ref].dim):
                raise BankFolderError(d, f"member_{i}/bank.json",
                                      f"eats {m.eats()} but member_{ref} eats {members[ref].eats()}")
        return cls(members, combine=meta["combine"])
