"""A frame detector whose clips first lose their machine's noise profile (``supplemental.noise_profile``). No ray here."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.noise import noise_profile, subtract_noise
from asd_ray.bank.saved import read_meta, write_meta
from asd_ray.config import ConfigError
from asd_ray.errors import BankFolderError


class NoiseRemovedDetector(Detector):
    """A frame detector whose clips lose their machine's noise profile first (``bank/noise.py``): ``fit`` takes
    the machine's noise-only clips as ``noise`` (T_i x n_mels dB each); without any, clips pass unchanged (DCASE
    gives supplemental clips for some machines only). Keywords are ``SupplementalConfig``'s. Everything else is
    the inner detector's."""

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
        return self.inner.dim

    @property
    def losses(self) -> list[float]:
        return list(self.inner.losses)

    def parts(self) -> list[tuple[str, Detector]]:
        return [("", self.inner)]

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
        d = write_meta(directory, self.kind, **self.params,
                       profile=None if self.profile is None else self.profile.tolist())
        self.inner.save(d / "inner")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, registry=None, **kwargs) -> "NoiseRemovedDetector":
        d = Path(directory)
        meta = read_meta(d, cls.kind, {"floor_db": (int, float), "time_quantile": (int, float),
                                       "band_quantile": (int, float), "profile": (list, type(None))})
        inner = registry.load(d / "inner", **kwargs)
        if inner.features != "frames":
            raise BankFolderError(d, "inner/bank.json", f"holds a {inner.kind}, not a frame detector")
        out = cls(inner, **{k: meta[k] for k in ("floor_db", "time_quantile", "band_quantile")})
        if meta["profile"] is not None:
            profile = np.asarray(meta["profile"])
            if profile.shape != (inner.dim,) or not np.issubdtype(profile.dtype, np.number) or not np.isfinite(profile).all():
                raise BankFolderError(d, "bank.json", f"'profile' must be {inner.dim} numbers (the inner detector's "
                                                      f"n_mels), got shape {profile.shape}")
            out.profile = profile.astype(np.float64)
        return out
