"""k-NN memory banks over clip embeddings (SPEC §4), on FAISS. No ray here.

``MemoryBank``: one machine's normal embeddings; a query's score is the mean of its k smallest
true distances to the bank (euclidean: FAISS's squared L2 distances, square-rooted; cosine:
1 - cosine similarity). With ``density``, each distance to a member is first divided by that member's
own radius (its mean distance to its k nearest other members): local-density-normalised k-NN, so a
query in a sparse region of the normals is not scored anomalous for being far from a lonely member. ``DomainAwareBank``: separate source and target banks, each distance
divided by that bank's typical leave-one-out nearest-neighbour distance; the score is the
smaller of the two.
Both are ``fit()`` then ``score()``; both persist as FAISS index files plus JSON metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.oversample import oversampled, smote  # noqa: F401 - smote re-exported
from asd_ray.bank.saved import NUMBER, choice, read_index, read_meta, write_meta
from asd_ray.errors import BankError, BankFolderError  # noqa: F401 - defined there, raised and re-exported here
from asd_ray.threads import spread

METRICS = ("euclidean", "cosine")
QUERY_BLOCK = 1024  # queries per FAISS search call: a fixed split, so ``faiss_threads`` cannot change a result


def _as_matrix(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
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
    def from_config(cls, config, entry, registry, *, device="cpu") -> "MemoryBank | DomainAwareBank":
        bank = dataclasses.asdict(config.bank)
        return STRATEGIES[bank.pop("strategy")](**bank)

    def clip_members(self) -> np.ndarray:
        return self.members()


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
        x = _as_matrix(embeddings, None, "fit")
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
        x = _as_matrix(embeddings, self.dim, "add")
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
        q = self._prepare(_as_matrix(queries, self.dim, "score"))
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


class DomainAwareBank(ClipBank):
    """Source and target banks; distances scaled by each bank's typical leave-one-out NN distance; min of the two."""

    kind = "DomainAwareBank"

    def __init__(self, *, k: int = 3, metric: str = "euclidean", density: bool = False, oversample_target: int = 0,
                 seed: int = 0, faiss_threads: int = 1):
        self.k = k
        self.metric = metric
        self.density = density
        self.oversample_target = oversample_target
        self.seed = seed
        self.faiss_threads = faiss_threads
        self.banks: dict[str, MemoryBank] = {}
        self.scales: dict[str, float] = {}

    @property
    def size(self) -> int:
        return sum(b.size for b in self.banks.values())

    @property
    def dim(self) -> int | None:
        return next(iter(self.banks.values())).dim if self.banks else None

    def fit(self, embeddings: np.ndarray, ids: Sequence[str] | None = None, *, domains: Sequence[str]
            ) -> "DomainAwareBank":
        """``domains`` gives each member's domain ("source" / "target"); with ``oversample_target`` the
        target members are first SMOTE-oversampled to that many."""
        x = _as_matrix(embeddings, None, "fit")
        if len(domains) == len(x):
            x, ids, domains = oversampled(x, ids, domains, self.oversample_target, self.seed)
        domains = np.asarray(domains)
        ids = np.asarray([str(i) for i in ids] if ids is not None else [str(i) for i in range(len(x))])
        if len(domains) != len(x) or len(ids) != len(x):
            raise BankError(f"fit: {len(x)} embeddings, {len(domains)} domains, {len(ids)} ids")
        self.banks, self.scales = {}, {}
        for domain in ("source", "target"):
            sel = domains == domain
            if sel.sum() >= 2:
                bank = MemoryBank(k=self.k, metric=self.metric, density=self.density, seed=self.seed,
                                  faiss_threads=self.faiss_threads)
                bank.fit(x[sel], ids[sel].tolist())
                self.banks[domain] = bank
                self.scales[domain] = self._scale(bank)
        if not self.banks:
            raise BankError("fit: needs at least 2 members in the source or the target domain")
        return self

    @staticmethod
    def _scale(bank: MemoryBank) -> float:
        # The median 1-NN distance of a member to the rest: how far apart this domain's normals typically are.
        s = float(np.median(bank.loo_scores(k=1)))
        return s if s > 0 else 1.0

    def add(self, embeddings: np.ndarray, ids: Sequence[str] | None = None, *, domain: str = "target"
            ) -> "DomainAwareBank":
        """Append members to one domain's bank; its scale stays as fitted (no rebuild)."""
        if domain not in self.banks:
            raise BankError(f"add: no {domain} bank; fit() it with at least 2 {domain} members first")
        self.banks[domain].add(embeddings, ids)
        return self

    def add_normals(self, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> int:
        """``add`` to ``domain``'s bank the clips whose ids it does not hold yet; how many."""
        have = set(self.banks[domain].ids) if domain in self.banks else set()
        keep = [i for i, name in enumerate(ids) if str(name) not in have]
        if keep:
            self.add(np.asarray(embeddings)[keep], [str(ids[i]) for i in keep], domain=domain)
        return len(keep)

    def configure(self, *, k: int | None = None, metric: str | None = None) -> "DomainAwareBank":
        """``MemoryBank.configure`` for each domain's bank; the domain scales are measured again when a
        setting changes (with density radii they depend on k too), as ``fit`` would have measured them."""
        if (k is None or k == self.k) and (metric is None or metric == self.metric):
            return self
        for bank in self.banks.values():
            bank.configure(k=k, metric=metric)
        self.k, self.metric = k or self.k, metric or self.metric
        self.scales = {d: self._scale(b) for d, b in self.banks.items()}
        return self

    def score_settings(self) -> dict:
        return {"k": self.k, "metric": self.metric}

    def members(self) -> np.ndarray:
        """Every domain's stored vectors, stacked (source first)."""
        return np.concatenate([b.members() for b in self.banks.values()])

    def _scaled(self, queries: np.ndarray, k: int) -> np.ndarray:
        if not self.banks:
            raise BankError("the bank is empty: fit() it with normal embeddings before scoring")
        return np.stack([b.score(queries, k) / self.scales[d] for d, b in self.banks.items()])

    def score(self, queries: np.ndarray, k: int | None = None) -> np.ndarray:
        return self._scaled(queries, k or self.k).min(axis=0)

    def loo_scores(self, k: int | None = None) -> np.ndarray:
        """Each member: leave-one-out within its own domain's bank, plain score against the other bank; min."""
        k = k or self.k
        out = []
        for d, bank in self.banks.items():
            own = bank.loo_scores(k) / self.scales[d]
            members = bank.members()
            others = [b.score(members, k) / self.scales[o] for o, b in self.banks.items() if o != d]
            out.append(np.min(np.stack([own, *others]), axis=0))
        return np.concatenate(out)

    def loo_ids(self) -> list[str]:
        """The members ``loo_scores`` are given for, in its order (domain by domain)."""
        return [i for b in self.banks.values() for i in b.ids]

    def save(self, directory: str | Path) -> Path:
        d = write_meta(directory, "DomainAwareBank", k=self.k, metric=self.metric, density=self.density,
                        oversample_target=self.oversample_target, seed=self.seed, scales=self.scales)
        for domain, bank in self.banks.items():
            bank.save(d / domain)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, faiss_threads: int = 1, **_ignored) -> "DomainAwareBank":
        """The source and target banks saved in ``directory`` (sub-folders named by domain), checked as
        ``MemoryBank.load`` checks each and against ``bank.json`` (domains, scales, metric, dimension)."""
        d = Path(directory)
        meta = read_meta(d, "DomainAwareBank", {"k": int, "metric": str, "scales": dict})
        metric = choice(d, meta, "metric", METRICS)
        scales = meta["scales"]
        if not scales or not set(scales) <= {"source", "target"}:
            raise BankFolderError(d, "bank.json", f"'scales' names domains {sorted(scales)}: expected source and/or "
                                                  f"target")
        if not all(isinstance(v, NUMBER) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                   for v in scales.values()):
            raise BankFolderError(d, "bank.json", f"'scales' must be positive numbers, got {scales}")
        bank = cls(k=meta["k"], metric=metric, density=bool(meta.get("density", False)),
                   oversample_target=meta.get("oversample_target", 0), seed=meta.get("seed", 0), faiss_threads=faiss_threads)
        bank.scales = {k: float(v) for k, v in scales.items()}
        bank.banks = {dom: MemoryBank.load(d / dom, faiss_threads=faiss_threads) for dom in bank.scales}
        for dom, b in bank.banks.items():
            if b.metric != metric:
                raise BankFolderError(d, f"{dom}/bank.json", f"'metric' is {b.metric!r} but bank.json says {metric!r}")
        if len({b.dim for b in bank.banks.values()}) > 1:
            raise BankFolderError(d, "target/index.faiss", f"holds {bank.banks['target'].dim}-d vectors, source/"
                                                           f"index.faiss {bank.banks['source'].dim}-d ones")
        return bank


STRATEGIES = {"seed": MemoryBank, "domain_aware": DomainAwareBank}


def build_bank(embeddings: np.ndarray, ids: Sequence[str], domains: Sequence[str], *, strategy: str = "seed",
               k: int = 3, metric: str = "euclidean", density: bool = False, oversample_target: int = 0,
               faiss_threads: int = 1, seed: int = 0) -> "MemoryBank | DomainAwareBank":
    """The fitted bank a strategy asks for: ``seed`` (one bank of all normals) or ``domain_aware``; keywords
    are ``BankConfig``'s."""
    if strategy not in STRATEGIES:
        raise BankError(f"unknown bank strategy {strategy!r}: use 'seed' or 'domain_aware'")
    return STRATEGIES[strategy](k=k, metric=metric, density=density, oversample_target=oversample_target, seed=seed,
                                faiss_threads=faiss_threads).fit(embeddings, ids, domains=domains)
