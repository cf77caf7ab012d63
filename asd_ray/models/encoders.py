"""transformers audio encoders as backbones: one family table (``FAMILIES``), a small adapter per family.

A checkpoint's ``model_type`` picks its family; anything else (a text model, an image model, an audio model of
another family) is a ``BackboneError`` naming the checkpoint.

- Waveform input, conv feature encoder (``WaveformBackbone``): HuBERT, wav2vec2, WavLM, data2vec-audio. Frames:
  the conv encoder's, 20 ms apart. A padded batch of mixed lengths runs in one forward pass with an attention
  mask, and padding cannot leak into a clip's frames: a first conv layer with GroupNorm over time (HuBERT-Base,
  wav2vec2-Base) takes each clip's statistics over its own valid frames (``PaddingExactGroupNorm``), and
  data2vec-audio's stacked positional convolutions see zeros past each clip's end, as its own zero padding gives
  the clip alone (``PaddingExactPositionalConv``). These families also take masked-prediction fine-tuning.
- Spectrogram input, fixed window (``SpectrogramBackbone``): the Audio Spectrogram Transformer (``ASTModel``),
  Whisper's encoder and CLAP's audio tower (of a ``ClapModel``, or a ``ClapAudioModel`` saved alone). The
  checkpoint's feature extractor makes the model's input from each window of a clip, resampled first when it
  wants another rate than 16 kHz (CLAP: 48 kHz). A clip no longer than the window is one window, which the
  extractor pads; a longer clip is covered by ceil(length / window) full windows, evenly spaced from its start to
  its end, and its frames are those of all its windows (windows of equal frame counts: their average). Each window
  runs on its own, so other clips of a batch cannot change a clip's embedding. Frames left out of the pool are
  those that cover only a short clip's padding (AST's patches, Whisper's frames); attention still sees that
  padding, as it does for the clip alone.

Layers (``layer``): ``last`` (the model's output), an index into its hidden states (0: the input embeddings),
``average`` (the mean of hidden states 1..L, which must share one shape) or several indices, ``"4,8,12"``: each
layer pooled on its own and the pooled vectors side by side (layers of different widths stack, as CLAP's stages).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch

from asd_ray.models.backbone_base import SAMPLE_RATE, Backbone, BackboneError, autocast_dtype, resolve_device
from asd_ray.models.exact_layers import (BatchLengths, PaddingExactGroupNorm, PaddingExactPositionalConv,
                                         PositionalConvByFFT)
from asd_ray.models.hub import check_available

PREPROCESSOR_FILE = "preprocessor_config.json"  # where save_pretrained puts a feature extractor


def parse_layers(layer: str) -> tuple[str | int, ...]:
    """A ``layer`` setting -> the layers pooled: ("last",), ("average",), (6,) or a stack (4, 8, 12)."""
    if layer in ("last", "average"):
        return (layer,)
    try:
        return tuple(int(part) for part in layer.split(","))
    except ValueError:
        raise BackboneError(f"layer {layer!r}: use 'last', 'average', an index into the hidden states or several "
                            "indices such as '4,8,12'") from None


class EncoderBackbone(Backbone):
    """A transformers audio encoder: the frames of the chosen layers, each frame L2-normalised, mean-pooled (or
    mean and std) over a clip's valid frames. Subclasses say how a batch becomes frames (``forward``)."""

    l2_normalise = True

    def __init__(self, checkpoint: str, model: torch.nn.Module, extractor, *, layer: str = "last",
                 pooling: str = "mean", device: str = "auto", precision: str = "auto"):
        self.name = checkpoint
        self.extractor = extractor
        self.layer, self.layers = layer, parse_layers(layer)
        self.pooling = pooling
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.model = self._encoder(model).eval().to(self.device)
        # The width depends on the layers chosen (a stack; CLAP's stages differ): measured on a second of silence,
        # which also checks the layer choice and the checkpoint at load rather than on the first batch.
        try:
            self.dim = self.embed([np.zeros(SAMPLE_RATE, dtype=np.float32)]).shape[1]
        except BackboneError:
            raise
        except Exception as err:  # a checkpoint whose parts disagree (model and extractor windows, ...)
            raise BackboneError(f"backbone {checkpoint!r} fails on one second of silence: {type(err).__name__}: "
                                f"{err}") from None

    def _encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the loaded model that embeds, ready for padded batches."""
        return model

    @property
    def all_layers(self) -> bool:
        """Whether the forward pass must return every hidden state."""
        return self.layers != ("last",)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def select_layers(self, outputs) -> list[torch.Tensor]:
        """The model's outputs of the chosen layers, in the model's own layout."""
        if self.layers == ("last",):
            return [outputs.last_hidden_state]
        hidden = outputs.hidden_states
        if self.layers == ("average",):
            shapes = sorted({tuple(h.shape[1:]) for h in hidden[1:]})
            if len(shapes) > 1:
                raise BackboneError(f"layer 'average' of {self.name!r}: its layers differ in shape {shapes}; "
                                    "choose one index or several ('1,2')")
            return [torch.stack([h.float() for h in hidden[1:]]).mean(0)]
        try:
            return [hidden[i] for i in self.layers]
        except IndexError:
            raise BackboneError(f"layer {self.layer!r}: {self.name!r} has {len(hidden)} hidden states; use 'last', "
                                f"'average' or indices in [-{len(hidden)}, {len(hidden) - 1}]") from None


class WaveformBackbone(EncoderBackbone):
    """HuBERT, wav2vec2, WavLM, data2vec-audio: the raw waveform in, the conv feature encoder's frames out."""

    def __init__(self, checkpoint: str, model: torch.nn.Module, extractor, **kwargs):
        if extractor is not None and extractor.sampling_rate != SAMPLE_RATE:
            raise BackboneError(f"{checkpoint!r} wants {extractor.sampling_rate} Hz audio; the corpus is "
                                f"pre-processed to {SAMPLE_RATE} Hz")
        # the checkpoint's feature extractor standardises each clip (zero mean, unit variance) when it says so
        self.normalise_input = bool(getattr(extractor, "do_normalize", False))
        self.lengths = BatchLengths()
        self._pinned = threading.local()  # one reusable pinned buffer per calling thread
        super().__init__(checkpoint, model, extractor, **kwargs)

    def _encoder(self, model):
        convs = model.feature_extractor.conv_layers
        if isinstance(getattr(convs[0], "layer_norm", None), torch.nn.GroupNorm):
            convs[0] = PaddingExactGroupNorm(convs[0], self.lengths)
        positional = getattr(model.encoder.pos_conv_embed, "layers", None)  # a stack (data2vec-audio), not one conv
        for i, conv in enumerate(positional or ()):
            positional[i] = PaddingExactPositionalConv(conv, self.lengths)
        one = getattr(model.encoder.pos_conv_embed, "conv", None)  # HuBERT, wav2vec2, WavLM: one long grouped conv
        if isinstance(one, torch.nn.Conv1d):
            model.encoder.pos_conv_embed.conv = PositionalConvByFFT(one)
        return model

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
        if self.normalise_input:
            n = lengths[:, None].float()
            mean = (waveforms * valid).sum(1, keepdim=True) / n
            std = ((((waveforms - mean) * valid) ** 2).sum(1, keepdim=True) / n).sqrt()
            waveforms = (waveforms - mean) / (std + 1e-7) * valid
        padded = any(n != waveforms.shape[1] for n in valid_samples)
        frame_counts = self.model._get_feat_extract_output_lengths(lengths)
        with self.autocast(), self.lengths.of(valid_samples, frame_counts):
            out = self.model(waveforms, attention_mask=valid.long() if padded else None,
                             output_hidden_states=self.all_layers)
        return [(frames, frame_counts.clamp(max=frames.shape[1])) for frames in self.select_layers(out)]


def clip_windows(length: int, size: int) -> list[tuple[int, int]]:
    """(start, samples) of the windows of ``size`` samples that cover a clip of ``length``: the clip itself when it
    fits, else ceil(length / size) full windows, evenly spaced, the first at its start and the last at its end."""
    if length <= size:
        return [(0, length)]
    return [(int(start), size) for start in np.linspace(0, length - size, math.ceil(length / size)).round()]


def clip_frames(tokens: torch.Tensor, valid: list[int], owners: list[int], clips: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x N x D tokens of W windows, each window's valid token count, each window's clip) -> (B x F x D: each
    clip's valid tokens of all its windows in order, zero-padded; B counts)."""
    pieces: list[list[torch.Tensor]] = [[] for _ in range(clips)]
    for window, (clip, n) in enumerate(zip(owners, valid)):
        pieces[clip].append(tokens[window, :n])
    frames = [torch.cat(p) for p in pieces]
    return torch.nn.utils.rnn.pad_sequence(frames, batch_first=True), torch.tensor([len(f) for f in frames])


class SpectrogramBackbone(EncoderBackbone):
    """A fixed-window spectrogram model: each clip's windows -> the checkpoint's feature extractor -> the model.
    A family says what its extractor's window is, which of the extractor's outputs the model takes, how a layer's
    output becomes time-ordered tokens and how many of a window's tokens see the clip."""

    inputs: tuple[str, ...]  # the feature extractor's outputs that the model takes

    def __init__(self, checkpoint: str, model: torch.nn.Module, extractor, **kwargs):
        self.rate = extractor.sampling_rate  # the extractor's; windows are resampled to it
        super().__init__(checkpoint, model, extractor, **kwargs)

    def window_samples(self) -> int:
        """The extractor's window, in 16 kHz samples."""
        raise NotImplementedError

    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """One layer's output for W windows -> W x N x D tokens, time-major."""
        raise NotImplementedError

    def valid_tokens(self, samples: int, tokens: int) -> int:
        """How many of a window's ``tokens`` see the clip when the window holds ``samples`` of it (16 kHz)."""
        raise NotImplementedError

    def forward(self, waveforms, lengths):
        import torchaudio.functional as AF

        spans = [(clip, start, n) for clip, length in enumerate(lengths.tolist())
                 for start, n in clip_windows(length, self.window_samples())]
        cuts = [waveforms[clip, start:start + n] for clip, start, n in spans]
        if self.rate != SAMPLE_RATE:
            cuts = [AF.resample(w, SAMPLE_RATE, self.rate) for w in cuts]
        features = self.extractor([w.numpy() for w in cuts], sampling_rate=self.rate, return_tensors="pt")
        with self.autocast():
            out = self.model(**{k: features[k].to(self.device) for k in self.inputs},
                             output_hidden_states=self.all_layers)
        owners = [clip for clip, _, _ in spans]
        layers = []
        for hidden in self.select_layers(out):
            tokens = self.tokens(hidden)
            valid = [self.valid_tokens(n, tokens.shape[1]) for _, _, n in spans]
            layers.append(clip_frames(tokens, valid, owners, len(lengths)))
        return layers


class ASTBackbone(SpectrogramBackbone):
    """Audio Spectrogram Transformer: Kaldi fbank frames (25 ms long, 10 ms apart) in a window of ``max_length``
    frames (10.24 s for AudioSet checkpoints); frames = its patch tokens, time-major (CLS and distillation left out)."""

    inputs = ("input_values",)
    FRAME, HOP = SAMPLE_RATE // 40, SAMPLE_RATE // 100  # Kaldi's 25 ms and 10 ms, the extractor's defaults

    def window_samples(self):
        return self.FRAME + self.HOP * (self.extractor.max_length - 1)

    def tokens(self, hidden):
        freq, time = self.model.embeddings.get_shape(self.model.config)
        patches = hidden[:, 2:].unflatten(1, (freq, time))  # the patch conv's output order: frequency-major
        return patches.transpose(1, 2).flatten(1, 2)

    def valid_tokens(self, samples, tokens):
        freq, time = self.model.embeddings.get_shape(self.model.config)
        frames = max(1, 1 + (samples - self.FRAME) // self.HOP)
        return freq * min(time, math.ceil(frames / self.model.config.time_stride))


class WhisperBackbone(SpectrogramBackbone):
    """Whisper's encoder: a log-mel window of ``chunk_length`` (30 s for OpenAI's checkpoints), encoder frames two
    mel hops (20 ms) apart."""

    inputs = ("input_features",)

    def _encoder(self, model):
        return model.encoder

    def window_samples(self):
        return self.extractor.n_samples * SAMPLE_RATE // self.rate

    def tokens(self, hidden):
        return hidden

    def valid_tokens(self, samples, tokens):
        return min(tokens, math.ceil(samples * self.rate / SAMPLE_RATE / (2 * self.extractor.hop_length)))


class ClapBackbone(SpectrogramBackbone):
    """CLAP's audio tower (HTSAT): a 48 kHz log-mel window of ``max_length_s`` (10 s), a short clip filled as the
    extractor's ``padding`` says (repeated); frames = all tokens of a layer (the tower folds time into an image, so
    no token covers padding alone)."""

    inputs = ("input_features", "is_longer")

    def _encoder(self, model):
        return getattr(model, "audio_model", model)  # a ClapModel's audio tower, or a ClapAudioModel itself

    def window_samples(self):
        return self.extractor.nb_max_samples * SAMPLE_RATE // self.rate

    def tokens(self, hidden):
        return hidden.flatten(2).transpose(1, 2)  # B x C x H x W -> B x HW x C

    def valid_tokens(self, samples, tokens):
        return tokens


# model_type -> (adapter, the transformers class that loads it: AutoModel wherever AutoModel maps the type)
FAMILIES: dict[str, tuple[type[EncoderBackbone], str]] = {
    "hubert": (WaveformBackbone, "AutoModel"),
    "wav2vec2": (WaveformBackbone, "AutoModel"),
    "wavlm": (WaveformBackbone, "AutoModel"),
    "data2vec-audio": (WaveformBackbone, "AutoModel"),
    "audio-spectrogram-transformer": (ASTBackbone, "AutoModel"),
    "whisper": (WhisperBackbone, "AutoModel"),
    "clap": (ClapBackbone, "AutoModel"),
    "clap_audio_model": (ClapBackbone, "ClapAudioModel"),  # CLAP's audio tower saved alone: AutoModel maps no class
}


REMOTE_EAT = "eat"  # the model_type of EAT's Hugging Face folders, whose model is their own code


class RemoteCodeRefused(BackboneError):
    """A checkpoint folder with its own model code, refused for want of ``trust_remote_code``."""


def encoder_family(checkpoint: str, setting: str = "embed.backbone", trust_remote_code: bool = False):
    """(transformers config, (adapter, loader class name)) of a checkpoint (the value of ``setting``); reads its
    config only. A missing directory or a hub id that cannot be fetched here is a one-line ``BackboneError``; so
    is a folder with its own model code unless ``trust_remote_code`` (then only EAT's: ``REMOTE_EAT``)."""
    from transformers import AutoConfig

    check_available(checkpoint, setting)
    try:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError ...
        if "trust_remote_code" in str(err):
            raise RemoteCodeRefused(f"{checkpoint!r} holds its own model code (config.json's auto_map), which "
                                    "asd-ray runs only with --set embed.trust_remote_code=true: that code runs with "
                                    "your permissions, so pass it only for a folder you trust (EAT's Hugging Face "
                                    "folders are such; EAT's fairseq .pt files need no code)") from None
        raise BackboneError(f"cannot load backbone {checkpoint!r}: {type(err).__name__}: {err}") from None
    if trust_remote_code and config.model_type == REMOTE_EAT:
        return config, None
    if config.model_type not in FAMILIES:
        classes = ", ".join(getattr(config, "architectures", None) or ())
        kind = f"{config.model_type!r} checkpoint" + (f" ({classes})" if classes else "")
        raise BackboneError(f"{checkpoint!r} is a {kind}, not an audio encoder asd-ray embeds with; supported model "
                            f"types: {', '.join(FAMILIES)} (and {REMOTE_EAT!r}, EAT's own code, with "
                            "embed.trust_remote_code=true)")
    return config, FAMILIES[config.model_type]


def feature_extractor(checkpoint: str, *, required: bool):
    """The checkpoint's feature extractor (``AutoFeatureExtractor``), or None when it has none and need not."""
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(checkpoint)
    except OSError as err:  # transformers' word for a missing (or unreadable) preprocessor_config.json
        if required or (Path(checkpoint) / PREPROCESSOR_FILE).is_file():
            raise BackboneError(f"{checkpoint!r}: no usable feature extractor ({PREPROCESSOR_FILE}, written next to "
                                f"the weights by the extractor's save_pretrained): {err}") from None
        return None


def open_encoder(checkpoint: str, *, layer: str = "last", pooling: str = "mean", device: str = "auto",
                 precision: str = "auto", found=None) -> EncoderBackbone:
    """The backbone of a transformers audio encoder checkpoint (directory or hub id) of a family in ``FAMILIES``
    (``found``: what ``encoder_family`` said of it, when the caller asked already)."""
    import transformers

    config, (adapter, loader) = found or encoder_family(checkpoint)
    try:
        model = getattr(transformers, loader).from_pretrained(checkpoint, config=config)
    except Exception as err:  # missing or broken weights: OSError, ValueError, safetensors errors ...
        raise BackboneError(f"cannot load backbone {checkpoint!r}: {type(err).__name__}: {err}") from None
    extractor = feature_extractor(checkpoint, required=issubclass(adapter, SpectrogramBackbone))
    return adapter(checkpoint, model, extractor, layer=layer, pooling=pooling, device=device, precision=precision)


def check_finetunable(checkpoint: str) -> None:
    """Masked-prediction fine-tuning masks the frames of a conv feature encoder (``mask_time_indices``): the
    waveform families take it; any other checkpoint is a ``BackboneError`` naming it and its family."""
    takers = ", ".join(t for t, (a, _) in FAMILIES.items() if issubclass(a, WaveformBackbone))
    if Path(checkpoint).expanduser().is_file():
        raise BackboneError(f"{checkpoint!r} is a file (a BEATs or EAT checkpoint): fine-tuning supports the "
                            f"transformers waveform models with a conv feature encoder ({takers}), not BEATs or EAT")
    try:
        config, (adapter, _) = encoder_family(checkpoint, "finetune.init")
    except RemoteCodeRefused:
        raise BackboneError(f"{checkpoint!r} is a folder with its own model code (EAT's Hugging Face release): "
                            f"fine-tuning supports the transformers waveform models with a conv feature encoder "
                            f"({takers})") from None
    if not issubclass(adapter, WaveformBackbone):
        raise BackboneError(f"{checkpoint!r} is a {config.model_type!r} checkpoint (spectrogram input): masked-"
                            f"prediction fine-tuning needs a waveform model with a conv feature encoder ({takers})")
