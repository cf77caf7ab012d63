"""DCASE 2026's recording set-up for the synthetic corpus (``generate_corpus(..., year=2026)``): two channels.

Every clip is one two-channel WAV, channel 0 the microphone near the machine, channel 1 a far one that hears more
of the factory, with the 2026 machine names and clip lengths (6 to 16 s by machine type). A clip of any corpus
style is the machine as the near microphone would hear it alone; this module adds the factory:

- factory noise that reaches both microphones, each through a short response of its own: a bed of pink noise and
  transient events at random times (impacts that ring, compressed-air bursts, a passing vehicle's rumble). In
  normal and anomalous clips alike, so a detector of the near channel alone takes some of them for anomalies;
- the machine reaches the far microphone weak, late and dull (about -22 dB, a few ms, a low-pass).

The factory is louder at the near microphone in the target domain than in the source domain (another place in the
hall) and its events come more often, so source and target differ in noise as well as in the machine's state.
Per-frequency cancellation of the far channel from the near one (``preprocess.channels=cancel``) removes most of
the factory; the down-mix adds the far channel's factory to the near one's.

Two noise styles (``noise``): ``direct`` (the above: the factory reaches each microphone through a short response,
so the two hear it coherently) and ``diffuse``, a reverberant hall of a different make: besides the pink bed and
the events, neighbouring machines (a hum with its harmonics, a rattling conveyor) and a long reverberant tail
(0.4-0.9 s) drawn anew for each microphone, plus a bed of its own at each; about half the factory's power at each
microphone is then incoherent with the other's, which a per-frequency gain cannot cancel. The machine reaches the
far microphone a little louder (about -18 dB) and reverberant too.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import oaconvolve

from asd_ray.data.layout import DEV_MACHINES_2026 as DEV_MACHINES, EVAL_MACHINES_2026 as EVAL_MACHINES
from asd_ray.data.layout import NOISE_STYLES_2026 as NOISE_STYLES
from asd_ray.data.synth_parts import band_noise, coloured_noise, harmonics, ring, rms, room, spectral_filter

__all__ = ["DEV_MACHINES", "EVAL_MACHINES", "NOISE_STYLES", "SECONDS", "factory_noise", "two_channels"]
# clip length by machine type (s): the 2026 set's lengths are 6, 10, 11, 12 and 16 s
SECONDS = {"ToyCar": 12.0, "ToyCarEmu": 12.0, "bearingEmu": 10.0, "fan": 10.0, "gearboxEmu": 11.0,
           "sliderEmu": 10.0, "valveEmu": 6.0, "ToyDrone": 10.0, "ToothBrush": 6.0, "SewingMachine": 16.0,
           "BlowerDustCollector": 10.0, "Sander": 12.0}

_FACTORY = {  # the factory's level at the near microphone over the machine's (dB) and its events per second
    "source": {"near_db": -6.0, "events": 0.6},
    "target": {"near_db": -2.0, "events": 1.0},
}


def factory_noise(rng: np.random.Generator, n: int, rate: int, events_per_s: float) -> np.ndarray:
    """The factory at its own position, unit RMS: a pink bed and transient events at random times."""
    bed = coloured_noise(rng, n, rate, -1.0 + rng.normal(0, 0.2))
    events = np.zeros(n)
    for _ in range(rng.poisson(events_per_s * n / rate)):
        start = int(rng.integers(0, n))
        kind = rng.choice(["impact", "burst", "vehicle"], p=[0.5, 0.3, 0.2])
        if kind == "impact":  # a dropped part, a hammer: a struck ring
            kernel = ring(rate, tuple(rng.uniform(150, 3500, 2)), rng.uniform(0.01, 0.08))
            piece = 3.0 * kernel / np.abs(kernel).max()
        elif kind == "burst":  # compressed air: a band of hiss for a fraction of a second
            width = int(rng.uniform(0.15, 0.9) * rate)
            piece = 1.5 * band_noise(rng, width, rate, rng.uniform(1500, 3000), rng.uniform(4000, 7000)) * np.hanning(width)
        else:  # a forklift passing: low rumble swelling and fading over 1-3 s
            width = int(rng.uniform(1.0, 3.0) * rate)
            piece = 2.0 * band_noise(rng, width, rate, 30, rng.uniform(200, 500)) * np.hanning(width)
        stop = min(n, start + len(piece))
        events[start:stop] += piece[: stop - start]
    mix = bed + events
    return mix / rms(mix)


def _response(rng: np.random.Generator, rate: int, delay_ms: tuple[float, float], taps: int = 3) -> np.ndarray:
    """A short room response: a direct path after a delay in ``delay_ms`` and a few weaker reflections (< 4 ms)."""
    ir = np.zeros(int(0.006 * rate) + int(delay_ms[1] * rate / 1000) + 1)
    ir[int(rng.uniform(*delay_ms) * rate / 1000)] = 1.0
    for _ in range(taps):
        ir[int(rng.integers(len(ir)))] += rng.uniform(-0.4, 0.4)
    return ir


def _neighbours(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """Machines next to the one recorded, unit RMS: a hum (50-150 Hz and its harmonics, slowly drifting) and a
    conveyor's rattle (broadband noise pulsing at 2-6 Hz)."""
    t = np.arange(n) / rate
    hum = harmonics(rng, t, rng.uniform(50, 150), 1.0 / np.arange(1, 13) ** rng.uniform(0.6, 1.2))
    pulse = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi)) ** 8
    rattle = band_noise(rng, n, rate, rng.uniform(300, 800), rng.uniform(3000, 6000)) * pulse
    mix = hum / rms(hum) + 10 ** (rng.uniform(-6, 3) / 20) * rattle / rms(rattle)
    return mix / rms(mix)


def _diffuse_pair(x: np.ndarray, factory: np.ndarray, rng: np.random.Generator, rate: int,
                  near_db: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``diffuse`` noise style (module docstring): near and far channels of the machine ``x`` (unit RMS)."""
    n = len(x)
    rt60 = rng.uniform(0.4, 0.9)

    def at_microphone(delay_ms, wet):  # the factory through a short response, then a tail of this microphone's own
        heard = oaconvolve(factory, _response(rng, rate, delay_ms))[:n]
        bed = coloured_noise(rng, n, rate, -1.0 + rng.normal(0, 0.2))
        return room(heard, rate, rng, rt60, wet) + 0.35 * rms(heard) * bed / rms(bed)

    near = x + 10 ** (near_db / 20) * at_microphone((0.5, 2.0), rng.uniform(0.4, 0.7))
    machine_far = room(oaconvolve(x, _response(rng, rate, (3.0, 8.0)))[:n], rate, rng, rt60, 0.8)
    far = (10 ** ((-18 + rng.normal(0, 2)) / 20) * machine_far / rms(machine_far)
           + 10 ** ((near_db + 6) / 20) * at_microphone((1.0, 4.0), rng.uniform(0.5, 0.9)))
    return near, far


def two_channels(machine: np.ndarray, rng: np.random.Generator, rate: int, domain: str,
                 noise: str = "direct") -> np.ndarray:
    """(n,) the machine at the near microphone -> (n x 2) float32 near/far pair with the factory added to both
    in the noise style ``noise`` (module docstring); a random gain common to both channels, peak below 1."""
    if noise not in NOISE_STYLES:
        raise ValueError(f"unknown noise style {noise!r}; choose one of {', '.join(NOISE_STYLES)}")
    n = len(machine)
    x = machine.astype(np.float64) / rms(machine)
    f = _FACTORY[domain]
    factory = factory_noise(rng, n, rate, f["events"] * 2 ** rng.normal(0, 0.3))
    near_db = f["near_db"] + rng.normal(0, 1.5)
    if noise == "diffuse":
        factory = factory + 10 ** (rng.uniform(-4, 2) / 20) * _neighbours(rng, n, rate)
        near, far = _diffuse_pair(x, factory / rms(factory), rng, rate, near_db)
    else:
        near = x + 10 ** (near_db / 20) * oaconvolve(factory, _response(rng, rate, (0.5, 2.0)))[:n]
        # at the far microphone the factory is 6 dB louder than at the near one, the machine ~22 dB weaker and dull
        dull = spectral_filter(oaconvolve(x, _response(rng, rate, (3.0, 8.0)))[:n], rate,
                               lambda fr: -10 * np.log10(1 + (fr / 1500.0) ** 2))
        far = (10 ** ((-22 + rng.normal(0, 2)) / 20) * dull
               + 10 ** ((near_db + 6) / 20) * oaconvolve(factory, _response(rng, rate, (1.0, 4.0)))[:n])
    pair = np.stack([near, far], axis=1)
    gain = 10 ** (rng.uniform(-34, -20) / 20) / rms(pair[:, 0])
    return np.clip(pair * gain, -0.99, 0.99).astype(np.float32)
