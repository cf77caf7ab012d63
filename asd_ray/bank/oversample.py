"""SMOTE oversampling of a bank's few target-domain normals (``bank.oversample_target``). No ray here."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def smote(x: np.ndarray, total: int, *, neighbours: int = 5, seed: int = 0) -> np.ndarray:
    """SMOTE oversampling: ``x`` (n x dim) plus ``total - n`` new rows, each a + u (b - a) for a random row a,
    one of its ``neighbours`` nearest other rows b and u ~ U[0, 1); ``x`` itself when n >= total or n < 2."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n >= total or n < 2:
        return x
    rng = np.random.default_rng(seed)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    near = np.argsort(d2, axis=1)[:, :min(neighbours, n - 1)]
    a = rng.integers(n, size=total - n)
    b = near[a, rng.integers(near.shape[1], size=total - n)]
    u = rng.random((total - n, 1)).astype(np.float32)
    return np.concatenate([x, x[a] + u * (x[b] - x[a])])


def oversampled(x: np.ndarray, ids: Sequence[str] | None, domains: Sequence[str], total: int, seed: int = 0
                ) -> tuple[np.ndarray, list[str], list[str]]:
    """(x, ids, domains) with the target rows SMOTE-oversampled to ``total`` (new ids ``smote-<i>``)."""
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(x))]
    domains = [str(d) for d in domains]
    target = np.asarray(domains) == "target"
    if total > target.sum() >= 2:
        extra = smote(x[target], total, seed=seed)[target.sum():]
        x = np.concatenate([x, extra])
        ids += [f"smote-{i}" for i in range(len(extra))]
        domains += ["target"] * len(extra)
    return x, ids, domains
