"""Bounded subsets of a large set of normal feature vectors (a local-feature bank's members). No ray here.

``kcenter_coreset``: PatchCore's greedy k-centre selection (each pick is the vector farthest from those
picked so far), which keeps rare normal patterns (the target domain's few clips) that a random sample
would drop. ``kmeans_centroids``: FAISS k-means centroids. ``random_subset``: the plain baseline.
Every function returns at most ``size`` vectors.
"""

from __future__ import annotations

import faiss
import numpy as np


def random_subset(x: np.ndarray, size: int, *, seed: int = 0) -> np.ndarray:
    """Indices of ``min(size, n)`` rows of ``x`` (n x d) drawn without replacement, ascending."""
    n = len(x)
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def kcenter_coreset(x: np.ndarray, size: int, *, projection_dim: int = 128, seed: int = 0) -> np.ndarray:
    """Indices of ``min(size, n)`` rows of ``x`` (n x d float) chosen by greedy k-centre, in pick order.

    Distances are Euclidean, measured in a Gaussian random projection to ``projection_dim`` dimensions
    when that is smaller than d (PatchCore's speed-up; distances are kept up to a small distortion).
    The first pick is a random row; each next pick is the row farthest from every row picked so far.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if size >= n:
        return np.arange(n)
    if size < 1:
        raise ValueError(f"coreset size must be at least 1, got {size}")
    rng = np.random.default_rng(seed)
    if 0 < projection_dim < x.shape[1]:
        proj = rng.standard_normal((x.shape[1], projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        x = x @ proj
    sq = np.einsum("ij,ij->i", x, x)
    picks = np.empty(size, dtype=np.int64)
    picks[0] = int(rng.integers(n))
    # squared distance of every row to its nearest pick so far: |x|^2 - 2 x.c + |c|^2
    nearest = sq - 2.0 * (x @ x[picks[0]]) + sq[picks[0]]
    for i in range(1, size):
        j = int(np.argmax(nearest))
        picks[i] = j
        np.minimum(nearest, sq - 2.0 * (x @ x[j]) + sq[j], out=nearest)
    return picks


def kmeans_centroids(x: np.ndarray, size: int, *, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """(``min(size, n)`` x d float32) k-means centroids of the rows of ``x`` (FAISS, ``iterations`` rounds)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if size >= len(x):
        return x.copy()
    km = faiss.Kmeans(x.shape[1], size, niter=iterations, seed=seed, verbose=False,
                      max_points_per_centroid=max(1, len(x) // size + 1))
    km.train(x)
    return km.centroids.copy()
