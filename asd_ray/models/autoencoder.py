"""The official DCASE autoencoder baseline (SPEC §7): the dense AE, MSE and Mahalanobis scores. No ray.

Features (``models/frames.py``): 128 log-mel bands (n_fft 1024, hop 512, power 2, 10 log10), 5 consecutive
frames stacked into 640-d vectors. One AE per machine on its normal train clips (source and target). Scores of a clip:
``mse``, the mean squared reconstruction error over its vectors; ``maha``, the baseline's Mahalanobis
score: for each domain d, the mean over the clip's vectors of e^T inv(C_d) e with e = x - AE(x) and C_d
the covariance of the (centred) reconstruction errors of that domain's train vectors; the smaller of
the source and target values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from asd_ray.bank.base import Detector
from asd_ray.bank.saved import choice, finite, one_line, read_meta, read_npz, write_meta
from asd_ray.errors import BankError, BankFolderError
from asd_ray.models.frames import stack_frames
from asd_ray.threads import one_thread

DOMAINS = ("source", "target")


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


def flat_parameters(model: nn.Module) -> nn.Parameter:
    """Move every parameter of ``model`` and its gradient into one flat buffer (each becomes a view of it) and
    return that buffer as one parameter for the optimizer. Adam is elementwise, so one update over the buffer gives
    the weights, bit for bit, that torch's Adam gives over the separate tensors (tests/models/test_autoencoder.py),
    without its per-tensor loop: on one CPU thread the AE's 38 small tensors made Adam 4.3 of a step's 15 ms.
    Gradients accumulate into the views (``backward`` adds in place into a gradient that exists): zero them with
    ``flat.grad.zero_()``, never by setting them to None."""
    params = list(model.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[offset:offset + n].view_as(p)
        p.grad = flat.grad[offset:offset + n].view_as(p)
        offset += n
    return flat


def unflatten_parameters(model: nn.Module) -> None:
    """Give each parameter of ``model`` its own storage again (after ``flat_parameters``), gradients dropped."""
    for p in model.parameters():
        p.data, p.grad = p.data.clone(), None


def train_autoencoder(vectors: np.ndarray, *, hidden: int = 128, bottleneck: int = 8, layers: int = 4,
                      epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                      device: str = "cpu") -> tuple[DenseAE, list[float]]:
    """Fit a ``DenseAE`` to (N x D) vectors by MSE with Adam; returns the model (eval mode) and the mean loss per epoch."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(dev)
    model = DenseAE(x.shape[1], hidden, bottleneck, layers).to(dev)
    flat = flat_parameters(model)
    opt = torch.optim.Adam([flat], lr=lr)
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
            batch = x[idx]
            loss = nn.functional.mse_loss(model(batch), batch)
            flat.grad.zero_()
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        losses.append(total / max(seen, 1))
    unflatten_parameters(model)
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


class AEDetector(Detector):
    """The AE baseline as a detector: ``fit`` trains one machine's AE on its normal train clips' log-mel
    matrices (each T x n_mels) and estimates the per-domain error covariances; ``score`` gives ``mse`` or
    ``maha`` scores (``score_kind``). Its calibration scores (``loo_scores``) are the train clips' own scores:
    an AE cannot leave a clip out without retraining, as the DCASE baseline does too."""

    kind = "AEDetector"
    features = "frames"
    reads = ("frames", "embed.batch_size")

    @classmethod
    def from_config(cls, config, entry, registry, *, device="cpu") -> "AEDetector":
        ae = config.ae
        return cls(**entry.options, context=ae.frames, hidden=ae.hidden, bottleneck=ae.bottleneck, layers=ae.layers,
                   epochs=ae.epochs, batch_size=ae.batch_size, lr=ae.lr, seed=ae.seed, device=device)

    @classmethod
    def frames_needed(cls, config, entry, registry) -> int:
        return config.ae.frames

    @classmethod
    def trains_a_model(cls, config, entry, registry) -> bool:
        return True

    def __init__(self, *, score_kind: str = "maha", context: int = 5, hidden: int = 128, bottleneck: int = 8,
                 layers: int = 4, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                 device: str = "cpu"):
        if score_kind not in SCORES:
            raise ValueError(f"AE score {score_kind!r}: use one of {SCORES}")
        self.params = {"context": context, "hidden": hidden, "bottleneck": bottleneck, "layers": layers,
                       "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
        self.score_kind = score_kind
        self.device = device
        self.model: DenseAE | None = None
        self.precisions: dict[str, np.ndarray] = {}
        self.train_scores = np.zeros(0)
        self.train_both: dict[str, np.ndarray] = {}  # the train clips' scores of both kinds (what adopt takes)
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
        with one_thread():  # torch's and numpy's products on one thread: the same model in every process
            return self._fit(clips, ids, domains)

    def _fit(self, clips: Sequence[np.ndarray], ids: Sequence[str] | None, domains: Sequence[str] | None
             ) -> "AEDetector":
        p = self.params
        if len(clips) < 2:
            raise ValueError(f"the AE needs at least 2 train clips, got {len(clips)}")
        domains = list(domains) if domains is not None else ["source"] * len(clips)
        self.model, self.losses = train_autoencoder(
            np.concatenate([stack_frames(c, p["context"]) for c in clips]), hidden=p["hidden"],
            bottleneck=p["bottleneck"], layers=p["layers"], epochs=p["epochs"], batch_size=p["batch_size"],
            lr=p["lr"], seed=p["seed"], device=self.device)
        # errors clip by clip: memory holds one clip's, not the machine's
        acc = ErrorCovariance(clips[0].shape[1] * p["context"])
        for c, d in zip(clips, domains):
            acc.add(reconstruction_errors(self.model, stack_frames(c, p["context"])), d if d in DOMAINS else "source")
        self.precisions = acc.precisions()
        self.train_both = self.score_both(clips)
        self.train_scores = self.train_both[self.score_kind]
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(clips))]
        return self

    def fit_key(self) -> tuple:
        """The AE and its error covariances depend on its parameters and device, not on the score kind."""
        return self.kind, tuple(sorted(self.params.items())), self.device

    def adopt(self, fitted: "AEDetector") -> "AEDetector":
        """The AE, covariances and train clips of ``fitted`` (the other score kind's detector, fitted on the same
        clips), scored with this one's kind: what its own ``fit`` would give, bit for bit (one thread both ways)."""
        if fitted.fit_key() != self.fit_key() or fitted.model is None or not fitted.train_both:
            raise BankError(f"adopt: a fitted AE with this one's parameters is needed ({fitted.fit_key()} vs "
                            f"{self.fit_key()})")
        self.model, self.precisions, self.losses = fitted.model, fitted.precisions, list(fitted.losses)
        self.train_both, self.ids = fitted.train_both, list(fitted.ids)
        self.train_scores = self.train_both[self.score_kind]
        return self

    def score_both(self, clips: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """{"mse": (m,), "maha": (m,)} raw scores of clips (each T x n_mels)."""
        if self.model is None:
            raise ValueError("the AE is not trained: fit() it with normal clips before scoring")
        with one_thread():  # the same score in every process, whatever its torch and BLAS threads
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
        write_meta(d, self.kind, score_kind=self.score_kind, **self.params, input_dim=input_dim, losses=self.losses,
                   ids=self.ids)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu", **_ignored) -> "AEDetector":
        """The AE saved in ``directory``: ``model.pt`` read as weights only (no pickled code runs) and checked
        against ``bank.json``'s sizes, ``calibration.npz`` against them; any fault is a ``BankFolderError``."""
        d = Path(directory)
        sizes = ("context", "hidden", "bottleneck", "layers", "epochs", "batch_size", "seed", "input_dim")
        meta = read_meta(d, cls.kind, {"score_kind": str, **{k: int for k in sizes}, "lr": (int, float),
                                       "losses": list, "ids": list})
        choice(d, meta, "score_kind", SCORES)
        if min(meta[k] for k in sizes if k != "seed") < 1 or meta["input_dim"] % meta["context"]:
            raise BankFolderError(d, "bank.json", f"'input_dim' {meta['input_dim']} is not 'context' {meta['context']} "
                                                  f"x n_mels (or a size is below 1)")
        det = cls(score_kind=meta["score_kind"], device=device, **{k: meta[k] for k in sizes[:-1] + ("lr",)})
        p = det.params
        det.model = DenseAE(meta["input_dim"], p["hidden"], p["bottleneck"], p["layers"])
        if not (d / "model.pt").is_file():
            raise BankFolderError(d, "model.pt", "missing (the AE's weights)")
        try:
            weights = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused (code in the file), truncated zip, not a torch file ...
            raise BankFolderError(d, "model.pt", f"cannot be read as weights only ({one_line(err, 160)})") from None
        try:
            det.model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise BankFolderError(d, "model.pt", f"does not fit bank.json's sizes ({one_line(err, 160)})") from None
        det.model.to(device).eval()
        dim = meta["input_dim"]
        cal = read_npz(d, "calibration.npz", ["train_scores", *(f"precision_{k}" for k in DOMAINS)])
        det.train_scores = finite(d, "calibration.npz", "train_scores", cal["train_scores"], (None,))
        det.precisions = {k: finite(d, "calibration.npz", f"precision_{k}", cal[f"precision_{k}"], (dim, dim))
                          for k in DOMAINS}
        det.losses = list(meta["losses"])
        det.ids = [str(i) for i in meta["ids"]]
        if not len(det.ids) or len(det.train_scores) != len(det.ids):
            raise BankFolderError(d, "calibration.npz", f"{len(det.train_scores)} train scores for {len(det.ids)} "
                                                        f"train clips in bank.json")
        return det
