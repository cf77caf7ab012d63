"""Supplemental noise-only clips: a machine's background noise profile, removed from log-mel frames. No ray here.

DCASE 2025 gives, for some machines, supplemental clips of the background alone (``noise``) and of the
machine alone (``clean``), mostly of the source domain. Frames are 10 log10 mel powers (dB,
``models/frames.py``); P = 10^(x/10) is the linear power.
- the profile: the mean mel power over every frame of a machine's noise-only clips, in dB (n_mels);
- a clip's noise level: pre-processing normalised each clip's loudness, so the profile's level inside a
  clip is measured on the clip itself: per band, the ``time_quantile`` of its frames (the band's floor)
  minus the profile; the offset is the ``band_quantile`` of that over bands (a low quantile: bands where the
  machine is loud do not count);
- the removal: power spectral subtraction with a floor, P' = max(P - N, 10^(floor_db/10) P), N the
  profile at the clip's offset.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def noise_profile(noise_clips: Sequence[np.ndarray]) -> np.ndarray:
    """(n_mels,) float64 dB: 10 log10 of the mean mel power over every frame of the (T_i x n_mels) dB clips."""
    if not len(noise_clips):
        raise ValueError("a noise profile needs at least one noise-only clip")
    power = np.concatenate([10.0 ** (np.asarray(c, dtype=np.float64) / 10.0) for c in noise_clips])
    return 10.0 * np.log10(power.mean(axis=0))


def noise_offset(frames: np.ndarray, profile: np.ndarray, *, time_quantile: float = 0.1,
                 band_quantile: float = 0.05) -> float:
    """dB to add to ``profile`` for the noise level inside one clip (T x n_mels dB; see the module docstring)."""
    x = np.asarray(frames, dtype=np.float64)
    return float(np.quantile(np.quantile(x, time_quantile, axis=0) - profile, band_quantile))


def subtract_noise(frames: np.ndarray, profile: np.ndarray, *, floor_db: float = -13.0, time_quantile: float = 0.1,
                   band_quantile: float = 0.05) -> np.ndarray:
    """(T x n_mels) dB frames -> float32 dB frames with the profile, at the clip's own offset, subtracted in
    power; no bin drops below ``floor_db`` of its own power."""
    x = np.asarray(frames, dtype=np.float64)
    noise = 10.0 ** ((profile + noise_offset(x, profile, time_quantile=time_quantile,
                                             band_quantile=band_quantile)) / 10.0)
    power = 10.0 ** (x / 10.0)
    return (10.0 * np.log10(np.maximum(power - noise, 10.0 ** (floor_db / 10.0) * power))).astype(np.float32)
