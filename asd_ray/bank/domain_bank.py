"""The domain-aware clip k-NN bank (SPEC §4): separate source and target ``MemoryBank``s, each distance divided by
that bank's typical leave-one-out nearest-neighbour distance; the score is the smaller of the two. ``build_bank``:
the bank ``bank.strategy`` asks for. No ray here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from asd_ray.bank.memory_bank import METRICS, ClipBank, MemoryBank, as_matrix
from asd_ray.bank.oversample import oversampled
from asd_ray.bank.saved import NUMBER, choice, read_meta, write_meta
from asd_ray.errors import BankError, BankFolderError


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
        x = as_matrix(embeddings, None, "fit")
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
