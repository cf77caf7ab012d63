"""The official DCASE autoencoder baseline (SPEC §7): features, the dense AE, MSE and Mahalanobis scores. No ray.

Features: 128 log-mel bands (n_fft 1024, hop 512, power 2, 10 log10), 5 consecutive frames stacked
into 640-d vectors. One AE per machine on its normal train clips (source and target). Scores of a clip:
``mse``, the mean squared reconstruction error over its vectors; ``maha``, the baseline's Mahalanobis
score: for each domain d, the mean over the clip's vectors of e^T inv(C_d) e with e = x - AE(x) and C_d
the covariance of the (centred) reconstruction errors of that domain's train vectors; the smaller of
the source and target values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DOMAINS = ("source", "target")


@functools.lru_cache(maxsize=8)
def _mel(sample_rate: int, n_fft: int, hop_length: int, n_mels: int, power: float):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                n_mels=n_mels, power=power)


def log_mel(waveform: np.ndarray, *, sample_rate: int = 16_000, n_mels: int = 128, n_fft: int = 1024,
            hop_length: int = 512, power: float = 2.0) -> np.ndarray:
    """(samples,) -> (frames x n_mels) float32, 10 log10 of the mel power (20/power log10 as the baseline)."""
    mel = _mel(sample_rate, n_fft, hop_length, n_mels, power)(
        torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)))
    return (20.0 / power * torch.log10(mel + np.finfo(np.float32).eps)).T.contiguous().numpy()


def stack_frames(frames: np.ndarray, context: int = 5) -> np.ndarray:
    """(T x n_mels) -> ((T - context + 1) x context*n_mels): each row is ``context`` consecutive frames."""
    t, _ = frames.shape
    if t < context:
        raise ValueError(f"{t} frames: fewer than the {context} a vector stacks")
    return np.lib.stride_tricks.sliding_window_view(frames, context, axis=0).transpose(0, 2, 1).reshape(t - context + 1, -1)


class AEFeatures:
    """The baseline's features as a backbone-like object: ``embed(waveforms)`` -> per-clip log-mel
    matrices (frames x n_mels); ``dim`` is None because clips differ in length."""

    dim = None

    def __init__(self, *, sample_rate: int = 16_000, n_mels: int = 128, n_fft: int = 1024, hop_length: int = 512,
                 power: float = 2.0):
        self.kwargs = {"sample_rate": sample_rate, "n_mels": n_mels, "n_fft": n_fft, "hop_length": hop_length,
                       "power": power}

    def embed(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return [log_mel(w, **self.kwargs) for w in waveforms]


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


@dataclass
class AEMachineScores:
    """One machine's AE outcome: raw scores of its test clips and of its train clips, per score kind."""

    test: dict[str, np.ndarray]  # {"mse": (m,), "maha": (m,)}
    train: dict[str, np.ndarray]  # {"mse": (n,), "maha": (n,)}: for the gamma threshold
    losses: list[float]


def ae_machine(train_clips: list[np.ndarray], train_domains: list[str], test_clips: list[np.ndarray], *,
               context: int = 5, hidden: int = 128, bottleneck: int = 8, layers: int = 4, epochs: int = 100,
               batch_size: int = 256, lr: float = 1e-3, seed: int = 0, device: str = "cpu") -> AEMachineScores:
    """Train one machine's AE on its train clips' log-mel frames (each T x n_mels) and score every clip both ways."""
    vectors = [stack_frames(c, context) for c in train_clips]
    model, losses = train_autoencoder(np.concatenate(vectors), hidden=hidden, bottleneck=bottleneck,
                                      layers=layers, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                      device=device)
    del vectors  # errors are recomputed clip by clip below: memory holds one clip's, not the machine's
    acc = ErrorCovariance(train_clips[0].shape[1] * context)
    for c, d in zip(train_clips, train_domains):
        acc.add(reconstruction_errors(model, stack_frames(c, context)), d if d in DOMAINS else "source")
    precisions = acc.precisions()

    def scores(clips: list[np.ndarray]) -> dict[str, np.ndarray]:
        errs = (reconstruction_errors(model, stack_frames(c, context)) for c in clips)
        pairs = [(float((e ** 2).mean()), mahalanobis_score(e, precisions)) for e in errs]
        return {"mse": np.array([p[0] for p in pairs]), "maha": np.array([p[1] for p in pairs])}

    return AEMachineScores(test=scores(test_clips), train=scores(train_clips), losses=losses)
