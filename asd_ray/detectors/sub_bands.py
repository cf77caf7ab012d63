"""Per-band memory banks (``detector=bands``), as BEAM does (DCASE 2024: one memory bank per frequency sub-band,
the bands' distances combined). No ray here.

A clip's log-mel bands are cut into ``bands.groups`` equal groups, low bands first; each group is a pooled bank
of its own (``BandSlice`` around a ``PooledBank`` with the ``pooled.*`` settings), its scores z-normalised by its
own leave-one-out train scores and the groups combined (``bands.combine``) as a fusion combines its members. An
anomaly in a few bands moves its group's pooled vector far more than the whole spectrum's, where the other bands'
normal variation dilutes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.saved import read_meta, write_meta
from asd_ray.config import ConfigError
from asd_ray.detectors.fusion import FusionDetector
from asd_ray.errors import BankError, BankFolderError


def band_groups(n_bands: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous (lo, hi) band ranges covering ``n_bands`` bands, as equal as can be, low first."""
    if not 1 <= groups <= n_bands:
        raise BankError(f"{groups} band groups of {n_bands} bands: use 1 to {n_bands} groups")
    edges = np.linspace(0, n_bands, groups + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


class BandSlice(Detector):
    """A frame detector that sees group ``group`` of ``groups`` equal groups of a clip's bands (``band_groups``):
    ``fit`` and ``score`` hand it (T x the group's bands) slices of the (T x n_bands) clips. Its ``dim`` is the
    whole clip's band count (what a query must have); everything else is the inner detector's."""

    kind = "BandSlice"
    features = "frames"

    def __init__(self, inner: Detector, *, group: int, groups: int, n_bands: int | None = None):
        if inner.features != "frames":
            raise ConfigError(f"a band slice holds a frame detector, not a {inner.kind}")
        if not 0 <= group < groups:
            raise ConfigError(f"band group {group} of {groups}: use 0 to {groups - 1}")
        self.inner, self.group, self.groups, self.n_bands = inner, group, groups, n_bands

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def dim(self) -> int | None:
        return self.n_bands

    @property
    def bands(self) -> tuple[int, int]:
        """Its (lo, hi) band range."""
        return band_groups(self.n_bands, self.groups)[self.group]

    def parts(self) -> list[tuple[str, Detector]]:
        return [("", self.inner)]

    def _slice(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        widths = {c.shape[1] for c in clips}
        if widths != {self.n_bands}:
            raise BankError(f"clips of {sorted(widths)} bands for a bank of {self.n_bands}-band clips")
        lo, hi = self.bands
        return [np.ascontiguousarray(c[:, lo:hi]) for c in clips]

    def fit(self, features, ids=None, *, domains=None) -> "BandSlice":
        self.n_bands = features[0].shape[1]
        band_groups(self.n_bands, self.groups)  # too few bands for the groups: one line
        self.inner.fit(self._slice(features), ids, domains=domains)
        return self

    def score(self, features) -> np.ndarray:
        return self.inner.score(self._slice(features))

    def loo_scores(self) -> np.ndarray:
        return self.inner.loo_scores()

    def loo_ids(self) -> list[str]:
        return self.inner.loo_ids()

    def save(self, directory: str | Path) -> Path:
        d = write_meta(directory, self.kind, group=self.group, groups=self.groups, n_bands=self.n_bands)
        self.inner.save(d / "inner")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, registry=None, **kwargs) -> "BandSlice":
        d = Path(directory)
        meta = read_meta(d, cls.kind, {"group": int, "groups": int, "n_bands": int})
        if not 0 <= meta["group"] < meta["groups"] <= meta["n_bands"]:
            raise BankFolderError(d, "bank.json", f"band group {meta['group']} of {meta['groups']} over "
                                                  f"{meta['n_bands']} bands is not a band range")
        inner = registry.load(d / "inner", **kwargs)
        if inner.features != "frames":
            raise BankFolderError(d, "inner/bank.json", f"holds a {inner.kind}, not a frame detector")
        return cls(inner, group=meta["group"], groups=meta["groups"], n_bands=meta["n_bands"])


class SubBandDetector(FusionDetector):
    """``bands.groups`` band slices of pooled banks, z-normalised and combined as a fusion's members."""

    kind = "SubBandDetector"
    score_keys = {"bands.combine": "combine"}

    @staticmethod
    def _member_names(config, entry) -> tuple[str, ...]:
        return ("pooled",)  # each group's bank: the pooled bank and its settings

    @classmethod
    def from_config(cls, config, entry, registry, *, device="cpu") -> "SubBandDetector":
        groups = config.bands.groups
        if groups < 1:
            raise ConfigError(f"bands.groups={groups}: use 1 or more")
        return cls([BandSlice(registry.make(config, "pooled"), group=i, groups=groups) for i in range(groups)],
                   combine=config.bands.combine)

    @classmethod
    def needs_log_mel(cls, config, entry, registry) -> bool:
        return True  # groups of frequency bands: a backbone's feature dimensions are not bands

    @classmethod
    def describe(cls, config, entry, registry) -> str:
        return (f"per-band pooled banks: {config.bands.groups} groups of log-mel bands, each z-scored by its train "
                f"scores, {config.bands.combine}")

    def parts(self) -> list[tuple[str, Detector]]:
        return [(f"band_{i}.", m) for i, m in enumerate(self.members)]
