"""EAT (Chen et al., "EAT: Self-Supervised Pre-Training with Efficient Audio Transformer", IJCAI 2024,
arXiv:2401.03497) as a backbone, written for this project from the architecture; proven equal to the reference
implementation (github.com/cwx-worst-one/EAT, its fairseq model) on fixtures it produced (``tests/fixtures/eat``,
``benchmarks/make_eat_fixtures.py``).

A checkpoint is the official release's fairseq file (``EAT-base_epoch30_pretrain.pt`` ...): one ``torch.save``
dict with ``cfg`` (``cfg["model"]``: the model's settings) and ``model`` (the state dict), read here with
``weights_only=True``. The network is read from the state dict's names and shapes (depth, width, patch size);
``cfg`` gives the heads (default width / 64) and the norm's epsilon. A pre-trained file's teacher (``_ema``) and
decoder, and a fine-tuned file's classifier (``fc_norm``, ``head``; its encoder under ``model.``) are not used;
every other weight is loaded with ``strict=True``. The model (data2vec 2.0's image encoder on fbank "images"):
- front end, as the reference's feature extraction: the waveform minus its mean, Kaldi fbank (128 mel bins,
  25 ms Hanning windows 10 ms apart, htk-compatible mel), zero-padded to 1,024 frames (10.24 s), normalised as
  (fbank - (-4.268)) / (2 x 4.569);
- patch embedding: 16 x 16 patches by a strided convolution, tokens time-major (the 8 frequency patches of one
  time step together), plus fixed 2-d sine-cosine positions; a learned CLS token in front; layer norm;
- transformer: post-norm blocks (attention, then the MLP, each residual followed by its layer norm), no final
  norm. EAT's releases are all post-norm (``layer_norm_first`` false); a pre-norm file is refused.

A clip longer than 1,024 frames is not cut (the reference cuts it): it gets the time patches it needs, and in a
batch each clip attends only to its own patches (the padding of others is masked out), so a clip's tokens do not
depend on the batch. Frames: the tokens of one 160 ms time step (the CLS token left out) averaged over the
frequency patches, or stacked (``patches="stack"``), for the time steps the clip's audio reaches.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asd_ray.models.backbone_base import SAMPLE_RATE, BackboneError
from asd_ray.models.beats import N_MELS, BEATsBackbone, load_strictly, read_torch_file
from asd_ray.models.encoders import EncoderBackbone

FBANK_MEAN, FBANK_STD = -4.268, 4.569  # the reference's normalisation of its fbank (AudioSet statistics)
TARGET_FRAMES = 1024  # the reference pads (or cuts) every clip's fbank to this many frames
PREFIX = "modality_encoders.IMAGE."
UNUSED = ("_ema", "modality_encoders.IMAGE.decoder.", "recon_proj.", "cls_proj.", "center", "fc_norm.", "head.")


def sincos_positions(dim: int, time_patches: int, freq_patches: int) -> np.ndarray:
    """(time_patches x freq_patches) x dim fixed positions, time-major: the first half of each vector encodes the
    frequency patch's index, the second half the time patch's (MAE's 2-d sine-cosine table, as the reference
    builds it: its grid's first axis is the frequency index). A checkpoint carries its own table, loaded over this."""
    def one_axis(half: int, pos: np.ndarray) -> np.ndarray:  # in float32 throughout, as the reference
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float32) / np.float32(half / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    freq, time = np.meshgrid(np.arange(freq_patches, dtype=np.float32), np.arange(time_patches, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, freq), one_axis(dim // 2, time)], axis=1).astype(np.float32)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padded: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if padded is not None:
            mask = torch.zeros(b, 1, 1, n, device=x.device, dtype=q.dtype).masked_fill(padded[:, None, None, :],
                                                                                      float("-inf"))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """A post-norm block: x + attention -> norm1 = r; r + MLP(r) -> norm2."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, padded):
        r = self.norm1(x + self.attn(x, padded))
        return self.norm2(r + self.mlp(r))


class _Holder(nn.Module):
    """A module that only names its parts (the reference's module tree, so that its state dict's names fit)."""

    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)


class EAT(nn.Module):
    """The network of an EAT checkpoint (module names as the reference's fairseq model)."""

    def __init__(self, arch: dict):
        super().__init__()
        dim, patch = arch["dim"], arch["patch"]
        self.arch = arch
        positions = nn.Parameter(torch.from_numpy(sincos_positions(dim, arch["max_time_patches"], N_MELS // patch))
                                 [None], requires_grad=False)
        norm = nn.LayerNorm(dim, eps=arch["eps"])
        image = _Holder(local_encoder=_Holder(proj=nn.Conv2d(1, dim, kernel_size=patch, stride=patch)),
                        fixed_positional_encoder=_Holder(), context_encoder=_Holder(norm=norm))
        image.fixed_positional_encoder.positions = positions
        image.extra_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_encoders = nn.ModuleDict({"IMAGE": image})
        self.blocks = nn.ModuleList(Block(dim, arch["heads"], arch["hidden"], arch["eps"])
                                    for _ in range(arch["depth"]))

    @property
    def patch(self) -> int:
        return self.arch["patch"]

    def forward(self, fbank: torch.Tensor, time_patches: torch.Tensor) -> list[torch.Tensor]:
        """(B x F x 128 normalised fbank, F a multiple of the patch; B time patches each clip attends to) -> hidden
        states (the blocks' input, then each block's output), each B x (1 + T x 128/patch) x D, the CLS token
        first, then the patch tokens time-major."""
        image = self.modality_encoders["IMAGE"]
        x = image.local_encoder.proj(fbank[:, None])  # B x D x T x freq patches
        freq, steps = x.shape[-1], x.shape[-2]
        if steps > self.arch["max_time_patches"]:
            raise BackboneError(f"a clip of {steps} time patches is longer than this EAT's positions allow "
                                f"({self.arch['max_time_patches']}, {self.arch['max_time_patches'] * 0.16:.0f} s)")
        x = x.flatten(2).transpose(1, 2) + image.fixed_positional_encoder.positions[:, : steps * freq]
        x = torch.cat([image.extra_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = image.context_encoder.norm(x)
        mine = torch.arange(steps, device=x.device)[None, :] < time_patches.to(x.device)[:, None]
        padded = torch.nn.functional.pad(~mine.repeat_interleave(freq, dim=1), (1, 0), value=False)
        padded = padded if bool(padded.any()) else None
        hidden = [x]
        for block in self.blocks:
            hidden.append(block(hidden[-1], padded))
        return hidden


def fbank(waveform: torch.Tensor) -> torch.Tensor:
    """(samples,) float 16 kHz -> (frames x 128) Kaldi fbank as EAT's reference computes it (mean removed first;
    not normalised: padding comes first, then ``normalise``)."""
    import torchaudio.compliance.kaldi as kaldi

    x = waveform.float()
    return kaldi.fbank((x - x.mean())[None], htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                       window_type="hanning", num_mel_bins=N_MELS, dither=0.0, frame_shift=10)


def normalise(bands: torch.Tensor) -> torch.Tensor:
    return (bands - FBANK_MEAN) / (FBANK_STD * 2)


def model_inputs(name: str, waveforms: torch.Tensor, lengths: torch.Tensor, patch: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B x T padded 16 kHz samples, B counts) -> (B x F x 128 normalised fbanks, B time patches of each clip's own
    padded fbank, B time patches its audio reaches). Each clip's fbank is its own, zero-padded to 1,024 frames as
    the reference pads it (or to whole patches past that), then normalised; F is the batch's longest."""
    short = [int(n) for n in lengths if int(n) < 400]
    if short:
        raise BackboneError(f"{name}: a clip of {short[0]} samples is shorter than one fbank window (400 samples "
                            "at 16 kHz)")
    banks = [fbank(waveforms[i, : int(n)].to(device)) for i, n in enumerate(lengths)]
    own = torch.tensor([max(TARGET_FRAMES, -(-len(b) // patch) * patch) // patch for b in banks])
    padded = torch.zeros(len(banks), int(own.max()) * patch, N_MELS, device=device)
    for i, b in enumerate(banks):
        padded[i, : len(b)] = b
    return normalise(padded), own, torch.tensor([-(-len(b) // patch) for b in banks])


def is_eat_state(state: dict) -> bool:
    """Whether a checkpoint's state dict is EAT's (pre-trained, or fine-tuned with its encoder under ``model.``)."""
    return any(str(k).startswith((PREFIX, "model." + PREFIX)) for k in state)


def _nested(cfg, *keys):
    """``cfg[keys[0]][keys[1]]...`` or None."""
    for key in keys:
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def architecture(path, cfg: dict, state: dict) -> dict:
    """The network's sizes, read from the weights (``cfg`` only for the heads and the norm's epsilon); a
    ``BackboneError`` naming the file for what this module does not build."""
    model_cfg = _nested(cfg, "model") or {}
    inner = _nested(model_cfg, "d2v_args", "model") or {}  # a fine-tuned file keeps the pre-trained settings there
    setting = lambda key: model_cfg.get(key, inner.get(key))  # noqa: E731
    if setting("layer_norm_first"):
        raise BackboneError(f"{path}: a pre-norm EAT (layer_norm_first); EAT's releases are post-norm and only "
                            "those are built here")
    if any(k.startswith((PREFIX + "context_encoder.blocks.", PREFIX + "alibi")) for k in state):
        raise BackboneError(f"{path}: an EAT with prenet blocks or ALiBi biases; EAT's releases have neither")
    try:
        proj = state[PREFIX + "local_encoder.proj.weight"]
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        positions = int(state[PREFIX + "fixed_positional_encoder.positions"].shape[1])
    except (KeyError, ValueError, IndexError, AttributeError) as err:
        raise BackboneError(f"{path}: not a complete EAT state dict (missing {err})") from None
    if N_MELS % patch or tuple(proj.shape[1:]) != (1, patch, patch):
        raise BackboneError(f"{path}: patch embedding of shape {tuple(proj.shape)}; EAT takes 1 x {patch} x {patch} "
                            f"patches of a {N_MELS}-bin fbank")
    heads = int(setting("num_heads") or dim // 64)
    if dim % heads:
        raise BackboneError(f"{path}: {heads} heads do not divide the width {dim}")
    return {"dim": dim, "patch": patch, "depth": depth, "hidden": hidden, "heads": heads,
            "eps": float(setting("norm_eps") or 1e-6), "max_time_patches": positions // (N_MELS // patch)}


def encoder_state(state: dict) -> dict:
    """The encoder's weights of a checkpoint's state dict: a fine-tuned file's ``model.`` prefix removed, what is
    not the encoder (``UNUSED``) left out."""
    if not any(k.startswith(PREFIX) for k in state):
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(UNUSED)}


def load_model(path: str | Path, ckpt: dict) -> EAT:
    """The EAT network of a checkpoint (``torch.load``ed ``ckpt``), weights loaded with ``strict=True``, eval mode."""
    if not (isinstance(ckpt.get("model"), dict) and is_eat_state(ckpt["model"])):
        raise BackboneError(f"{path}: not an EAT checkpoint (a dict with 'model', the state dict of the fairseq "
                            "release, whose encoder is under 'modality_encoders.IMAGE.')")
    state = encoder_state(ckpt["model"])
    return load_strictly(EAT(architecture(path, ckpt.get("cfg") or {}, state)), state,
                         f"{path}: its weights do not fit an EAT")


def random_weights(model: EAT, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for every parameter of ``model`` but the fixed positions (tests and benchmarks: an
    official-format checkpoint without the release's files): norms' scales around 1, biases and the CLS token
    spread, weights scaled by their fan-in."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in sorted(model.state_dict().items()):
        r = torch.randn(tuple(value.shape), generator=gen)
        if name.endswith("positions"):
            out[name] = value.clone()
        elif name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
            out[name] = 1.0 + 0.1 * r
        elif name.endswith("bias") or name.endswith("extra_tokens"):
            out[name] = 0.1 * r
        else:
            out[name] = r / math.sqrt(math.prod(value.shape[1:]))
    return out


def write_random_checkpoint(path: str | Path, *, dim: int, depth: int, heads: int, hidden: int, seed: int,
                            patch: int = 16, max_time_patches: int = 768, finetuned_classes: int = 0) -> Path:
    """Write a fairseq-format EAT checkpoint with seeded weights: ``{"cfg": {"model": ...}, "model": state}``; a
    fine-tuned one (``finetuned_classes``) keeps the encoder under ``model.`` beside ``fc_norm`` and ``head``."""
    arch = {"dim": dim, "patch": patch, "depth": depth, "hidden": hidden, "heads": heads, "eps": 1e-6,
            "max_time_patches": max_time_patches}
    state = random_weights(EAT(arch), seed)
    cfg = {"_name": "data2vec_multi", "depth": depth, "embed_dim": dim, "num_heads": heads, "mlp_ratio": hidden / dim,
           "norm_eps": 1e-6, "layer_norm_first": False,
           "modalities": {"image": {"patch_size": patch, "in_chans": 1, "num_extra_tokens": 1, "prenet_depth": 0,
                                    "target_length": TARGET_FRAMES, "max_length": max_time_patches}}}
    if finetuned_classes:
        gen = torch.Generator().manual_seed(seed + 1)
        state = {"model." + k: v for k, v in state.items()}
        state.update({"fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim),
                      "head.weight": torch.randn(finetuned_classes, dim, generator=gen) * 0.02,
                      "head.bias": torch.zeros(finetuned_classes)})
        cfg = {"_name": "mae_image_classification", "num_classes": finetuned_classes, "d2v_args": {"model": cfg}}
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    return Path(path)


class EATBackbone(BEATsBackbone):
    """An EAT checkpoint file as a backbone: frames of the chosen layers (one per 160 ms time step: its frequency
    patches averaged, or stacked with ``patches="stack"``), each L2-normalised, pooled over the clip's time steps.
    Layer 0 is the blocks' input (the normalised patch embeddings)."""

    def _load(self, checkpoint: str, ckpt) -> EAT:
        return load_model(checkpoint, read_torch_file(checkpoint) if ckpt is None else ckpt)

    @torch.no_grad()
    def tokens(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B x T padded 16 kHz samples, B counts) -> (hidden states without the CLS token, each B x N x D time-
        major; B time steps the clip's audio reaches)."""
        hidden, reached = self.hidden_states(waveforms, lengths)
        return [h[:, 1:] for h in hidden], reached

    @torch.no_grad()
    def hidden_states(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                     torch.Tensor]:
        """As ``tokens``, the CLS token first in each state. Each clip's fbank is its own, padded to 1,024 frames
        as the reference pads it (or to whole patches past that); a batch pads further, masked out."""
        inputs, own, reached = model_inputs(self.name, waveforms, lengths, self.model.patch, self.device)
        with self.autocast():
            return self.model(inputs, own), reached


class RemoteEATBackbone(EncoderBackbone):
    """EAT from its Hugging Face folder (``worstchan/EAT-base_epoch30_pretrain`` ...), whose model is the folder's
    own code (``trust_remote_code``), run only when the user opts in (``embed.trust_remote_code=true``). The front
    end is this module's, the reference's; the model's ``extract_features`` gives its last layer (the CLS token
    first), hence ``layer=last`` only and ``patches`` mean. The folder's code takes no padding mask: clips are run
    in groups of one padded length (1,024 frames up to 10.24 s, each longer clip its own), so a clip embeds alike
    alone and in any batch."""

    def __init__(self, checkpoint: str, model: nn.Module, **kwargs):
        if kwargs.get("layer", "last") != "last":
            raise BackboneError(f"{checkpoint!r}: an EAT folder's own code gives its last layer only; use "
                                "embed.layer=last, or the release's fairseq .pt file for other layers")
        self.patch = 16
        super().__init__(checkpoint, model, None, **kwargs)

    def forward(self, waveforms, lengths):
        inputs, own, reached = model_inputs(self.name, waveforms, lengths, self.patch, self.device)
        parts = {}
        for length in sorted(set(own.tolist())):
            rows = torch.nonzero(own == length).flatten()
            with self.autocast():
                tokens = self.model.extract_features(inputs[rows, : length * self.patch][:, None])
            parts[length] = (rows, tokens[:, 1:].float().unflatten(1, (length, N_MELS // self.patch)).mean(2))
        width = next(iter(parts.values()))[1].shape[-1]
        frames = torch.zeros(len(own), int(own.max()), width, device=self.device)
        for rows, grid in parts.values():
            frames[rows.to(self.device), : grid.shape[1]] = grid
        return [(frames, reached)]


def open_remote_eat(checkpoint: str, config, **kwargs) -> RemoteEATBackbone:
    """The backbone of an EAT folder whose model is its own code (``config``: its transformers config, read with
    ``trust_remote_code``, which the user asked for); keywords as ``EncoderBackbone``."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(checkpoint, config=config, trust_remote_code=True)
    except Exception as err:  # noqa: BLE001 - the folder's own code may raise anything
        raise BackboneError(f"cannot load backbone {checkpoint!r}: {type(err).__name__}: {err}") from None
    return RemoteEATBackbone(checkpoint, model, **kwargs)


def open_eat(checkpoint: str, **kwargs) -> EATBackbone:
    """The backbone of an EAT checkpoint file; keywords as ``BEATsBackbone`` (``ckpt``: its contents, if read)."""
    return EATBackbone(str(Path(checkpoint).expanduser()), **kwargs)
