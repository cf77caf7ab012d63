"""Layers that make a padded batch of mixed-length clips compute what each clip alone computes, and the FFT and
matrix-product forms of the encoders' convolutions (for ``models/encoders.py`` and ``models/beats.py``).

- ``PaddingExactGroupNorm``: a first conv layer's GroupNorm over time, with each clip's statistics taken over its own
  valid frames (HuBERT-Base, wav2vec2-Base), from the batch's lengths (``BatchLengths``);
- ``PaddingExactPositionalConv``: data2vec-audio's stacked positional convolutions seeing zeros past each clip's end;
- ``PositionalConvByFFT`` / ``grouped_conv_by_fft``: a long grouped positional convolution as an FFT product;
  ``single_channel_conv``: the first conv layer as a matrix product of windows (on a GPU).
"""

from __future__ import annotations

import contextlib
import threading

import torch


class BatchLengths:
    """The valid sample and frame counts of the batch in flight, per calling thread (an actor may run two batches
    at once), for the padding-exact layers; outside ``of`` there are none and those layers act as the originals."""

    def __init__(self):
        self._local = threading.local()

    @contextlib.contextmanager
    def of(self, samples: list[int], frames: torch.Tensor):
        """Context manager: the batch's valid sample counts and conv-encoder frame counts."""
        self._local.value = (samples, frames)
        try:
            yield
        finally:
            self._local.value = None

    def current(self) -> tuple[list[int], torch.Tensor] | None:
        return getattr(self._local, "value", None)


def windows_by_matmul(x: torch.Tensor) -> bool:
    """Whether the first conv layer runs as a matrix product (``single_channel_conv``): on a GPU. On a CPU the
    convolution is twice as fast (8 clips of 10 s: 0.35 s against 0.73 s on this project's 2-core machine)."""
    return x.is_cuda


def single_channel_conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a convolution of one input channel (a waveform encoder's first layer; B x 1 x T in, B x C x F
    out), computed as the product of the signal's windows (a strided view) with the kernels. cuDNN has no
    tensor-core kernel for one input channel: on an H100 (HuBERT-Base, bf16, 128 clips of 10 s) its CUDA-core
    kernels took half of the batch's GPU time, shared by this layer and the grouped positional convolution (kernel
    128), the two convolutions that did not run on tensor cores (``benchmarks/forward_profile.py``)."""
    plain = (conv.in_channels == 1 and conv.groups == 1 and conv.dilation == (1,) and conv.padding in ((0,), "valid")
             and x.dim() == 3)
    if not plain:
        return conv(x)
    windows = x[:, 0].unfold(-1, conv.kernel_size[0], conv.stride[0])  # B x F x kernel, no copy
    h = torch.matmul(conv.weight[:, 0], windows.transpose(1, 2))  # C x kernel @ B x kernel x F: B x C x F, contiguous
    if conv.bias is not None:
        h += conv.bias.to(h.dtype)[:, None]  # in the product's dtype (bf16 under autocast, as the convolution's)
    return h


def long_kernel_by_fft(x: torch.Tensor) -> bool:
    """Whether the positional convolution runs by FFT (``grouped_conv_by_fft``): on a GPU, and on a CPU under bf16
    autocast (``embed.precision=bf16``), where torch 2.11's oneDNN grouped convolution is wrong on CPUs with AMX
    (off by 2.3 on unit-scale inputs; tests/models/test_encoders.py)."""
    return x.is_cuda or (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def fft_size(n: int) -> int:
    """The smallest length >= ``n`` whose only prime factors are 2, 3 and 5 (fast for cuFFT and pocketfft)."""
    m = n
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


def grouped_conv_by_fft(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (B x C x T, zero padding, stride 1) computed by FFT in float32, returned in the dtype the
    convolution would have given (autocast's, or ``x``'s). For the transformer's positional convolution of HuBERT,
    wav2vec2 and WavLM (Base: 768 channels in 16 groups, kernel 128): cuDNN ran it on CUDA cores, and its two
    CUDA-core kernels took half of a batch's GPU time on an H100, shared with the first layer
    (``single_channel_conv``). By FFT it is a few products of 48 x 48 matrices per frequency."""
    if (conv.stride != (1,) or conv.dilation != (1,) or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or x.dim() != 3):
        return conv(x)
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    k, pad, groups = conv.kernel_size[0], conv.padding[0], conv.groups
    with torch.autocast(x.device.type, enabled=False):
        w = conv.weight.float()  # C_out x C_in/groups x k (a weight-normed conv computes it here)
        padded = x.shape[-1] + 2 * pad
        size = fft_size(padded)  # the circular wrap-around reaches only outputs below k - 1, which are dropped
        xf = torch.fft.rfft(torch.nn.functional.pad(x.float(), (pad, pad)), n=size)
        wf = torch.fft.rfft(w.flip(-1), n=size)  # correlation = convolution with the flipped kernel
        b, c_out, c_in = x.shape[0], w.shape[0], w.shape[1]
        yf = torch.einsum("bgif,goif->bgof", xf.view(b, groups, c_in, -1), wf.view(groups, c_out // groups, c_in, -1))
        y = torch.fft.irfft(yf.reshape(b, c_out, -1), n=size)[..., k - 1: padded]
        if conv.bias is not None:
            y = y + conv.bias.float()[:, None]
    return y.to(out_dtype)


class PositionalConvByFFT(torch.nn.Module):
    """The transformer's positional convolution, by FFT on a GPU (``grouped_conv_by_fft``), as itself elsewhere."""

    def __init__(self, conv: torch.nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_conv_by_fft(self.conv, x) if long_kernel_by_fft(x) else self.conv(x)


class PaddingExactGroupNorm(torch.nn.Module):
    """The first layer of a GroupNorm feature encoder (conv -> GroupNorm over time -> activation) with each clip's
    GroupNorm statistics taken over its valid frames only, so zero padding cannot leak in.

    The encoder's later convolutions have no normalisation, so their valid frames depend on valid frames only; the
    transformer masks padded frames (``attention_mask``)."""

    def __init__(self, layer: torch.nn.Module, lengths: BatchLengths):
        super().__init__()
        self.conv, self.norm, self.activation = layer.conv, layer.layer_norm, layer.activation
        self.lengths = lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = single_channel_conv(self.conv, x) if windows_by_matmul(x) else self.conv(x)
        batch = self.lengths.current()
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        frame_counts = None if batch is None else [max(1, (int(n) - k) // s + 1) for n in batch[0]]
        if frame_counts is None or min(frame_counts) >= h.shape[-1]:
            return self.activation(self.norm(h))  # no padding in this batch: the original layer, exactly
        clips, channels, frames = h.shape
        groups = self.norm.num_groups
        valid = torch.tensor(frame_counts, device=h.device)
        # Frames past a clip's valid count (zero padding, or a window straddling its end) are zeroed, so sums
        # over all frames are sums over the valid ones; statistics accumulate in fp32 (as GroupNorm under
        # autocast) without an fp32 copy of the whole batch.
        h = h.masked_fill((torch.arange(frames, device=h.device)[None, :] >= valid[:, None])[:, None, :], 0)
        per_group = h.view(clips, groups, -1)
        count = (valid * (channels // groups)).to(torch.float32)[:, None]
        mean = per_group.sum(-1, dtype=torch.float32) / count
        mean_sq = torch.linalg.vector_norm(per_group, dim=-1, dtype=torch.float32).square() / count
        inv_std = torch.rsqrt((mean_sq - mean.square()).clamp_min(0) + self.norm.eps)
        scale = self.norm.weight.float() * inv_std.repeat_interleave(channels // groups, dim=1)
        shift = self.norm.bias.float() - mean.repeat_interleave(channels // groups, dim=1) * scale
        return self.activation(torch.addcmul(shift[..., None], h, scale[..., None]))


class PaddingExactPositionalConv(torch.nn.Module):
    """One of a stack of positional convolutions (data2vec-audio) with its output zeroed past each clip's valid
    frames: the next convolution then reads zeros there, as its own zero padding gives the clip alone."""

    def __init__(self, layer: torch.nn.Module, lengths: BatchLengths):
        super().__init__()
        self.layer, self.lengths = layer, lengths

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # B x D x F
        h = self.layer(h)
        batch = self.lengths.current()
        if batch is None:
            return h
        valid = batch[1].to(h.device)
        return h.masked_fill((torch.arange(h.shape[-1], device=h.device)[None, :] >= valid[:, None])[:, None, :], 0)
