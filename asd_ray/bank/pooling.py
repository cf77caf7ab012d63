"""Temporal pooling of a clip's log-mel frames into one clip vector for the clip k-NN bank. No ray here.

Frames are 10 log10 mel powers (dB, ``models/frames.py``); P = 10^(x/10) is the linear power.
- ``mean``: mean over time of x (n_mels);
- ``mean_std``: mean and standard deviation over time of x (2 n_mels);
- ``gem``: generalised mean of the power, in dB: 10/p log10(mean_t P^p) (n_mels); p = 1 is the mean
  power, large p tends to the maximum, so short loud events are not averaged away;
- ``reldev``: the mean of x and the relative deviation of the power, std_t(P) / mean_t(P) (2 n_mels),
  which is scale-free: a band's fluctuation (modulation, impulses) whatever its level;
- ``rhythm``: when things happen, not what they sound like (``rhythm_features``): in each of 4 band groups, the
  autocorrelation of the onset strength (the rise of the group's level from frame to frame) and of the level
  itself, at lags of 1 to ``RHYTHM_LAGS`` frames (2 x 4 x 64 values, whatever n_mels): a regular beat gives sharp
  peaks at its period and its multiples, irregular spacing, dropped events or a pattern in another order other
  shapes, with the spectrum left as it was.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from asd_ray.bank.base import Detector

POOLINGS = ("mean", "mean_std", "gem", "reldev", "rhythm")
LOG_MEL_POOLINGS = ("rhythm",)  # poolings whose frames must be log-mel bands in dB (onsets of band levels)
RHYTHM_GROUPS, RHYTHM_LAGS = 4, 64  # band groups; lags in frames (64 hops of 512 samples at 16 kHz: 2 s)
RHYTHM_DIM = 2 * RHYTHM_GROUPS * RHYTHM_LAGS  # onset and level autocorrelations of every group


def _autocorrelation(x: np.ndarray, lags: int) -> np.ndarray:
    """(T x g) -> (lags x g): each column's autocorrelation at lags 1..lags, normalised by its lag-0 value (0 for
    a constant column, and at lags the clip is too short for)."""
    x = x - x.mean(axis=0)
    n = len(x)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = np.fft.rfft(x, size, axis=0)
    r = np.fft.irfft(spec * spec.conj(), size, axis=0)[: lags + 1]
    out = np.zeros((lags, x.shape[1]))
    usable = min(lags, n - 1)
    ok = r[0] > 1e-12 * n
    out[:usable, ok] = r[1:usable + 1, ok] / r[0, ok]
    return out


def rhythm_features(frames: np.ndarray, groups: int = RHYTHM_GROUPS, lags: int = RHYTHM_LAGS) -> np.ndarray:
    """(T x n_mels) dB frames -> the ``rhythm`` pooling's (2 x groups x lags) vector (module docstring)."""
    x = np.asarray(frames, dtype=np.float64)
    if x.shape[1] < groups:
        raise ValueError(f"rhythm pooling splits the bands into {groups} groups: {x.shape[1]} bands are too few")
    level = np.stack([g.mean(axis=1) for g in np.array_split(x, groups, axis=1)], axis=1)  # T x groups
    onset = np.maximum(0.0, np.diff(level, axis=0, prepend=level[:1]))
    return np.concatenate([_autocorrelation(onset, lags).T.ravel(), _autocorrelation(level, lags).T.ravel()])


def _gem(x: np.ndarray, p: float) -> np.ndarray:
    if p <= 0:
        raise ValueError(f"generalised-mean exponent must be positive, got {p}")
    # 10/p log10 mean_t 10^(p x / 10), through logsumexp in natural logs so that loud frames do not overflow
    a = p * x * np.log(10.0) / 10.0
    return (logsumexp(a, axis=0) - np.log(len(x))) * 10.0 / (p * np.log(10.0))


def _reldev(x: np.ndarray, p: float) -> np.ndarray:
    power = 10.0 ** ((x - x.max(axis=0)) / 10.0)  # per band up to a factor: the ratio std/mean ignores it
    return np.concatenate([x.mean(axis=0), power.std(axis=0) / power.mean(axis=0)])


# pooling -> (function of the (T x n_mels) dB frames and gem_p, the vector's length in units of n_mels; 0: a fixed
# length whatever n_mels)
_POOLS = {
    "mean": (lambda x, p: x.mean(axis=0), 1),
    "mean_std": (lambda x, p: np.concatenate([x.mean(axis=0), x.std(axis=0)]), 2),
    "gem": (_gem, 1),
    "reldev": (_reldev, 2),
    "rhythm": (lambda x, p: rhythm_features(x), 0),
}


def pool_clip(frames: np.ndarray, how: str = "mean_std", p: float = 3.0) -> np.ndarray:
    """(T x n_mels) dB frames -> one float32 clip vector (see the module docstring)."""
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pooling takes a (frames x bands) matrix with at least one frame, got shape {x.shape}")
    if how not in _POOLS:
        raise ValueError(f"pooling {how!r}: use one of {POOLINGS}")
    return _POOLS[how][0](x, p).astype(np.float32)


def pool_clips(clips, how: str = "mean_std", p: float = 3.0) -> np.ndarray:
    """List of (T_i x n_mels) matrices -> (n x dim) float32 clip vectors."""
    return np.stack([pool_clip(c, how, p) for c in clips]) if len(clips) else np.zeros((0, 0), np.float32)


class PooledBank(Detector):
    """A clip k-NN bank over pooled log-mel frames: ``fit``/``score`` take clips' (T x n_mels) matrices, pool
    each (``pooling``, ``gem_p``) and hand the clip vectors to a ``MemoryBank`` / ``DomainAwareBank``
    (``strategy`` and the other keywords as ``BankConfig``)."""

    kind = "PooledBank"
    features = "frames"
    # ``bank.metric`` is its distance too, its k is ``pooled.k``
    reads = ("frames", "bank.metric", "bank.seed", "bank.faiss_threads", "embed.batch_size")
    score_keys = {"bank.metric": "metric", "pooled.k": "k"}

    @classmethod
    def needs_log_mel(cls, config, entry, registry) -> bool:
        return entry.options.get("pooling", config.pooled.pooling) in LOG_MEL_POOLINGS

    @classmethod
    def from_config(cls, config, entry, registry, *, device="cpu") -> "PooledBank":
        import dataclasses

        b = config.bank
        settings = {**dataclasses.asdict(config.pooled), **entry.options}  # rhythm: the pooled section, its pooling
        return cls(**settings, metric=b.metric, seed=b.seed, faiss_threads=b.faiss_threads)

    def __init__(self, *, pooling: str = "mean_std", gem_p: float = 3.0, strategy: str = "seed", **bank_kwargs):
        from asd_ray.bank.domain_bank import STRATEGIES, BankError

        if pooling not in POOLINGS:
            raise BankError(f"pooling {pooling!r}: use one of {POOLINGS}")
        if strategy not in STRATEGIES:
            raise BankError(f"unknown bank strategy {strategy!r}: use one of {sorted(STRATEGIES)}")
        self.pooling, self.gem_p, self.strategy = pooling, gem_p, strategy
        self.bank = STRATEGIES[strategy](**bank_kwargs)
        # what its fit depends on besides the score-time settings (``score_settings``): its ``fit_key``
        self._built = {"pooling": pooling, "gem_p": gem_p, "strategy": strategy,
                       **{n: v for n, v in bank_kwargs.items() if n not in ("k", "metric")}}

    @property
    def size(self) -> int:
        return self.bank.size

    @property
    def memory_bytes(self) -> int:
        return self.bank.memory_bytes

    @property
    def dim(self) -> int | None:
        """What a query row must have: n_mels (a query is one clip's T x n_mels matrix)."""
        d, width = self.bank.dim, _POOLS[self.pooling][1]
        return None if d is None or not width else d // width  # a fixed-length pooling takes any band count

    def eats(self) -> str:
        return super().eats() if _POOLS[self.pooling][1] else f"log-mel frames ({self.pooling} pooling: any band count)"

    def configure(self, *, k: int | None = None, metric: str | None = None) -> "PooledBank":
        """The clip bank's score-time settings (``MemoryBank.configure``)."""
        self.bank.configure(k=k, metric=metric)
        return self

    def fit_key(self) -> tuple | None:
        """Its fit depends on the keywords it was built with and its score-time settings as they are now (``configure``
        measures again what depends on them, as ``fit`` would); a loaded bank shares none."""
        if self._built is None:
            return None
        return self.kind, tuple(sorted({**self._built, **self.score_settings()}.items()))

    def adopt(self, fitted: "PooledBank") -> "PooledBank":
        """The clip bank of ``fitted`` (built alike, fitted on the same clips): the state ``fit`` would give."""
        from asd_ray.bank.domain_bank import BankError

        if fitted.fit_key() != self.fit_key() or not fitted.bank.size:
            raise BankError("adopt: a fitted pooled bank built with this one's keywords is needed")
        self.bank = fitted.bank
        return self

    def score_settings(self) -> dict:
        return self.bank.score_settings()

    def pool(self, clips) -> np.ndarray:
        return pool_clips(clips, self.pooling, self.gem_p)

    def fit(self, clips, ids=None, *, domains=None) -> "PooledBank":
        ids = list(ids) if ids is not None else [str(i) for i in range(len(clips))]
        self.bank.fit(self.pool(clips), ids, domains=list(domains) if domains is not None else ["source"] * len(clips))
        return self

    def score(self, clips) -> np.ndarray:
        return self.bank.score(self.pool(clips))

    def loo_scores(self) -> np.ndarray:
        return self.bank.loo_scores()

    def loo_ids(self) -> list[str]:
        return self.bank.loo_ids()

    def save(self, directory):
        from asd_ray.bank.saved import write_meta

        d = write_meta(directory, self.kind, pooling=self.pooling, gem_p=self.gem_p, strategy=self.strategy)
        self.bank.save(d / "bank")
        return d

    @classmethod
    def load(cls, directory, *, faiss_threads: int = 1, **_ignored) -> "PooledBank":
        from pathlib import Path

        from asd_ray.bank.domain_bank import STRATEGIES
        from asd_ray.bank.saved import choice, read_meta

        d = Path(directory)
        meta = read_meta(d, cls.kind, {"pooling": str, "gem_p": (int, float), "strategy": str})
        choice(d, meta, "pooling", POOLINGS)
        choice(d, meta, "strategy", STRATEGIES)
        out = cls(pooling=meta["pooling"], gem_p=meta["gem_p"], strategy=meta["strategy"])
        out.bank = STRATEGIES[meta["strategy"]].load(d / "bank", faiss_threads=faiss_threads)
        out._built = None  # what it was built with is not all saved: no fit to share
        width = _POOLS[meta["pooling"]][1]
        if (out.bank.dim % width) if width else (out.bank.dim != RHYTHM_DIM):
            from asd_ray.errors import BankFolderError

            what = f"{width} x n_mels values" if width else f"{RHYTHM_DIM} values"
            raise BankFolderError(d, "bank/bank.json", f"{meta['pooling']} pooling gives {what} per clip, "
                                                       f"but the bank holds {out.bank.dim}-d vectors")
        return out
