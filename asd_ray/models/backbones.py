"""Backbones: a batch of 16 kHz waveforms with their lengths -> frame features -> clip embeddings.

Two backbones share one interface (``Backbone``):
- ``HubertBackbone``: any HuBERT / wav2vec2-family checkpoint (``transformers``), loaded with
  ``from_pretrained`` from a local directory or a hub id. Each frame vector is L2-normalised along
  the feature axis, then mean-pooled over the clip's valid frames (SPEC §3).
- ``LogMelBackbone``: weight-free 128-band log-mel statistics, the offline default and sanity baseline.

A clip's embedding never depends on which other clips share its batch: HuBERT-Base's feature
encoder uses GroupNorm over time, through which padding would leak, so its first layer is replaced
by a padding-exact one (``PaddingExactGroupNorm``: the statistics of each clip over its own valid
frames only). A batch of mixed lengths then runs in one forward pass, zero-padded, with an attention
mask, as checkpoints whose encoder uses LayerNorm always could.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asd_ray.data.audio import pad_waveforms

SAMPLE_RATE = 16_000


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded or run, naming the checkpoint."""


def pad_batch(waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D float arrays -> (B x T_max float32 tensor, zero-padded; B lengths int64)."""
    batch, lengths = pad_waveforms(waveforms)
    return torch.from_numpy(batch), torch.from_numpy(lengths)


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


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on GPU by default, fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


class Backbone:
    """The interface: ``forward`` gives frames, ``embed`` the pooled clip embeddings."""

    name: str
    dim: int

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x T float 16 kHz, B sample counts) -> (B x F x D frame features, B valid frame counts)."""
        raise NotImplementedError

    def pool(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
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
        frames, frame_lengths = self.forward(self._host_tensor(batch), torch.tensor(lengths))
        return self.pool(frames, frame_lengths).float().cpu().numpy()

    def _host_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """The batch as a tensor on the host (a backbone on a GPU copies it to pinned memory)."""
        if not batch.flags.writeable:  # a Ray block read without a copy: torch wants memory it may write
            batch = batch.copy()
        return torch.from_numpy(np.ascontiguousarray(batch))


class LogMelBackbone(Backbone):
    """128-band log-mel (n_fft 1024, hop 512, power 2) pooled to mean and std per band (256-d)."""

    def __init__(self, *, n_mels: int = 128, n_fft: int = 1024, hop_length: int = 512, pooling: str = "mean_std"):
        import torchaudio.transforms as T

        self.name = "logmel"
        self.pooling = pooling
        self.mel = T.MelSpectrogram(SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=2.0)
        self.hop_length = hop_length
        self.dim = n_mels * (2 if pooling == "mean_std" else 1)

    def forward(self, waveforms, lengths):
        # Each clip on its own: the STFT's centre padding would otherwise see the batch's zero padding.
        specs = [self.mel(waveforms[i, : int(n)]) for i, n in enumerate(lengths)]
        frame_lengths = torch.tensor([s.shape[-1] for s in specs])
        frames = torch.zeros(len(specs), int(frame_lengths.max()), specs[0].shape[0])
        for i, s in enumerate(specs):
            frames[i, : s.shape[-1]] = torch.log(s + 1e-10).T
        return frames, frame_lengths

    def pool(self, frames, frame_lengths):
        return pool_frames(frames, frame_lengths, l2_normalise=False, pooling=self.pooling)


class HubertBackbone(Backbone):
    """HuBERT / wav2vec2-family encoder from ``transformers``; L2-normalised frames, mean-pooled (768-d for Base)."""

    def __init__(self, checkpoint: str, *, layer: str = "last", pooling: str = "mean", device: str = "auto",
                 precision: str = "auto"):
        from transformers import AutoConfig, AutoModel

        self.name = checkpoint
        path = Path(checkpoint)
        looks_local = path.exists() or checkpoint.startswith((".", "/", "~"))
        if looks_local and not (path / "config.json").is_file():
            raise BackboneError(f"checkpoint directory {checkpoint!r} not found or has no config.json")
        try:
            config = AutoConfig.from_pretrained(checkpoint)
            self.model = AutoModel.from_pretrained(checkpoint, config=config)
        except Exception as err:  # transformers raises OSError, ValueError, safetensors errors ...
            raise BackboneError(f"cannot load backbone {checkpoint!r}: {type(err).__name__}: {err}") from None
        if not hasattr(self.model, "feature_extractor") or not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise BackboneError(f"{checkpoint!r} is a {type(self.model).__name__}, not a HuBERT/wav2vec2-family encoder")
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.model.eval().to(self.device)
        self.layer = layer
        self.pooling = pooling
        self.group_norm = getattr(config, "feat_extract_norm", "group") == "group"
        if self.group_norm:
            self.exact_norm = PaddingExactGroupNorm.install(self.model, checkpoint)
        self._pinned = threading.local()  # one reusable pinned buffer per calling thread
        self.normalise_input = _reads_do_normalize(path) if looks_local else False
        self.dim = config.hidden_size * (2 if pooling == "mean_std" else 1)

    def _host_tensor(self, batch):
        if self.device.type != "cuda":
            return super()._host_tensor(batch)
        # A pinned source makes the copy to the GPU asynchronous; pinning is costly, so the buffer is reused.
        buf = getattr(self._pinned, "buffer", None)
        if buf is None or buf.numel() < batch.size:
            buf = self._pinned.buffer = torch.empty(int(batch.size * 1.25), dtype=torch.float32).pin_memory()
        view = buf[: batch.size].view(batch.shape)
        view.numpy()[...] = batch
        return view

    def forward(self, waveforms, lengths):
        valid_samples = lengths.tolist()
        waveforms = waveforms.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device)
        valid = torch.arange(waveforms.shape[1], device=self.device)[None, :] < lengths[:, None]
        if self.normalise_input:  # the checkpoint's feature extractor does zero-mean unit-variance per clip
            n = lengths[:, None].float()
            mean = (waveforms * valid).sum(1, keepdim=True) / n
            std = ((((waveforms - mean) * valid) ** 2).sum(1, keepdim=True) / n).sqrt()
            waveforms = (waveforms - mean) / (std + 1e-7) * valid
        padded = any(n != waveforms.shape[1] for n in valid_samples)
        mask = valid.long() if padded else None
        want_all = self.layer != "last"
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            with self.exact_norm.valid_samples(valid_samples) if self.group_norm else contextlib.nullcontext():
                out = self.model(waveforms, attention_mask=mask, output_hidden_states=want_all)
        frames = select_layer(out, self.layer)
        frame_lengths = self.model._get_feat_extract_output_lengths(lengths).clamp(max=frames.shape[1])
        return frames, frame_lengths

    def pool(self, frames, frame_lengths):
        return pool_frames(frames, frame_lengths, l2_normalise=True, pooling=self.pooling)


class PaddingExactGroupNorm(torch.nn.Module):
    """The first layer of a GroupNorm feature encoder (conv -> GroupNorm over time -> activation) with
    each clip's GroupNorm statistics taken over its valid frames only, so zero padding cannot leak in.

    The encoder's later convolutions have no normalisation, so their valid frames depend on valid frames
    only; the transformer masks padded frames (``attention_mask``). Valid sample counts are set per call
    with ``valid_samples`` (thread-local: an actor may run two batches at once); without them the layer is
    the original one.
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.conv, self.norm, self.activation = layer.conv, layer.layer_norm, layer.activation
        self._local = threading.local()  # valid sample counts of the batch in flight, per calling thread

    @classmethod
    def install(cls, model: torch.nn.Module, checkpoint: str) -> "PaddingExactGroupNorm":
        """Replace ``model``'s first feature-encoder layer in place; returns the new layer."""
        layers = getattr(getattr(model, "feature_extractor", None), "conv_layers", None)
        first = layers[0] if layers is not None else None
        if first is None or not isinstance(getattr(first, "layer_norm", None), torch.nn.GroupNorm):
            raise BackboneError(f"{checkpoint!r}: feat_extract_norm is 'group' but the first encoder layer has no "
                                "GroupNorm; cannot make its padding exact")
        layers[0] = cls(first)
        return layers[0]

    @contextlib.contextmanager
    def valid_samples(self, counts: list[int]):
        """Context manager: the batch's valid sample counts for the forward passes inside it."""
        self._local.counts = counts
        try:
            yield
        finally:
            self._local.counts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        counts = getattr(self._local, "counts", None)
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        frame_counts = None if counts is None else [max(1, (int(n) - k) // s + 1) for n in counts]
        if frame_counts is None or min(frame_counts) >= h.shape[-1]:
            return self.activation(self.norm(h))  # no padding in this batch: the original layer, exactly
        batch, channels, frames = h.shape
        groups = self.norm.num_groups
        valid = torch.tensor(frame_counts, device=h.device)
        # Frames past a clip's valid count (zero padding, or a window straddling its end) are zeroed, so sums
        # over all frames are sums over the valid ones; statistics accumulate in fp32 (as GroupNorm under
        # autocast) without an fp32 copy of the whole batch.
        h = h.masked_fill((torch.arange(frames, device=h.device)[None, :] >= valid[:, None])[:, None, :], 0)
        per_group = h.view(batch, groups, -1)
        count = (valid * (channels // groups)).to(torch.float32)[:, None]
        mean = per_group.sum(-1, dtype=torch.float32) / count
        mean_sq = torch.linalg.vector_norm(per_group, dim=-1, dtype=torch.float32).square() / count
        inv_std = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + self.norm.eps)
        scale = self.norm.weight.float() * inv_std.repeat_interleave(channels // groups, dim=1)
        shift = self.norm.bias.float() - mean.repeat_interleave(channels // groups, dim=1) * scale
        return self.activation(torch.addcmul(shift[..., None], h, scale[..., None]))


def select_layer(outputs, layer: str) -> torch.Tensor:
    """Frames of the chosen transformer layer: "last", an index into hidden_states, or "average" of layers 1..L."""
    if layer == "last":
        return outputs.last_hidden_state
    hidden = outputs.hidden_states
    if layer == "average":
        return torch.stack([h.float() for h in hidden[1:]]).mean(0)
    try:
        return hidden[int(layer)]
    except (ValueError, IndexError):
        raise BackboneError(f"layer {layer!r}: use 'last', 'average' or an index in [-{len(hidden)}, {len(hidden) - 1}]"
                            ) from None


def _reads_do_normalize(path: Path) -> bool:
    cfg = path / "preprocessor_config.json"
    if not cfg.is_file():
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("do_normalize", False))
    except (OSError, ValueError):
        raise BackboneError(f"{cfg}: unreadable preprocessor config") from None


def load_backbone(backbone: str = "logmel", *, layer: str = "last", pooling: str = "auto", n_mels: int = 128,
                  n_fft: int = 1024, hop_length: int = 512, device: str = "auto", precision: str = "auto",
                  batch_size: int = 16) -> Backbone:
    """Backbone by name: ``logmel``, or a HuBERT checkpoint directory / hub id. Keywords as ``EmbedConfig``
    (``batch_size`` is the caller's business; ``pooling="auto"`` is mean_std for logmel, mean for HuBERT)."""
    if backbone == "logmel":
        return LogMelBackbone(n_mels=n_mels, n_fft=n_fft, hop_length=hop_length,
                              pooling="mean_std" if pooling == "auto" else pooling)
    return HubertBackbone(backbone, layer=layer, pooling="mean" if pooling == "auto" else pooling,
                          device=device, precision=precision)
