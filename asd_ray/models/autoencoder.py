"""The official DCASE autoencoder baseline (SPEC §7): the dense AE, MSE and Mahalanobis scores. No ray.

Features (``models/frames.py``): 128 log-mel bands (n_fft 1024, hop 512, power 2, 10 log10), 5 consecutive
frames stacked into 640-d vectors. One AE per machine on its normal train clips (source and target). Scores of a clip:
``mse``, the mean squared reconstruction error over its vectors; ``maha``, the baseline's Mahalanobis
score: for each domain d, the mean over the clip's vectors of e^T inv(C_d) e with e = x - AE(x) and C_d
the covariance of the (centred) reconstruction errors of that domain's train vectors; the smaller of
the source and target values.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from asd_ray.models.frames import stack_frames

DOMAINS = ("source", "target")


@functools.lru_cache(maxsize=1)
def _blas():
    from threadpoolctl import ThreadpoolController  # one scan of the loaded libraries, not one per call

    return ThreadpoolController()


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch's CPU (intra-op) threads and the BLAS threads of numpy set to ``n`` inside the block, restored after.
    Float sums depend on the thread count, and through 100 epochs of training so do an AE's weights: a Ray task
    (1 thread with 1 CPU) and the driver (all cores) trained different AEs from the same clips and seed until both
    pinned the count (the BLAS pin keeps the Mahalanobis scores equal in the last bits too)."""
    if n < 1:
        raise ValueError(f"threads: {n}; use 1 or more")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with _blas().limit(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


class DenseAE(nn.Module):
    """The baseline's dense autoencoder: 640 -> 128 x4 -> 8 -> 128 x4 -> 640, BatchNorm + ReLU between."""

    def __init__(self, input_dim: int = 640, hidden: int = 128, bottleneck: int = 8, layers: int = 4):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]

        enc = block(input_dim, hidden) + sum((block(hidden, hidden) for _ in range(layers - 1)), [])
        dec = block(bottleneck, hidden) + sum((block(hidden, hidden) for _ in range(layers - 1)), [])
        self.encoder = nn.Sequential(*enc, *block(hidden, bottleneck))
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def train_autoencoder(vectors: np.ndarray, *, hidden: int = 128, bottleneck: int = 8, layers: int = 4,
                      epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                      device: str = "cpu") -> tuple[DenseAE, list[float]]:
    """Fit a ``DenseAE`` to (N x D) vectors by MSE with Adam; returns the model (eval mode) and the mean loss per epoch."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(dev)
    model = DenseAE(x.shape[1], hidden, bottleneck, layers).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen).to(dev)
        total, seen = 0.0, 0
        for b in range(0, len(x), batch_size):
            idx = order[b:b + batch_size]
            if len(idx) < 2:  # BatchNorm needs two vectors
                continue
            loss = nn.functional.mse_loss(model(x[idx]), x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        losses.append(total / max(seen, 1))
    return model.eval(), losses


@torch.no_grad()
def reconstruction_errors(model: DenseAE, vectors: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(N x D) -> (N x D) float64 errors x - AE(x)."""
    dev = next(model.parameters()).device
    out = []
    for b in range(0, len(vectors), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(vectors[b:b + batch_size], dtype=np.float32)).to(dev)
        out.append((x - model(x)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, vectors.shape[1]))


class ErrorCovariance:
    """Per-domain covariance of reconstruction-error vectors, accumulated clip by clip (float64 sums)."""

    def __init__(self, dim: int):
        self.n = {d: 0 for d in DOMAINS}
        self.s1 = {d: np.zeros(dim) for d in DOMAINS}
        self.s2 = {d: np.zeros((dim, dim)) for d in DOMAINS}

    def add(self, errors: np.ndarray, domain: str) -> None:
        e = np.asarray(errors, dtype=np.float64)
        self.n[domain] += len(e)
        self.s1[domain] += e.sum(axis=0)
        self.s2[domain] += e.T @ e

    def precisions(self) -> dict[str, np.ndarray]:
        """{domain: pseudo-inverse of the covariance of its centred errors} (a domain with fewer vectors than
        dimensions has a singular covariance); a domain without 2 vectors takes the other's."""
        out = {}
        for d in DOMAINS:
            if self.n[d] >= 2:
                mean = self.s1[d] / self.n[d]
                cov = self.s2[d] / self.n[d] - np.outer(mean, mean)
                out[d] = np.linalg.pinv(cov, hermitian=True)
        if not out:
            raise ValueError("no domain has 2 error vectors to estimate a covariance from")
        for d in DOMAINS:
            out.setdefault(d, next(iter(out.values())))
        return out


def error_precisions(errors: np.ndarray, domains: np.ndarray) -> dict[str, np.ndarray]:
    """(N x D) errors with their domains -> ``ErrorCovariance.precisions`` of them."""
    acc = ErrorCovariance(errors.shape[1])
    for d in DOMAINS:
        if (np.asarray(domains) == d).any():
            acc.add(errors[np.asarray(domains) == d], d)
    return acc.precisions()


def mahalanobis_score(errors: np.ndarray, precisions: dict[str, np.ndarray]) -> float:
    """One clip's (n x D) error vectors -> min over domains of the mean of e^T P_d e."""
    return float(min(((errors @ p) * errors).sum(axis=1).mean() for p in precisions.values()))  # BLAS, not einsum


SCORES = ("mse", "maha")


class AEDetector:
    """The AE baseline as a detector: ``fit`` trains one machine's AE on its normal train clips' log-mel
    matrices (each T x n_mels) and estimates the per-domain error covariances; ``score`` gives ``mse`` or
    ``maha`` scores (``score_kind``). Its calibration scores (``loo_scores``) are the train clips' own scores:
    an AE cannot leave a clip out without retraining, as the DCASE baseline does too. It trains and scores with
    ``threads`` torch and BLAS threads wherever it runs (``pinned_threads``): the same clips, seed and count give the
    same weights, bit for bit, in the driver and in a Ray task."""

    kind = "AEDetector"
    features = "frames"

    def __init__(self, *, score_kind: str = "maha", context: int = 5, hidden: int = 128, bottleneck: int = 8,
                 layers: int = 4, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                 threads: int = 1, device: str = "cpu"):
        if score_kind not in SCORES:
            raise ValueError(f"AE score {score_kind!r}: use one of {SCORES}")
        if threads < 1:
            raise ValueError(f"ae.threads={threads}: use 1 or more")
        self.params = {"context": context, "hidden": hidden, "bottleneck": bottleneck, "layers": layers,
                       "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads}
        self.score_kind = score_kind
        self.device = device
        self.model: DenseAE | None = None
        self.precisions: dict[str, np.ndarray] = {}
        self.train_scores = np.zeros(0)
        self.losses: list[float] = []
        self.ids: list[str] = []

    @property
    def size(self) -> int:
        return len(self.train_scores)

    @property
    def dim(self) -> int | None:
        """What a query row must have: n_mels (a query is one clip's T x n_mels matrix)."""
        return None if self.model is None else self.model.encoder[0].in_features // self.params["context"]

    def fit(self, clips: Sequence[np.ndarray], ids: Sequence[str] | None = None, *,
            domains: Sequence[str] | None = None) -> "AEDetector":
        """Train on the clips' stacked frames; error covariances per domain ("source"/"target"; others count as source)."""
        p = self.params
        if len(clips) < 2:
            raise ValueError(f"the AE needs at least 2 train clips, got {len(clips)}")
        domains = list(domains) if domains is not None else ["source"] * len(clips)
        with pinned_threads(p["threads"]):
            self._fit(clips, domains)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(clips))]
        return self

    def _fit(self, clips: Sequence[np.ndarray], domains: list[str]) -> None:
        p = self.params
        self.model, self.losses = train_autoencoder(
            np.concatenate([stack_frames(c, p["context"]) for c in clips]), hidden=p["hidden"],
            bottleneck=p["bottleneck"], layers=p["layers"], epochs=p["epochs"], batch_size=p["batch_size"],
            lr=p["lr"], seed=p["seed"], device=self.device)
        # errors clip by clip: memory holds one clip's, not the machine's
        acc = ErrorCovariance(clips[0].shape[1] * p["context"])
        for c, d in zip(clips, domains):
            acc.add(reconstruction_errors(self.model, stack_frames(c, p["context"])), d if d in DOMAINS else "source")
        self.precisions = acc.precisions()
        self.train_scores = self.score(clips)

    def score_both(self, clips: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """{"mse": (m,), "maha": (m,)} raw scores of clips (each T x n_mels)."""
        if self.model is None:
            raise ValueError("the AE is not trained: fit() it with normal clips before scoring")
        with pinned_threads(self.params["threads"]):
            errs = (reconstruction_errors(self.model, stack_frames(c, self.params["context"])) for c in clips)
            pairs = [(float((e ** 2).mean()), mahalanobis_score(e, self.precisions)) for e in errs]
        return {"mse": np.array([q[0] for q in pairs]), "maha": np.array([q[1] for q in pairs])}

    def score(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """(m,) float64 raw scores of this detector's kind (higher: more anomalous)."""
        return self.score_both(clips)[self.score_kind]

    def loo_scores(self) -> np.ndarray:
        if self.model is None:
            raise ValueError("the AE is not trained: fit() it first")
        return self.train_scores

    def loo_ids(self) -> list[str]:
        return list(self.ids)

    def save(self, directory: str | Path) -> Path:
        if self.model is None:
            raise ValueError("save: the AE is not trained")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.model.state_dict().items()}, d / "model.pt")
        np.savez(d / "calibration.npz", train_scores=self.train_scores,
                 **{f"precision_{k}": v for k, v in self.precisions.items()})
        input_dim = self.model.encoder[0].in_features
        (d / "bank.json").write_text(json.dumps({"kind": self.kind, "score_kind": self.score_kind, **self.params,
                                                 "input_dim": input_dim, "losses": self.losses,
                                                 "ids": self.ids}))
        return d

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", **_ignored) -> "AEDetector":
        d = Path(directory)
        meta = json.loads((d / "bank.json").read_text())
        det = cls(score_kind=meta["score_kind"], device=device, threads=meta.get("threads", 1), **{k: meta[k] for k in (
            "context", "hidden", "bottleneck", "layers", "epochs", "batch_size", "lr", "seed")})
        p = det.params
        det.model = DenseAE(meta["input_dim"], p["hidden"], p["bottleneck"], p["layers"])
        det.model.load_state_dict(torch.load(d / "model.pt", map_location="cpu"))
        det.model.to(device).eval()
        cal = np.load(d / "calibration.npz")
        det.train_scores = cal["train_scores"]
        det.precisions = {k: cal[f"precision_{k}"] for k in DOMAINS}
        det.losses = list(meta["losses"])
        det.ids = list(meta["ids"])
        return det
