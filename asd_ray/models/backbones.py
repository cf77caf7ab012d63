"""Backbones: a batch of 16 kHz waveforms with their lengths -> frame features -> clip embeddings.

Two kinds share one interface (``Backbone``):
- transformers audio encoders (``models/encoders.py``): HuBERT, wav2vec2, WavLM, data2vec-audio (waveform
  input) and the Audio Spectrogram Transformer, Whisper's encoder and CLAP's audio tower (spectrogram input),
  loaded with ``from_pretrained`` from a local directory or a hub id. Each frame vector of the chosen layer
  is L2-normalised along the feature axis, then mean-pooled over the clip's valid frames (SPEC §3).
- ``LogMelBackbone``: weight-free 128-band log-mel statistics, the offline default and sanity baseline.

A clip's embedding never depends on which other clips share its batch (each kind says how it keeps padding
out; ``models/encoders.py`` for the encoders).

``BackboneFrames``: the frames of a backbone with weights, before pooling, for the detectors that eat frames
(``local``, ``pooled``, ``fusion``, the AE): one vector per time step (BEATs: 160 ms, its frequency patches averaged;
HuBERT-like encoders: 20 ms), the chosen layers side by side, each L2-normalised as the clip embedding's are.
``frame_extractor`` builds them or the log-mel frames from the settings a run gives (``detect.frame_feature_kwargs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asd_ray.data.audio import pad_waveforms
from asd_ray.errors import BackboneError  # noqa: F401 - defined there, raised and re-exported here
# the interface and shared helpers live in backbone_base.py (encoders.py subclasses Backbone from there); re-exported
from asd_ray.models.backbone_base import (SAMPLE_RATE, Backbone, autocast_dtype, native_bf16,  # noqa: F401
                                          pool_frames, resolve_device)


class LogMelBackbone(Backbone):
    """128-band log-mel (n_fft 1024, hop 512, power 2) pooled to mean and std per band (256-d)."""

    l2_normalise = False

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
        return [(frames, frame_lengths)]


def load_backbone(backbone: str = "logmel", *, layer: str = "last", pooling: str = "auto", n_mels: int = 128,
                  n_fft: int = 1024, hop_length: int = 512, device: str = "auto", precision: str = "auto",
                  batch_size: int = 16, trust_remote_code: bool = False) -> Backbone:
    """Backbone by name: ``logmel``, a BEATs or EAT checkpoint file (``models/beats.py``, ``models/eat.py``; told
    apart by its contents), or a transformers audio
    encoder's checkpoint directory / hub id (the families of ``models/encoders.py``). Keywords as ``EmbedConfig``
    (``batch_size`` is the caller's business; ``pooling="auto"`` is mean_std for logmel, mean for an encoder;
    ``trust_remote_code``: a folder with its own model code, EAT's, may run it)."""
    if backbone == "logmel":
        return LogMelBackbone(n_mels=n_mels, n_fft=n_fft, hop_length=hop_length,
                              pooling="mean_std" if pooling == "auto" else pooling)
    from asd_ray.models.beats import is_beats_file, open_beats, read_torch_file  # loaded only when asked for
    from asd_ray.models.encoders import open_encoder

    kwargs = {"layer": layer, "pooling": "mean" if pooling == "auto" else pooling, "device": device,
              "precision": precision}
    if not is_beats_file(backbone):
        from asd_ray.models.encoders import encoder_family

        config, family = encoder_family(backbone, trust_remote_code=trust_remote_code)
        if family is None:  # EAT's own code, trusted
            from asd_ray.models.eat import open_remote_eat

            return open_remote_eat(backbone, config, **kwargs)
        return open_encoder(backbone, found=(config, family), **kwargs)
    from asd_ray.models.eat import is_eat_state, open_eat

    ckpt = read_torch_file(Path(backbone).expanduser(), mmap=True)  # read once; BEATs or EAT, told by its contents
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and is_eat_state(ckpt["model"]):
        return open_eat(backbone, ckpt=ckpt, **kwargs)
    return open_beats(backbone, ckpt=ckpt, **kwargs)


class BackboneFrames:
    """A backbone's frames as a frame extractor: ``embed(waveforms)`` -> per-clip (time steps x D) float32 matrices,
    the chosen layers side by side (D = the clip embedding's size under mean pooling), each frame L2-normalised
    where the backbone normalises frames before pooling; ``dim`` is None because clips differ in length. One
    padded forward pass per batch: a clip's frames are the same alone and in any batch (the backbone's own
    padding rules)."""

    dim = None

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    @torch.no_grad()
    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(waveforms):
            return []
        batch, lengths = pad_waveforms(waveforms)
        layers = self.backbone.forward(self.backbone._host_tensor(batch), torch.tensor(lengths))
        per_layer = []
        for frames, counts in layers:
            frames = frames.float()
            if self.backbone.l2_normalise:
                frames = torch.nn.functional.normalize(frames, dim=-1)
            per_layer.append((frames.cpu().numpy(), counts.tolist()))
        return [np.ascontiguousarray(np.concatenate([f[i, : int(n[i])] for f, n in per_layer], axis=1),
                                     dtype=np.float32) for i in range(len(waveforms))]


def frame_extractor(**settings):
    """The frames a frame detector eats: with ``backbone`` (``EmbedConfig``'s keywords, a backbone with weights)
    ``BackboneFrames``; else ``LogMelFrames`` (``FramesConfig``'s keywords + sample_rate)."""
    if "backbone" in settings:
        return BackboneFrames(load_backbone(**settings))
    from asd_ray.models.frames import LogMelFrames

    return LogMelFrames(**settings)
