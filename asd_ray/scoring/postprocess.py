"""Post-processing of raw k-NN scores and the decision threshold (SPEC §4). No ray here."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import scipy.stats


def minmax_scale(scores: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scores -> [0, 1] by (s - lo) / (hi - lo); lo/hi default to the scores' own min and max.

    With an explicit calibration range, scores outside it fall outside [0, 1] (they are not clipped,
    so that the ranking is kept). A constant input maps to zeros.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    lo = float(s.min()) if lo is None else float(lo)
    hi = float(s.max()) if hi is None else float(hi)
    if hi <= lo:
        return np.zeros_like(s)
    return (s - lo) / (hi - lo)


def median_filter(scores: np.ndarray, window: int = 3) -> np.ndarray:
    """Running median over consecutive clips of one stream (edges repeat the end values); window 1 = off."""
    s = np.asarray(scores, dtype=np.float64)
    if window <= 1 or s.size == 0:
        return s
    if window % 2 == 0:
        raise ValueError(f"median window must be odd, got {window}")
    return scipy.ndimage.median_filter(s, size=window, mode="nearest")


def gamma_threshold(train_scores: np.ndarray, quantile: float = 0.9) -> float:
    """The DCASE baseline's decision threshold: the ``quantile`` of a gamma fitted (shape, loc, scale) to train scores."""
    s = np.asarray(train_scores, dtype=np.float64)
    if s.size < 3 or np.ptp(s) == 0:
        raise ValueError(f"a gamma fit needs at least 3 distinct train scores, got {s.size}")
    shape, loc, scale = scipy.stats.gamma.fit(s)
    return float(scipy.stats.gamma.ppf(quantile, shape, loc=loc, scale=scale))


def decide(scores: np.ndarray, threshold: float) -> np.ndarray:
    """1 (anomalous) where a score exceeds the threshold, else 0."""
    return (np.asarray(scores) > threshold).astype(np.int64)


@dataclass(frozen=True)
class Calibration:
    """A bank's scale for streams: min-max range and decision threshold of its leave-one-out train scores."""

    lo: float
    hi: float
    threshold: float


def calibrate(train_scores: np.ndarray, threshold_quantile: float = 0.9) -> Calibration:
    """Calibration from a bank's leave-one-out ``train_scores`` (raw distances): their min, max and gamma threshold."""
    s = np.asarray(train_scores, dtype=np.float64)
    return Calibration(lo=float(s.min()), hi=float(s.max()), threshold=gamma_threshold(s, threshold_quantile))


def postprocess(raw: np.ndarray, calibration: Calibration, *, minmax: bool = True
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """One machine's raw test scores -> (final scores, 0/1 decisions, threshold on the final scores' scale).

    The batch run's post-processing is the stream's (``StreamPostprocessor`` with no median filter), on the
    bank's ``calibration``: decisions compare each raw score with its gamma threshold, and min-max maps the
    range of the bank's leave-one-out train scores to [0, 1] (test scores may fall outside it). So a clip gets
    the same score and decision from ``asd-ray run``, the fleet and the HTTP service."""
    raw = np.asarray(raw, dtype=np.float64)
    c = calibration
    scores = minmax_scale(raw, c.lo, c.hi) if minmax else raw
    return scores, decide(raw, c.threshold), output_threshold(c, minmax)


def output_threshold(calibration: Calibration, minmax: bool = True) -> float:
    """A calibration's decision threshold on the scale of the final scores (min-max scaled like them, or raw)."""
    c = calibration
    return float(minmax_scale(np.array([c.threshold]), c.lo, c.hi)[0]) if minmax else c.threshold


class StreamPostprocessor:
    """Post-processing of one stream's raw scores as they arrive, clip by clip.

    A stream cannot look ahead, so the median filter is causal: the median of this clip's raw score
    and the ``median_window - 1`` before it. Decisions compare that filtered raw score with the
    calibration threshold; min-max uses the bank's calibration range (scores may fall outside [0, 1]).
    Keyword names are those of ``PostConfig``.
    """

    def __init__(self, calibration: Calibration, *, minmax: bool = True, median_window: int = 1):
        self.calibration = calibration
        self.minmax = minmax
        self.recent: deque[float] = deque(maxlen=max(1, median_window))

    @property
    def threshold(self) -> float:
        """The decision threshold on the scale of ``push``'s scores."""
        return output_threshold(self.calibration, self.minmax)

    def push(self, raw: float) -> tuple[float, int]:
        """One clip's raw score -> (final score, decision 0/1)."""
        self.recent.append(float(raw))
        filtered = statistics.median(self.recent)  # a few values: faster than numpy per clip
        c = self.calibration
        score = float(minmax_scale(np.array([filtered]), c.lo, c.hi)[0]) if self.minmax else filtered
        return score, int(filtered > c.threshold)
