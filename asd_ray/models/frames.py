"""Log-mel frame features of the frame-level detectors (the AE baseline, the local-feature bank). No ray here.

128 log-mel bands (n_fft 1024, hop 512, power 2, 10 log10 as the DCASE baseline); ``stack_frames``
joins ``context`` consecutive frames into one window vector (5 x 128 = 640-d).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=8)
def _mel(sample_rate: int, n_fft: int, hop_length: int, n_mels: int, power: float):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                n_mels=n_mels, power=power)


def log_mel(waveform: np.ndarray, *, sample_rate: int = 16_000, n_mels: int = 128, n_fft: int = 1024,
            hop_length: int = 512, power: float = 2.0) -> np.ndarray:
    """(samples,) -> (frames x n_mels) float32, 10 log10 of the mel power (20/power log10 as the baseline)."""
    import torch  # here, not at import: a Ray driver that only builds banks never loads torch

    mel = _mel(sample_rate, n_fft, hop_length, n_mels, power)(
        torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)))
    return (20.0 / power * torch.log10(mel + np.finfo(np.float32).eps)).T.contiguous().numpy()


def stack_frames(frames: np.ndarray, context: int = 5, stride: int = 1) -> np.ndarray:
    """(T x n_mels) -> (W x context*n_mels): row w is frames w*stride .. w*stride+context-1, concatenated."""
    t, _ = frames.shape
    if t < context:
        raise ValueError(f"{t} frames: fewer than the {context} a vector stacks")
    windows = np.lib.stride_tricks.sliding_window_view(frames, context, axis=0)[::stride]
    return windows.transpose(0, 2, 1).reshape(len(windows), -1)


def frames_needed_seconds(context: int, hop_length: int, sample_rate: int) -> float:
    """The shortest clip (s) that gives ``context`` frames (the STFT is centred: 1 + samples // hop frames)."""
    return (context - 1) * hop_length / sample_rate


class LogMelFrames:
    """Frame features as a backbone-like object: ``embed(waveforms)`` -> per-clip log-mel matrices
    (frames x n_mels); ``dim`` is None because clips differ in length. Keywords: ``FramesConfig`` + sample_rate."""

    dim = None

    def __init__(self, *, sample_rate: int = 16_000, n_mels: int = 128, n_fft: int = 1024, hop_length: int = 512,
                 power: float = 2.0):
        self.kwargs = {"sample_rate": sample_rate, "n_mels": n_mels, "n_fft": n_fft, "hop_length": hop_length,
                       "power": power}

    def embed(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return [log_mel(w, **self.kwargs) for w in waveforms]
