"""Sound building blocks that both synthetic corpus styles use (style A: ``synth.py``, style B: ``synth_b.py``).

Noise of a colour or band, drifting harmonics, struck resonances, zero-phase filters, a random microphone gain,
the per-clip generator and ``CorpusStyle``, the interface a style offers ``generate_corpus``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

NO_ATTRIBUTE = {"gearbox", "slider", "ToyPet", "BandSealer"}  # DCASE has machines without attributes


def seeded_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(p).encode()) for p in parts])


def coloured_noise(rng: np.random.Generator, n: int, rate: int, exponent: float) -> np.ndarray:
    """Noise with power spectral density ~ f**exponent (0 white, -1 pink, -2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    f[0] = f[1]
    spec *= f ** (exponent / 2.0)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def band_noise(rng: np.random.Generator, n: int, rate: int, lo: float, hi: float) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz with soft edges, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    centre, width = (lo + hi) / 2, (hi - lo) / 2
    spec *= np.exp(-0.5 * ((f - centre) / max(width, 1.0)) ** 4)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def harmonics(rng, t, f0, amps, detune=None):
    """Sum of harmonics of a slowly drifting f0; ``detune`` shifts partial h to h*(1+detune[h])."""
    rate = 1.0 / (t[1] - t[0])
    drift = 1.0 + 0.004 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f0 * drift) / rate
    out = np.zeros_like(t)
    for h, a in enumerate(amps, start=1):
        if h * np.max(f0) > 7000:
            break
        mult = h * (1.0 + (detune[h - 1] if detune is not None else 0.0))
        out += a * np.sin(mult * phase + rng.uniform(0, 2 * np.pi))
    return out


def ring(rate: int, resonances, decay: float) -> np.ndarray:
    """What one strike sounds like: decaying sines at ``resonances`` Hz (the i-th decays 1 + i/2 times slower)."""
    tk = np.arange(int(rate * min(0.25, 6 * decay))) / rate
    return sum(np.exp(-tk / (decay * (1 + 0.5 * i))) * np.sin(2 * np.pi * f * tk + i)
               for i, f in enumerate(resonances))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)) + 1e-12)


def spectral_filter(x: np.ndarray, rate: int, gain_db) -> np.ndarray:
    """``x`` through a zero-phase filter whose gain in dB is ``gain_db(f)`` (f: array of Hz)."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1.0 / rate)
    spec *= 10 ** (gain_db(f) / 20)
    return np.fft.irfft(spec, len(x))


def random_gain(mix: np.ndarray, rng: np.random.Generator, lo_dbfs: float = -34, hi_dbfs: float = -20) -> np.ndarray:
    """A random microphone gain (the absolute level says nothing about the clip); float32, peak below 1."""
    gain_dbfs = rng.uniform(lo_dbfs, hi_dbfs)
    return np.clip(mix * (10 ** (gain_dbfs / 20) / rms(mix)), -0.99, 0.99).astype(np.float32)


def room(x: np.ndarray, rate: int, rng: np.random.Generator, rt60: float, wet: float) -> np.ndarray:
    """``x`` in a room: the direct sound plus exponentially decaying diffuse reverberation."""
    from scipy.signal import oaconvolve

    m = int(rt60 * rate)
    ir = rng.standard_normal(m) * np.exp(-6.9 * np.arange(m) / m)
    tail = oaconvolve(x, ir)[: len(x)]
    return x + wet * rms(x) * tail / rms(tail)


def placed(sound: np.ndarray, rng: np.random.Generator, *, rate: int, rt60: float, wet: float, snr_db: float,
           background: Callable[[], np.ndarray], microphone: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A machine's ``sound`` in its room (``room``), over ``background()`` at ``snr_db`` (plus a random 2 dB),
    through ``microphone``, at a random gain: a clip of styles B and C."""
    sound = room(sound, rate, rng, rt60, wet)
    snr = snr_db + rng.normal(0, 2.0)
    mix = sound / rms(sound) + 10 ** (-snr / 20) * background()
    return random_gain(microphone(mix), rng)


@dataclass(frozen=True)
class CorpusStyle:
    """How one corpus style draws a machine's profile and sounds its clips.

    ``draw(machine, seed)`` returns a profile with ``source_speeds`` (one per source operating point),
    ``attributes(domain, variant)`` and ``anomaly_kinds``; ``clip`` and ``noise`` take the arguments of
    :func:`asd_ray.data.synth.synth_clip` and :func:`asd_ray.data.synth.noise_clip`.
    """

    draw: Callable[[str, int], Any]
    clip: Callable[..., np.ndarray]
    noise: Callable[..., np.ndarray]
