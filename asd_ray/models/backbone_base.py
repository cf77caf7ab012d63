"""The backbone interface (``Backbone``) and what every backbone shares: pooling frames into clip embeddings,
the device and the autocast dtype. ``backbones.py`` holds the log-mel backbone and ``load_backbone``;
``encoders.py`` the transformers encoders, which subclass ``Backbone`` from here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from asd_ray.data.audio import pad_waveforms
from asd_ray.errors import BackboneError  # noqa: F401 - defined there, raised and re-exported here

SAMPLE_RATE = 16_000


def pool_frames(frames: torch.Tensor, frame_lengths: torch.Tensor, *, l2_normalise: bool, pooling: str
                ) -> torch.Tensor:
    """(B x F x D frames, B valid counts) -> B x D (mean) or B x 2D (mean_std) float32, padding excluded."""
    frames = frames.float()
    if l2_normalise:
        frames = torch.nn.functional.normalize(frames, dim=-1)
    mask = (torch.arange(frames.shape[1], device=frames.device)[None, :] < frame_lengths[:, None].to(frames.device))
    m = mask.unsqueeze(-1).float()
    count = m.sum(1).clamp_min(1.0)
    mean = (frames * m).sum(1) / count
    if pooling == "mean":
        return mean
    if pooling == "mean_std":
        var = (((frames - mean[:, None, :]) ** 2) * m).sum(1) / count
        return torch.cat([mean, var.sqrt()], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}: use 'mean' or 'mean_std'")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that computes in bf16 itself (NVIDIA from Ampere on, compute capability 8; AMD).
    Older ones such as the T4 (7.5) only emulate it, far slower than fp16 on their tensor cores;
    ``torch.cuda.is_bf16_supported()`` counts the emulation as support."""
    if device.type != "cuda":
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Autocast dtype of the embedding forward pass (None: fp32). ``auto``: fp32 on the CPU, bf16 on a GPU that
    has it natively, fp16 on older GPUs (a T4)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16" or (precision == "auto" and not native_bf16(device)):
        return torch.float16
    return torch.bfloat16


class Backbone:
    """The interface: ``forward`` gives frames, ``embed`` the pooled clip embeddings."""

    name: str
    dim: int
    pooling: str  # "mean" or "mean_std", over each clip's valid frames
    l2_normalise: bool  # each frame vector to unit length before pooling

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B x T float 16 kHz, B sample counts) -> one (B x F x D frame features, B valid frame counts) per
        chosen layer; the embedding puts the layers' pooled vectors side by side."""
        raise NotImplementedError

    def embed(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """List of mono 16 kHz float arrays -> (B x dim) float32 embeddings, one per clip."""
        if not len(waveforms):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_padded(*pad_waveforms(waveforms))

    @torch.no_grad()
    def embed_padded(self, batch: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(B x T float32 zero-padded 16 kHz samples, B valid sample counts) -> (B x dim) float32 embeddings.

        One forward pass for the whole batch whatever its lengths; the result equals ``embed`` clip by clip."""
        if not len(batch):
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64)
        batch = np.asarray(batch, dtype=np.float32)[:, : int(lengths.max())]
        layers = self.forward(self._host_tensor(batch), torch.tensor(lengths))
        pooled = [pool_frames(frames, counts, l2_normalise=self.l2_normalise, pooling=self.pooling)
                  for frames, counts in layers]
        return torch.cat(pooled, dim=-1).float().cpu().numpy()

    def _host_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """The batch as a tensor on the host (a backbone on a GPU copies it to pinned memory)."""
        if not batch.flags.writeable:  # a Ray block read without a copy: torch wants memory it may write
            batch = batch.copy()
        return torch.from_numpy(np.ascontiguousarray(batch))
