"""k-NN memory banks over clip embeddings (SPEC §4), on FAISS. No ray here.

``MemoryBank``: one machine's normal embeddings; a query's score is the mean of its k smallest
true distances to the bank (euclidean: FAISS's squared L2 distances, square-rooted; cosine:
1 - cosine similarity). With ``density``, each distance to a member is first divided by that member's
own radius (its mean distance to its k nearest other members): local-density-normalised k-NN, so a
query in a sparse region of the normals is not scored anomalous for being far from a lonely member. ``DomainAwareBank`` (``domain_bank.py``) keeps one per domain.
``fit()`` then ``score()``; persisted as a FAISS index file plus JSON metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.oversample import oversampled, smote  # noqa: F401 - smote re-exported
from asd_ray.bank.saved import choice, read_index, read_meta, write_meta
from asd_ray.errors import BankError, BankFolderError  # noqa: F401 - defined there, raised and re-exported here
from asd_ray.threads import spread

METRICS = ("euclidean", "cosine")
STRATEGY_KINDS = {"seed": "MemoryBank", "domain_aware": "DomainAwareBank"}  # bank.strategy -> the saved kind
QUERY_BLOCK = 1024  # queries per FAISS search call: a fixed split, so ``faiss_threads`` cannot change a result


def as_matrix(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise BankError(f"{what}: expected a 2-D array (n x dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise BankError(f"{what}: dimension {x.shape[1]} does not match the bank's {dim}")
    if not np.isfinite(x).all():
        raise BankError(f"{what}: contains NaN or Inf")
    return x


class ClipBank(Detector):
    """What both clip k-NN banks declare: the ``knn`` detector reads ``bank`` and ``embed``, takes ``k`` and
    ``metric`` at score time and takes added normals. The ``bank.strategy`` picks the class."""

    features = "clip"
    reads = ("bank", "embed")
    takes_normals = True
    score_keys = {"bank.k": "k", "bank.metric": "metric"}

    @classmethod
    def from_config(cls, config, entry, registry, *, device="cpu") -> "ClipBank":
        bank = dataclasses.asdict(config.bank)
        return registry.kind(STRATEGY_KINDS[bank.pop("strategy")])(**bank)

    def clip_members(self) -> np.ndarray:
        return self.members()

    @property
    def memory_bytes(self) -> int:
        return int(self.members().nbytes) if self.size else 0


class MemoryBank(ClipBank):
    """One machine's bank of normal embeddings with a k-NN distance score."""

    kind = "MemoryBank"

    def __init__(self, *, k: int = 3, metric: str = "euclidean", density: bool = False, oversample_target: int = 0,
                 seed: int = 0, faiss_threads: int = 1):
        if metric not in METRICS:
            raise BankError(f"metric {metric!r}: use one of {METRICS}")
        if k < 1:
            raise BankError(f"k must be at least 1, got {k}")
        self.k = k
        self.metric = metric
        self.density = density
        self.oversample_target = oversample_target
        self.seed = seed
        self.faiss_threads = faiss_threads
        self.index: faiss.Index | None = None
        self.ids: list[str] = []
        self._radii: np.ndarray | None = None

    @property
    def size(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def dim(self) -> int | None:
        return None if self.index is None else int(self.index.d)

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def fit(self, embeddings: np.ndarray, ids: Sequence[str] | None = None, *,
            domains: Sequence[str] | None = None) -> "MemoryBank":
        """Replace the bank's content with ``embeddings`` (n x dim float); ``ids`` name the members; with
        ``domains`` and ``oversample_target``, the target members are SMOTE-oversampled to that many."""
        x = as_matrix(embeddings, None, "fit")
        if len(x) == 0:
            raise BankError("fit: no embeddings")
        if domains is not None:
            x, ids, _ = oversampled(x, ids, domains, self.oversample_target, self.seed)
        self.index = faiss.IndexFlatIP(x.shape[1]) if self.metric == "cosine" else faiss.IndexFlatL2(x.shape[1])
        self.ids = []
        return self.add(x, ids)

    def add(self, embeddings: np.ndarray, ids: Sequence[str] | None = None) -> "MemoryBank":
        """Append members without rebuilding (first-shot calibration with new normals)."""
        if self.index is None:
            return self.fit(embeddings, ids)
        x = as_matrix(embeddings, self.dim, "add")
        ids = [str(i) for i in ids] if ids is not None else [str(self.size + i) for i in range(len(x))]
        if len(ids) != len(x):
            raise BankError(f"add: {len(x)} embeddings but {len(ids)} ids")
        self.index.add(self._prepare(x))
        self.ids.extend(ids)
        self._radii = None  # density radii change with the members
        return self

    def add_normals(self, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> int:
        """``add`` the clips whose ids the bank does not hold yet (one bank for both domains); how many."""
        have = set(self.ids)
        keep = [i for i, name in enumerate(ids) if str(name) not in have]
        if keep:
            self.add(np.asarray(embeddings)[keep], [str(ids[i]) for i in keep])
        return len(keep)

    def configure(self, *, k: int | None = None, metric: str | None = None) -> "MemoryBank":
        """Change the score-time settings of a (saved) bank without refitting: ``k``, and ``metric`` from
        euclidean to cosine (the members are normalised into a new index, as ``fit`` with cosine would). A
        cosine bank keeps unit vectors only, so it cannot go back to euclidean."""
        if k is not None:
            if k < 1:
                raise BankError(f"k must be at least 1, got {k}")
            self.k = k
        if metric is not None and metric != self.metric:
            if metric not in METRICS:
                raise BankError(f"metric {metric!r}: use one of {METRICS}")
            if self.metric == "cosine":
                raise BankError("a cosine bank stores unit vectors only: it cannot score euclidean distances; "
                                "refit it with bank.metric=euclidean")
            members = self.members() if self.index is not None else None
            self.metric = metric
            if members is not None:
                self.index = faiss.IndexFlatIP(members.shape[1])
                self.index.add(self._prepare(members))
        self._radii = None  # density radii depend on k and the metric
        return self

    def score_settings(self) -> dict:
        """The settings ``configure`` can change, as they are now."""
        return {"k": self.k, "metric": self.metric}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(m x dim) -> (m x k true distances ascending, m x k member indices); k is capped at the bank size."""
        if self.index is None or self.size == 0:
            raise BankError("the bank is empty: fit() it with normal embeddings before scoring")
        q = self._prepare(as_matrix(queries, self.dim, "score"))
        k = min(k, self.size)
        # One BLAS thread per search call (``asd_ray/threads.py``); ``faiss_threads`` calls at once on fixed blocks of
        # queries. A query's distances may still depend on the other queries of its block (FAISS computes fewer
        # than 20 queries pair by pair, more through one BLAS product), never on a thread count.
        hits = spread(lambda i: self.index.search(q[i:i + QUERY_BLOCK], k), range(0, max(len(q), 1), QUERY_BLOCK),
                      self.faiss_threads)
        sims, idx = (np.concatenate(h) for h in zip(*hits)) if len(hits) > 1 else hits[0]
        if self.metric == "cosine":
            dist = np.clip(1.0 - sims, 0.0, 2.0)
        else:
            dist = np.sqrt(np.maximum(sims, 0.0))  # FAISS L2 indices return squared distances
        return dist, idx

    def score(self, queries: np.ndarray, k: int | None = None) -> np.ndarray:
        """Anomaly scores (m,) float64: mean of the k smallest distances of each query to the bank
        (with ``density``: of the k smallest distance / member radius ratios, over every member)."""
        k = k or self.k
        if not self.density:
            dist, _ = self.search(queries, k)
            return dist.astype(np.float64).mean(axis=1)
        dist, idx = self.search(queries, self.size)
        return np.sort(dist / self.radii()[idx], axis=1)[:, :k].astype(np.float64).mean(axis=1)

    def radii(self) -> np.ndarray:
        """(size,) each member's mean distance to its k nearest other members (zero radii: the smallest positive)."""
        if self._radii is None:
            dist, _ = self._loo_hits(min(self.k, self.size - 1))
            r = dist.astype(np.float64).mean(axis=1)
            positive = r[r > 0]
            self._radii = np.where(r > 0, r, positive.min() if positive.size else 1.0)
        return self._radii

    def members(self) -> np.ndarray:
        """The stored vectors (size x dim float32; unit length for cosine banks)."""
        if self.index is None:
            raise BankError("the bank is empty: fit() it with normal embeddings first")
        return self.index.reconstruct_n(0, self.size)

    def _loo_hits(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(size x k distances, size x k indices) of each member's k nearest other members."""
        if self.size < 2:
            raise BankError(f"leave-one-out needs at least 2 members, the bank has {self.size}")
        members = self.members()  # cosine members are stored normalised already
        dist, idx = self.search(members, min(k, self.size - 1) + 1)
        own = idx == np.arange(self.size)[:, None]
        # A member that is not among its own hits (exact duplicates) drops its first hit instead.
        drop = np.where(own.any(axis=1, keepdims=True), own, np.arange(dist.shape[1])[None, :] == 0)
        shape = (self.size, dist.shape[1] - 1)
        return dist[~drop].reshape(shape), idx[~drop].reshape(shape)

    def loo_scores(self, k: int | None = None) -> np.ndarray:
        """Each member's score against the other members (leave-one-out), for thresholds and calibration."""
        k = k or self.k
        if not self.density:
            dist, _ = self._loo_hits(k)
            return dist.astype(np.float64).mean(axis=1)
        dist, idx = self._loo_hits(self.size - 1)
        return np.sort(dist / self.radii()[idx], axis=1)[:, :k].astype(np.float64).mean(axis=1)

    def loo_ids(self) -> list[str]:
        """The members ``loo_scores`` are given for, in its order."""
        return list(self.ids)

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``bank.json`` (no pickle) into ``directory``."""
        if self.index is None:
            raise BankError("save: the bank is empty")
        d = write_meta(directory, "MemoryBank", k=self.k, metric=self.metric, density=self.density,
                        oversample_target=self.oversample_target, seed=self.seed, dim=self.dim, ids=self.ids)
        faiss.write_index(self.index, str(d / "index.faiss"))
        return d

    @classmethod
    def load(cls, directory: str | Path, *, faiss_threads: int = 1, **_ignored) -> "MemoryBank":
        """The bank saved in ``directory``, checked: ``bank.json`` against ``index.faiss`` (dimension, members, the
        metric the index was built for); any fault is a ``BankFolderError`` naming the file."""
        d = Path(directory)
        meta = read_meta(d, "MemoryBank", {"k": int, "metric": str, "dim": int, "ids": list})
        metric = choice(d, meta, "metric", METRICS)
        if meta["k"] < 1:
            raise BankFolderError(d, "bank.json", f"'k' is {meta['k']}: it must be at least 1")
        bank = cls(k=meta["k"], metric=metric, density=bool(meta.get("density", False)),
                   oversample_target=meta.get("oversample_target", 0), seed=meta.get("seed", 0), faiss_threads=faiss_threads)
        bank.index = read_index(d)
        bank.ids = [str(i) for i in meta["ids"]]
        if bank.dim != meta["dim"]:
            raise BankFolderError(d, "bank.json", f"'dim' is {meta['dim']} but index.faiss holds {bank.dim}-d vectors")
        if bank.size != len(bank.ids):
            raise BankFolderError(d, "bank.json", f"names {len(bank.ids)} member ids but index.faiss holds {bank.size} "
                                                  f"vectors")
        if not isinstance(bank.index, faiss.IndexFlat) or bank.index.metric_type not in (faiss.METRIC_L2,
                                                                                          faiss.METRIC_INNER_PRODUCT):
            raise BankFolderError(d, "index.faiss", f"holds a {type(bank.index).__name__}, not the flat L2 or inner-product "
                                                    f"index a bank saves")
        built_for = "cosine" if bank.index.metric_type == faiss.METRIC_INNER_PRODUCT else "euclidean"
        if built_for != metric:
            raise BankFolderError(d, "bank.json", f"'metric' is {metric!r} but index.faiss was built for {built_for} "
                                                  f"distances (refit the bank to change its metric)")
        if metric == "cosine" and bank.size:
            norms = np.linalg.norm(bank.members(), axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                raise BankFolderError(d, "index.faiss", "a cosine bank's members must be unit vectors; these are not")
        return bank
