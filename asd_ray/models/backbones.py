"""Backbones: a batch of 16 kHz waveforms with their lengths -> frame features -> clip embeddings.

Two kinds share one interface (``Backbone``):
- transformers audio encoders (``models/encoders.py``): HuBERT, wav2vec2, WavLM, data2vec-audio (waveform
  input) and the Audio Spectrogram Transformer, Whisper's encoder and CLAP's audio tower (spectrogram input),
  loaded with ``from_pretrained`` from a local directory or a hub id. Each frame vector of the chosen layer
  is L2-normalised along the feature axis, then mean-pooled over the clip's valid frames (SPEC §3).
- ``LogMelBackbone``: weight-free 128-band log-mel statistics, the offline default and sanity baseline.

A clip's embedding never depends on which other clips share its batch (each kind says how it keeps padding
out; ``models/encoders.py`` for the encoders).
"""

from __future__ import annotations

import torch

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
                  batch_size: int = 16) -> Backbone:
    """Backbone by name: ``logmel``, a BEATs checkpoint file (``models/beats.py``), or a transformers audio
    encoder's checkpoint directory / hub id (the families of ``models/encoders.py``). Keywords as ``EmbedConfig``
    (``batch_size`` is the caller's business; ``pooling="auto"`` is mean_std for logmel, mean for an encoder)."""
    if backbone == "logmel":
        return LogMelBackbone(n_mels=n_mels, n_fft=n_fft, hop_length=hop_length,
                              pooling="mean_std" if pooling == "auto" else pooling)
    from asd_ray.models.beats import is_beats_file, open_beats  # torch models: loaded only when asked for
    from asd_ray.models.encoders import open_encoder

    opener = open_beats if is_beats_file(backbone) else open_encoder
    return opener(backbone, layer=layer, pooling="mean" if pooling == "auto" else pooling, device=device,
                  precision=precision)
