"""BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", arXiv:2212.09058) as a backbone,
written for this project from the architecture; proven equal to the reference implementation (microsoft/unilm,
``beats/``) on fixtures it produced (``tests/fixtures/beats``, ``benchmarks/make_beats_fixtures.py``).

An official checkpoint is one ``torch.save`` file: a dict with ``cfg`` (the config keys below) and ``model`` (the
state dict, loaded here with ``strict=True``); fine-tuned ones add ``label_dict`` and a classifier (``predictor``),
which is loaded but never used. The model:
- front end: Kaldi fbank of each clip (128 mel bins, 25 ms windows 10 ms apart, of the waveform x 2^15),
  normalised as (fbank - 15.41663) / (2 x 6.55582);
- patch embedding: 16 x 16 patches of the (time x 128) fbank by a strided convolution, layer norm, a projection
  to the transformer's width; tokens in time-major order (the 8 frequency patches of one time step together);
- transformer: a grouped positional convolution (weight norm over the kernel axis) added to the tokens, then
  post-norm layers (deep norm: the residual branch scaled by (2L)^(1/4)) or pre-norm layers, attention with a
  T5-style bucketed relative position bias computed by the first layer and shared by all, each layer gating it
  by its queries (``gru_rel_pos``).

Batches: each clip's fbank is computed on its own samples, padded time patches are zeroed before the positional
convolution (as the convolution's own zero padding gives the clip alone) and are never attended to, so a clip's
tokens do not depend on the batch. (The reference computes the fbank of the zero-padded batch and maps its padding
mask onto tokens as if they were one time axis; its tokens of a padded clip differ from the clip's alone.)

Frames: the tokens of one time step (160 ms) averaged over the frequency patches, or stacked side by side
(``patches="stack"``). Layers: as the transformers encoders (``parse_layers``): 0 is the transformer's input.
"""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asd_ray.models.backbone_base import SAMPLE_RATE, BackboneError
from asd_ray.models.encoders import EncoderBackbone
from asd_ray.models.exact_layers import grouped_conv_by_fft, long_kernel_by_fft

FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # the reference's normalisation of its fbank (AudioSet statistics)
N_MELS = 128

# The config keys of an official checkpoint and their defaults (the reference's BEATsConfig); dropout, layer drop
# and the layer-wise gradient decay only act in training and are ignored here.
DEFAULTS = {
    "input_patch_size": -1, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0, "layer_norm_first": False, "deep_norm": False, "dropout": 0.1,
    "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": False, "num_buckets": 320,
    "max_distance": 1280, "gru_rel_pos": False, "finetuned_model": False, "predictor_dropout": 0.1,
    "predictor_class": 527,
}
ACTIVATIONS = ("gelu", "relu")


def gelu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x.float()).type_as(x)  # in fp32 whatever autocast chose, as the reference


class WeightNormConv(nn.Module):
    """A grouped 1-d convolution whose kernel is ``weight_v`` scaled to norm ``weight_g`` at each kernel position
    (weight norm over dim 2, parameters named as ``torch.nn.utils.weight_norm`` names them); zero padding of half
    the kernel, the last output dropped when the kernel is even, so output length = input length."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.zeros(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.kernel, self.groups = kernel, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x C x T
        v = self.weight_v
        weight = v * (self.weight_g / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
        if long_kernel_by_fft(x):  # a GPU (cuDNN runs this kernel on CUDA cores), or bf16 on a CPU (oneDNN is wrong)
            conv = types.SimpleNamespace(weight=weight, bias=self.bias, kernel_size=(self.kernel,), stride=(1,),
                                         dilation=(1,), padding=(self.kernel // 2,), padding_mode="zeros",
                                         groups=self.groups)
            y = grouped_conv_by_fft(conv, x)
        else:
            y = nn.functional.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)
        return y[..., :x.shape[-1]]


def relative_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """(length x length) bucket of each (query, key) offset key - query: half the buckets per sign; offsets below a
    quarter of the buckets exactly, larger ones log-spaced up to ``max_distance`` (T5's scheme, bidirectional)."""
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    far = exact + (torch.log(distance.float().clamp_min(1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the (gated) relative position bias."""

    def __init__(self, dim: int, heads: int, *, gated: bool, shared_bias: nn.Embedding | None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        if shared_bias is not None:
            self.relative_attention_bias = shared_bias  # one table for all layers, listed under each in state_dict
        self.gated = gated
        if gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, padded: torch.Tensor | None) -> torch.Tensor:
        """(B x N x D tokens, H x N x N position bias or None, B x N padded-token mask or None) -> B x N x D."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in
                   (self.q_proj, self.k_proj, self.v_proj))
        mask = None
        if bias is not None:
            mask = bias[None]
            if self.gated:  # each query scales the bias of its row: a * (b * grep_a - 1) + 2, a, b in (0, 1)
                gates = torch.sigmoid(self.grep_linear(q).float().view(b, self.heads, n, 2, 4).sum(-1))
                gate_a, gate_b = gates[..., :1], gates[..., 1:]
                mask = (gate_a * (gate_b * self.grep_a.float() - 1.0) + 2.0) * mask
        if padded is not None:
            blocked = torch.zeros(b, 1, 1, n, device=x.device).masked_fill(padded[:, None, None, :], float("-inf"))
            mask = blocked if mask is None else mask + blocked
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else
                                                         mask.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict, shared_bias: nn.Embedding | None):
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.self_attn = SelfAttention(dim, cfg["encoder_attention_heads"], gated=cfg["gru_rel_pos"],
                                       shared_bias=shared_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg["encoder_ffn_embed_dim"])
        self.fc2 = nn.Linear(cfg["encoder_ffn_embed_dim"], dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.pre_norm = cfg["layer_norm_first"]
        self.alpha = (2 * cfg["encoder_layers"]) ** 0.25 if cfg["deep_norm"] else 1.0
        self.activation = gelu if cfg["activation_fn"] == "gelu" else nn.functional.relu

    def feed_forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x, bias, padded):
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), bias, padded)
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, bias, padded))
        return self.final_layer_norm(x * self.alpha + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.pos_conv = nn.Sequential(WeightNormConv(dim, cfg["conv_pos"], cfg["conv_pos_groups"]))
        self.relative = cfg["relative_position_embedding"]
        self.num_buckets, self.max_distance = cfg["num_buckets"], cfg["max_distance"]
        table = nn.Embedding(cfg["num_buckets"], cfg["encoder_attention_heads"]) if self.relative else None
        self.layers = nn.ModuleList(EncoderLayer(cfg, table) for _ in range(cfg["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(dim)
        self.pre_norm = cfg["layer_norm_first"]

    def forward(self, x: torch.Tensor, padded: torch.Tensor | None) -> list[torch.Tensor]:
        """(B x N x D tokens, B x N padded mask or None) -> the hidden states: the layers' input, then each
        layer's output (the last one through the final norm of a pre-norm model)."""
        if padded is not None:
            x = x.masked_fill(padded[..., None], 0)
        x = x + nn.functional.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        if not self.pre_norm:
            x = self.layer_norm(x)
        bias = None
        if self.relative:
            buckets = relative_buckets(x.shape[1], self.num_buckets, self.max_distance, x.device)
            bias = self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1).float()  # H x N x N
        hidden = [x]
        for layer in self.layers:
            hidden.append(layer(hidden[-1], bias, padded))
        if self.pre_norm:
            hidden[-1] = self.layer_norm(hidden[-1])
        return hidden


class BEATs(nn.Module):
    """The network of an official checkpoint's ``cfg`` (module names as the reference's, so its state dict loads
    with ``strict=True``)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        patch, embed, dim = cfg["input_patch_size"], cfg["embed_dim"], cfg["encoder_embed_dim"]
        self.patch_embedding = nn.Conv2d(1, embed, kernel_size=patch, stride=patch, bias=cfg["conv_bias"])
        self.layer_norm = nn.LayerNorm(embed)
        self.post_extract_proj = nn.Linear(embed, dim) if embed != dim else None
        self.encoder = Encoder(cfg)
        self.predictor = nn.Linear(dim, cfg["predictor_class"]) if cfg["finetuned_model"] else None  # unused

    @property
    def patch(self) -> int:
        return self.cfg["input_patch_size"]

    def forward(self, fbank: torch.Tensor, time_patches: torch.Tensor) -> list[torch.Tensor]:
        """(B x F x 128 normalised fbank, zero-padded; B valid time patches per clip) -> hidden states, each
        B x (T x 128/patch) x D tokens, time-major."""
        x = self.patch_embedding(fbank[:, None])  # B x E x T x freq patches
        freq = x.shape[-1]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        steps = torch.arange(x.shape[1] // freq, device=x.device)
        padded = (steps[None, :] >= time_patches.to(x.device)[:, None]).repeat_interleave(freq, dim=1)
        return self.encoder(x, padded if bool(padded.any()) else None)


def fbank(waveform: torch.Tensor) -> torch.Tensor:
    """(samples,) float 16 kHz in [-1, 1] -> (frames x 128) normalised Kaldi fbank, frames = 1 + (samples - 400) //
    160 (25 ms windows, 10 ms apart, none past the end)."""
    import torchaudio.compliance.kaldi as kaldi

    bands = kaldi.fbank(waveform[None].float() * 2 ** 15, num_mel_bins=N_MELS, sample_frequency=SAMPLE_RATE,
                        frame_length=25, frame_shift=10)
    return (bands - FBANK_MEAN) / (2 * FBANK_STD)


def read_torch_file(path: str | Path, *, mmap: bool = False):
    """A checkpoint file's contents, read with ``weights_only=True`` (no pickled code runs; ``mmap``: tensors are
    read when used); a file that is not a torch archive, is truncated or holds pickled objects beyond tensors and
    plain types is a ``BackboneError`` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ...
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # a training run's pickled state (fairseq keeps meters, an argparse.Namespace ...)
            raise BackboneError(f"{path}: not a readable torch checkpoint: it holds pickled Python objects "
                                f"({found.group(1)}), which asd-ray does not unpickle (weights_only); where you "
                                "trust the file, save its 'cfg' and 'model' again as plain dicts and tensors") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BackboneError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first})") from None


def read_checkpoint(path: str | Path, ckpt=None) -> tuple[dict, dict]:
    """(config with defaults filled in, state dict) of an official BEATs checkpoint file, read with
    ``weights_only=True`` (or its contents ``ckpt``, already read so); anything else is a ``BackboneError`` naming
    the file."""
    ckpt = read_torch_file(path) if ckpt is None else ckpt
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("cfg"), dict) and isinstance(ckpt.get("model"), dict)):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BackboneError(f"{path}: not a BEATs checkpoint (a dict with 'cfg' and 'model', as the official "
                            f"release saves it); found {keys}")
    cfg = {**DEFAULTS, **ckpt["cfg"]}
    if cfg["activation_fn"] not in ACTIVATIONS:
        raise BackboneError(f"{path}: activation_fn {cfg['activation_fn']!r} is not supported (use one of "
                            f"{ACTIVATIONS})")
    if cfg["input_patch_size"] <= 0 or N_MELS % cfg["input_patch_size"]:
        raise BackboneError(f"{path}: input_patch_size {cfg['input_patch_size']} must divide the {N_MELS} mel bins")
    return cfg, ckpt["model"]


def load_model(path: str | Path, ckpt=None) -> BEATs:
    """The BEATs network of a checkpoint file (its contents ``ckpt`` when already read), weights loaded with
    ``strict=True``, in eval mode."""
    cfg, state = read_checkpoint(path, ckpt)
    return load_strictly(BEATs(cfg), state, f"{path}: its weights do not fit its cfg")


def load_strictly(model: nn.Module, state: dict, unfit: str) -> nn.Module:
    """``model`` with ``state`` loaded (``strict=True``), in eval mode; names that do not fit are a
    ``BackboneError``: ``unfit`` (the file and what they should fit), then torch's missing / unexpected keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise BackboneError(f"{unfit}: {' '.join(lines)[:500]}") from None
    return model.eval()


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for a state dict's names and shapes (tests and benchmarks: an official-format checkpoint
    without the release's files). Every parameter gets values that matter: norms' scales around 1, biases and
    the position table spread, weights scaled by their fan-in; the shared position table is equal under every
    layer's name, as in a checkpoint of the reference."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=gen)
        if name.endswith(("norm.weight", "grep_a", "weight_g")):
            out[name] = 1.0 + 0.1 * r
        elif name.endswith("relative_attention_bias.weight"):
            out[name] = r
        elif name.endswith("bias") or len(shape) < 2:
            out[name] = 0.1 * r
        else:
            out[name] = r / math.sqrt(math.prod(shape[1:]))
    shared = [n for n in out if n.endswith("self_attn.relative_attention_bias.weight")]
    for name in shared:
        out[name] = out[min(shared, key=lambda n: int(n.split(".")[2]))].clone()
    return out


def write_random_checkpoint(path: str | Path, cfg: dict, seed: int, **extra) -> Path:
    """Write ``{"cfg": cfg, "model": seeded weights, **extra}`` to ``path`` in the official format (a fine-tuned
    one adds ``label_dict``); returns the path."""
    model = BEATs({**DEFAULTS, **cfg})
    state = random_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed)
    torch.save({"cfg": dict(cfg), "model": state, **extra}, path)
    return Path(path)


class BEATsBackbone(EncoderBackbone):
    """A BEATs checkpoint file as a backbone: frames of the chosen layers (one per 160 ms time step: its frequency
    patches averaged, or stacked with ``patches="stack"``), each L2-normalised, pooled over the clip's time steps."""

    def __init__(self, checkpoint: str, *, ckpt=None, patches: str = "mean", **kwargs):
        """``ckpt``: the file's contents when the caller has read them (``read_torch_file``), else it is read."""
        if patches not in ("mean", "stack"):
            raise BackboneError(f"patches {patches!r}: use 'mean' or 'stack'")
        self.patches = patches
        super().__init__(checkpoint, self._load(checkpoint, ckpt), None, **kwargs)

    def _load(self, checkpoint: str, ckpt) -> nn.Module:
        return load_model(checkpoint, ckpt)

    def min_samples(self) -> int:
        """The shortest clip that gives one time patch (``patch`` fbank frames)."""
        return 400 + 160 * (self.model.patch - 1)

    @torch.no_grad()
    def tokens(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B x T padded 16 kHz samples, B counts) -> (hidden states, each B x N x D tokens time-major; B valid time
        patches). Each clip's fbank is its own (no padding reaches it)."""
        patch = self.model.patch
        short = [int(n) for n in lengths if int(n) < self.min_samples()]
        if short:
            raise BackboneError(f"{self.name}: a clip of {short[0]} samples is shorter than one BEATs patch "
                                f"({self.min_samples()} samples at 16 kHz)")
        banks = [fbank(waveforms[i, : int(n)].to(self.device)) for i, n in enumerate(lengths)]
        steps = torch.tensor([len(b) // patch for b in banks])
        padded = torch.zeros(len(banks), int(steps.max()) * patch, N_MELS, device=self.device)
        for i, b in enumerate(banks):
            padded[i, : int(steps[i]) * patch] = b[: int(steps[i]) * patch]
        with self.autocast():
            hidden = self.model(padded, steps)
        return hidden, steps

    def forward(self, waveforms, lengths):
        hidden, steps = self.tokens(waveforms, lengths)
        out = types.SimpleNamespace(last_hidden_state=hidden[-1], hidden_states=tuple(hidden))
        freq = N_MELS // self.model.patch
        layers = []
        for tokens in self.select_layers(out):
            grid = tokens.unflatten(1, (-1, freq))  # B x T x freq patches x D
            frames = grid.float().mean(2) if self.patches == "mean" else grid.flatten(2)
            layers.append((frames, steps))
        return layers


def is_beats_file(checkpoint: str) -> bool:
    """Whether ``checkpoint`` names a file (a BEATs checkpoint is one file; the transformers ones are folders)."""
    return Path(checkpoint).expanduser().is_file()


def open_beats(checkpoint: str, **kwargs) -> BEATsBackbone:
    """The backbone of a BEATs checkpoint file; keywords as ``EncoderBackbone`` (layer, pooling, device,
    precision), ``patches`` and ``ckpt``."""
    return BEATsBackbone(str(Path(checkpoint).expanduser()), **kwargs)


def clip_embedding(tokens: np.ndarray, freq: int = N_MELS // 16) -> np.ndarray:
    """(N x D tokens of one clip, time-major) -> D: frequency patches averaged per time step, each step
    L2-normalised, the mean over steps (what ``embed`` gives with ``pooling="mean"``; for fixtures and tests)."""
    frames = tokens.reshape(-1, freq, tokens.shape[-1]).mean(1)
    return (frames / np.linalg.norm(frames, axis=-1, keepdims=True)).mean(0)
