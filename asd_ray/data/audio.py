"""Clip pre-processing (SPEC §2): decode, down-mix, resample, loudness-normalise, trim.

Each step is a small function with keyword parameters; ``preprocess_clip`` chains them as the
config says. Input that cannot be made usable raises ``ClipError`` naming the file and the reason;
input that can (other rates, several channels, silence) is handled and flagged.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf


class ClipError(Exception):
    """A clip that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Clip:
    """A pre-processed clip: mono float32 samples at ``sample_rate``, and what was done to it."""

    waveform: np.ndarray
    sample_rate: int
    loudness: float = float("nan")  # integrated loudness of the input, LUFS (-inf when silent)
    flags: list[str] = field(default_factory=list)


def source_name(source: str | Path | bytes) -> str:
    """How errors name a clip: its path, or ``audio body (n bytes)`` for a sound file's bytes."""
    return f"audio body ({len(source)} bytes)" if isinstance(source, (bytes, bytearray)) else str(source)


# Why a file cannot be opened, by the OSError that opening it raised (libsndfile says "System error." for all).
_OPEN_ERRORS = ((PermissionError, "permission denied"), (FileNotFoundError, "file not found"),
                (IsADirectoryError, "a directory, not a sound file"))
# Decoded float32 values a second of audio may take under a decode limit: 8 channels at 16 kHz (MIMII's
# recordings), or stereo at 64 kHz. A file of a higher rate or more channels gets proportionally fewer seconds.
DECODE_VALUES_PER_SECOND = 8 * 16_000
_UNKNOWN_LENGTH = 2**62  # libsndfile's frame count for a stream whose header gives none (a FLAC without it)
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def unopenable(err: OSError, path: str | Path) -> str:
    """The reason a ``ClipError`` gives for a file that ``open`` refused with ``err``."""
    for kind, words in _OPEN_ERRORS:
        if isinstance(err, kind):
            return f"{words}: {path}"
    return f"cannot open: {err.strerror or err}"


def _decode_error(err: Exception) -> str:
    """libsndfile's reason without Python's repr of the file object it was given (``<_io.BytesIO object at ...>``)."""
    reason = getattr(err, "error_string", None) or str(err)  # soundfile.LibsndfileError: the reason alone
    return _REPR.sub("the sound file", reason)


def decode(source: str | Path | bytes, decode_limit_s: float = 0.0) -> tuple[np.ndarray, int]:
    """Read a sound file (its path, or its bytes) -> (samples x channels float32, sample rate). Raises ClipError.

    A path is opened here, not by libsndfile, whose error for every file it cannot open (no permission, gone)
    is "System error.".

    ``decode_limit_s`` > 0: a file of more than that many seconds (or more than ``decode_limit_s *
    DECODE_VALUES_PER_SECOND`` samples over all channels) is refused while it is read: its header is checked
    first, and never more than the limit (plus one frame) is decoded, whatever the header claims. A small
    compressed body cannot make the reader allocate more."""
    name = source_name(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as err:
        raise ClipError(name, unopenable(err, source)) from None
    try:
        # a file by its descriptor: libsndfile reads it itself (through a Python file object: 1-2 ms more per
        # 10 s clip)
        with stream, sf.SoundFile(stream if isinstance(stream, io.BytesIO) else stream.fileno(), closefd=False) as f:
            rate, channels = int(f.samplerate), max(1, int(f.channels))
            if decode_limit_s > 0:
                limit = int(min(decode_limit_s * rate, decode_limit_s * DECODE_VALUES_PER_SECOND // channels))
                over = (f"more than the decode limit of {decode_limit_s:g} s "
                        f"({limit} frames at {rate} Hz x {channels} channels)")
                if _UNKNOWN_LENGTH > f.frames > limit:  # the header says so: refused before a sample is read
                    raise ClipError(name, f"{over}: its header says {f.frames} frames")
                data = f.read(frames=limit + 1, dtype="float32", always_2d=True)
                if len(data) > limit:  # a stream of unknown length (or a header that understates it)
                    raise ClipError(name, f"{over}: more frames than that follow")
            else:
                data = f.read(dtype="float32", always_2d=True)
    except ClipError:
        raise
    except Exception as err:  # libsndfile reports corrupt, truncated and non-audio files alike
        raise ClipError(name, f"cannot decode: {_decode_error(err)}") from None
    if data.size == 0:
        raise ClipError(name, "empty: no samples")
    if not np.isfinite(data).all():
        raise ClipError(name, f"{int((~np.isfinite(data)).sum())} NaN/Inf samples")
    return data, rate


def downmix(samples: np.ndarray) -> np.ndarray:
    """(samples x channels) -> mono (samples,) by averaging the channels."""
    return samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples.astype(np.float32)


CHANNELS = ("auto", "mix", "near", "far", "cancel", "subtract")
CANCEL_FFT, CANCEL_HOP = 1024, 256  # the cancellation's STFT (samples), whatever the rate
SUBTRACT_FLOOR = 0.05  # spectral subtraction keeps at least this fraction of the near channel's magnitude
SUBTRACT_SMOOTH = 31  # STFT bins (about 480 Hz at 16 kHz) over which its gain is median-filtered


def _far_removed(near: np.ndarray, far: np.ndarray, remove) -> np.ndarray:
    """The near channel through ``remove(N, F) -> Y`` on the two channels' STFTs (CANCEL_FFT, hop CANCEL_HOP, Hann),
    back to a float32 waveform of the near channel's length."""
    from scipy.signal import istft, stft

    frames = {"nperseg": CANCEL_FFT, "noverlap": CANCEL_FFT - CANCEL_HOP, "window": "hann"}
    size = max(len(near), CANCEL_FFT)  # a clip shorter than one STFT frame, zero-padded (it is rejected as too short)
    _, _, n = stft(np.pad(near.astype(np.float64), (0, size - len(near))), **frames)
    _, _, f = stft(np.pad(far.astype(np.float64), (0, size - len(far))), **frames)
    _, y = istft(remove(n, f), **frames)
    out = np.zeros(len(near), dtype=np.float32)
    out[: min(len(near), len(y))] = y[: len(near)]
    return out


def _least_squares_gain(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Per frequency (row), the gain g minimising sum_t |target - g source|^2 (complex or real arrays)."""
    power = (np.abs(source) ** 2).sum(axis=1)
    return (target * source.conj()).sum(axis=1) / np.maximum(power, 1e-12 * max(float(power.max()), 1e-30))


def cancel_far(near: np.ndarray, far: np.ndarray) -> np.ndarray:
    """The near channel with what the far one predicts of it removed: per frequency f, the complex least-squares
    gain H(f) = sum_t N(f,t) F*(f,t) / sum_t |F(f,t)|^2 over the clip's STFT frames, and Y = N - H F back to a
    waveform of the near channel's length. Sound that reaches both microphones alike (the factory around the
    machine) goes; what only the near microphone hears well (the machine) stays. float32."""
    return _far_removed(near, far, lambda n, f: n - _least_squares_gain(n, f)[:, None] * f)


def subtract_far(near: np.ndarray, far: np.ndarray) -> np.ndarray:
    """Magnitude spectral subtraction of the far channel from the near one: per frequency f, the least-squares gain
    of |F| on |N| over the clip's frames, median-filtered over SUBTRACT_SMOOTH bins into G(f) (a machine's tone
    heard faintly at the far microphone inflates its own bin's gain, not its neighbours'; the hall's transfer is
    smooth), |Y| = max(|N| - G |F|, SUBTRACT_FLOOR |N|) with the near channel's phase, back to a waveform. Unlike
    ``cancel_far`` it needs no phase relation between the microphones, so it also removes noise that reaches them
    incoherently (a reverberant hall), at the cost of musical noise. float32."""
    from scipy.ndimage import median_filter

    def remove(n, f):
        mag_n, mag_f = np.abs(n), np.abs(f)
        gain = median_filter(_least_squares_gain(mag_n, mag_f), size=SUBTRACT_SMOOTH, mode="nearest")
        mag = np.maximum(mag_n - gain[:, None] * mag_f, SUBTRACT_FLOOR * mag_n)
        return mag * np.exp(1j * np.angle(n))

    return _far_removed(near, far, remove)


def pick_channels(data: np.ndarray, channels: str = "auto") -> tuple[np.ndarray, list[str]]:
    """(samples x channels) -> (mono float32 samples, flags) as ``preprocess.channels`` says: a mono clip as it
    is; of more channels, their mean (``mix``, flag ``downmixed:<n>ch``), channel 0 (``near``, ``channel:near``),
    channel 1 (``far``, ``channel:far``), channel 0 with channel 1's prediction of it cancelled (``cancel``,
    ``cancelled:far``) or channel 1's magnitude subtracted from it (``subtract``, ``subtracted:far``); ``auto``:
    ``cancel`` for a two-channel clip, ``mix`` for more channels."""
    if channels not in CHANNELS:
        raise ValueError(f"preprocess.channels {channels!r}: use one of {', '.join(CHANNELS)}")
    if data.ndim == 1 or data.shape[1] == 1:
        return downmix(data), []
    if channels == "auto":  # a near/far pair (DCASE 2026): cancel, the best measured; more channels: their mean
        channels = "cancel" if data.shape[1] == 2 else "mix"
    if channels == "mix":
        return downmix(data), [f"downmixed:{data.shape[1]}ch"]
    if channels == "near":
        return np.ascontiguousarray(data[:, 0], dtype=np.float32), ["channel:near"]
    if channels == "far":
        return np.ascontiguousarray(data[:, 1], dtype=np.float32), ["channel:far"]
    if channels == "subtract":
        return subtract_far(data[:, 0], data[:, 1]), ["subtracted:far"]
    return cancel_far(data[:, 0], data[:, 1]), ["cancelled:far"]


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio.transforms as T

    return T.Resample(orig, new)


def resample(waveform: np.ndarray, orig_rate: int, rate: int = 16_000) -> np.ndarray:
    """Mono waveform at ``orig_rate`` Hz -> ``rate`` Hz (torchaudio's windowed-sinc resampler)."""
    if orig_rate == rate:
        return waveform
    import torch

    with torch.no_grad():
        return _resampler(orig_rate, rate)(torch.from_numpy(np.ascontiguousarray(waveform))).numpy()


@functools.lru_cache(maxsize=8)
def _meter(rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(rate)


def integrated_loudness(waveform: np.ndarray, rate: int) -> float:
    """ITU-R BS.1770 integrated loudness in LUFS; -inf for silence. Needs at least one 0.4 s block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns on silence; -inf is handled by the caller
        return float(_meter(rate).integrated_loudness(waveform.astype(np.float64)))


def normalise_loudness(waveform: np.ndarray, loudness: float, target_lufs: float = -23.0) -> np.ndarray:
    """Gain so that the clip's integrated loudness becomes ``target_lufs``; unmeasurable -> unchanged."""
    if not np.isfinite(loudness):
        return waveform
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (waveform * gain).astype(np.float32)


def trim_silence(waveform: np.ndarray, *, rate: int = 16_000, top_db: float = 60.0, frame: int = 1024,
                 min_seconds: float = 1.0) -> np.ndarray:
    """Drop leading/trailing frames whose energy is ``top_db`` below the loudest frame.

    The kept span never gets shorter than ``min_seconds`` (it grows around the loud part).
    """
    n = len(waveform)
    min_len = min(n, int(round(min_seconds * rate)))
    n_frames = n // frame
    if n_frames < 2:
        return waveform
    energy = np.square(waveform[: n_frames * frame].reshape(n_frames, frame), dtype=np.float64).mean(axis=1)
    peak = energy.max()
    if peak <= 0.0:
        return waveform
    loud = np.flatnonzero(10.0 * np.log10(np.maximum(energy, 1e-30) / peak) > -top_db)
    start, stop = int(loud[0]) * frame, min(n, (int(loud[-1]) + 1) * frame)
    if stop - start < min_len:
        centre = (start + stop) // 2
        start = max(0, min(centre - min_len // 2, n - min_len))
        stop = start + min_len
    if loud[-1] == n_frames - 1:
        stop = n  # the tail shorter than one frame belongs to a loud end
    return waveform[start:stop]


def preprocess_clip(path: str | Path | bytes, *, sample_rate: int = 16_000, target_lufs: float = -23.0,
                    loudness_normalise: bool = True, trim: bool = True, trim_top_db: float = 60.0,
                    trim_frame: int = 1024, min_seconds: float = 1.0, max_seconds: float = 0.0,
                    channels: str = "auto", decode_limit_s: float = 0.0) -> Clip:
    """Decode and pre-process one file (a path, or a sound file's bytes). Keyword names are those of
    ``PreprocessConfig``, and ``decode_limit_s`` (``decode``: longer files are refused while they are read;
    the HTTP service's ``serve.max_audio_seconds``).

    Returns a mono float32 Clip at ``sample_rate``. Raises ClipError for unusable files.
    """
    data, rate = decode(path, decode_limit_s)
    wave, flags = pick_channels(data, channels)  # before resampling: the cancellation's STFT is in samples
    if rate != sample_rate:
        flags.append(f"resampled:{rate}Hz")
        wave = resample(wave, rate, sample_rate)
    seconds = len(wave) / sample_rate
    # The loudness meter needs one 0.4 s block; the bank needs enough audio to describe a machine.
    if seconds < max(min_seconds, 0.4):
        raise ClipError(source_name(path), f"too short: {seconds:.3f} s < {max(min_seconds, 0.4):.3f} s")
    if max_seconds and seconds > max_seconds:
        wave = wave[: int(max_seconds * sample_rate)]
        flags.append("cut")
    loudness = integrated_loudness(wave, sample_rate)
    if not np.isfinite(loudness):
        flags.append("silent")
    elif loudness_normalise:
        wave = normalise_loudness(wave, loudness, target_lufs)
    if trim:
        trimmed = trim_silence(wave, rate=sample_rate, top_db=trim_top_db, frame=trim_frame,
                               min_seconds=min_seconds)
        if len(trimmed) != len(wave):
            flags.append("trimmed")
        wave = trimmed
    return Clip(waveform=np.ascontiguousarray(wave, dtype=np.float32), sample_rate=sample_rate,
                loudness=loudness, flags=flags)


def pad_waveforms(waveforms) -> tuple[np.ndarray, np.ndarray]:
    """List of 1-D float arrays -> (B x T_max float32, zero-padded; B lengths int64)."""
    lengths = np.array([len(w) for w in waveforms], dtype=np.int64)
    batch = np.zeros((len(waveforms), int(lengths.max()) if len(waveforms) else 0), dtype=np.float32)
    for i, w in enumerate(waveforms):
        batch[i, : len(w)] = w
    return batch, lengths


def try_preprocess(path: str | Path | bytes, **preprocess) -> tuple[Clip | None, str]:
    """``preprocess_clip`` for pipelines that go on past bad clips: (clip, "") or (None, the ClipError reason)."""
    try:
        return preprocess_clip(path, **preprocess), ""
    except ClipError as err:
        return None, err.reason
