"""Corpus style B: other machine sound models and other anomaly kinds, laid out like style A.

Designed apart from style A (and not tuned against any detector) so that detectors can be compared on
two independent synthetic corpora. Five machine families, each a physical-ish sound model:

- reciprocating: a crank cycle with events at fixed crank angles (valve clicks, compression thumps),
  each ringing its own resonances, over the cycle's low-frequency pulsation;
- conveyor: a belt with a seam click once per revolution, roller-rate modulated belt noise and
  roller tones;
- pump: vane-pass tones over resonant flow noise;
- motor: magnetic hum at twice the electrical frequency, rotor slot harmonics and an inverter's PWM
  whine with its sidebands, over cooling-fan noise;
- gear: a mesh tone and its harmonics, lightly modulated at the shaft rate, over structure noise.

Anomaly kinds (four per family): missing cycle events, timing jitter, rattling at a sub-harmonic,
intermittent dropouts, cavitation bursts, a changed resonance damping, sideband growth (modulation at
the shaft rate), a tonal whine that sets in partway through the clip, and a spectral tilt; severities
are drawn per clip. As in style A the machine's sound is brought back to its pre-anomaly level and
every clip gets a random gain, so loudness carries no information.

The domains differ in other ways than style A's: the target runs at another operating point, in
another room (longer reverberation), over another background (ventilation rumble instead of a hall's
pink noise and mains hum) and through another microphone (low cut and a presence peak).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import oaconvolve

from asd_ray.data.synth_parts import (NO_ATTRIBUTE, CorpusStyle, band_noise, coloured_noise, harmonics, placed,
                                      random_gain, ring, rms, seeded_rng, spectral_filter)

ANOMALY_KINDS = ("missing", "jitter", "rattle", "dropout", "cavitation", "damping", "sideband", "whine", "tilt")
FAMILY_KINDS = {
    "reciprocating": ("missing", "jitter", "rattle", "damping"),
    "conveyor": ("missing", "jitter", "rattle", "dropout"),
    "pump": ("cavitation", "damping", "sideband", "dropout"),
    "motor": ("whine", "sideband", "tilt", "dropout"),
    "gear": ("sideband", "rattle", "whine", "tilt"),
}
# Which family a machine type is in this style; machine types absent here get one from the seed.
FAMILIES = {
    "ToyCar": "reciprocating", "ToyTrain": "conveyor", "bearing": "motor", "fan": "pump", "gearbox": "gear",
    "slider": "conveyor", "valve": "reciprocating",
    "ToyRCCar": "motor", "ToyPet": "reciprocating", "HomeCamera": "motor", "AutoTrash": "conveyor",
    "Polisher": "gear", "ScrewFeeder": "pump", "BandSealer": "pump", "CoffeeGrinder": "gear",
}
# Base rate at speed 1 (Hz): crank cycle, belt revolution, pump / motor / gear shaft.
_RATES = {"reciprocating": (7, 18), "conveyor": (0.9, 2.2), "pump": (22, 45), "motor": (20, 45), "gear": (9, 25)}
# Count per cycle: events per crank cycle, rollers per belt revolution, vanes, rotor slots, teeth.
_COUNTS = {"reciprocating": (2, 4), "conveyor": (14, 30), "pump": (5, 9), "motor": (24, 44), "gear": (17, 41)}


@dataclass(frozen=True)
class PlantProfile:
    """The sound of one machine type in style B, drawn once from (seed, machine)."""

    machine: str
    family: str
    rate_hz: float  # cycle / revolution rate at speed 1
    count: int  # events per cycle, rollers, vanes, slots or teeth
    phases: tuple[float, ...]  # crank angles of the cycle's events, fractions of a cycle
    event_amps: tuple[float, ...]
    event_resonances: tuple[tuple[float, ...], ...]  # Hz, rung by each event
    event_decay: float  # s
    tone_amps: tuple[float, ...]  # harmonic amplitudes of the family's tonal part
    structure_hz: float  # the housing's resonance, Hz
    structure_q: float
    carrier_hz: float  # motor: PWM carrier, Hz; others: the ring of a rattle and of a conveyor's seam click
    source_speeds: tuple[float, ...]
    target_speed: float
    anomaly_kinds: tuple[str, ...]

    @staticmethod
    def draw(machine: str, seed: int) -> "PlantProfile":
        rng = seeded_rng(seed, "profile-B", machine)
        family = FAMILIES.get(machine) or str(rng.choice(sorted(FAMILY_KINDS)))
        lo, hi = _RATES[family]
        count = int(rng.integers(_COUNTS[family][0], _COUNTS[family][1] + 1))
        n_events = count if family == "reciprocating" else 2
        phases = np.sort(rng.uniform(0, 1, n_events))
        amps = np.concatenate([[1.0], rng.uniform(0.25, 0.8, n_events - 1)])
        tone = np.arange(1, 9) ** -rng.uniform(0.3, 1.2) * rng.uniform(0.4, 1.0, 8)
        kinds = list(FAMILY_KINDS[family])
        rng.shuffle(kinds)
        return PlantProfile(
            machine=machine, family=family, rate_hz=float(rng.uniform(lo, hi)), count=count,
            phases=tuple(float(p) for p in phases), event_amps=tuple(float(a) for a in amps),
            event_resonances=tuple(tuple(float(f) for f in np.sort(rng.uniform(250, 3800, 2)))
                                   for _ in range(n_events)),
            event_decay=float(rng.uniform(0.006, 0.025)),
            tone_amps=tuple(float(a) for a in tone),
            structure_hz=float(rng.uniform(500, 2500)), structure_q=float(rng.uniform(2.0, 5.0)),
            carrier_hz=float(rng.uniform(3000, 6500) if family == "motor" else rng.uniform(900, 3500)),
            source_speeds=tuple(float(s) for s in np.sort(rng.uniform(0.85, 1.15, 3))),
            target_speed=float(rng.choice([rng.uniform(0.62, 0.72), rng.uniform(1.32, 1.45)])),
            anomaly_kinds=tuple(kinds),
        )

    def attributes(self, domain: str, variant: int) -> str:
        if self.machine in NO_ATTRIBUTE:
            return "noAttribute"
        speed = self.target_speed if domain == "target" else self.source_speeds[variant]
        return f"rpm_{int(round(60 * self.rate_hz * speed))}_room_{'B' if domain == 'target' else 'A'}"


def _cycle_events(rng, n, rate, cycle_hz, phases, amps, kernels, *, wander=0.006, late=None, drop=None,
                  amp_jitter=0.15):
    """Events at fixed fractions ``phases`` of each cycle of a ``cycle_hz`` machine; event i rings ``kernels[i]``.

    ``wander``: the cycle period's relative random variation; ``late[i]``: event i's own timing jitter
    (fraction of a cycle); ``drop[i]``: the probability that event i is missing in a cycle.
    """
    period = rate / cycle_hz
    n_cycles = int(n / period) + 2
    starts = rng.uniform(-period, 0) + period * np.cumsum(1.0 + wander * rng.standard_normal(n_cycles))
    out = np.zeros(n)
    for i, (phase, amp, kernel) in enumerate(zip(phases, amps, kernels)):
        jitter = 0.003 if late is None else late[i]
        pos = starts + period * (phase + jitter * rng.standard_normal(n_cycles))
        a = amp * np.maximum(0.1, 1.0 + amp_jitter * rng.standard_normal(n_cycles))
        if drop is not None:
            a = np.where(rng.random(n_cycles) < drop[i], 0.05 * a, a)
        keep = (pos >= 0) & (pos < n)
        train = np.zeros(n)
        np.add.at(train, pos[keep].astype(int), a[keep])
        out += oaconvolve(train, kernel)[:n]
    return out


def _resonant_noise(rng, n, rate, centre, q):
    """White noise through one resonance at ``centre`` Hz of quality ``q``, unit RMS."""
    white = rng.standard_normal(n)
    x = spectral_filter(white, rate, lambda f: -10 * np.log10(1 + (q * (f / centre - centre / np.maximum(f, 1.0))) ** 2))
    return x / rms(x)


def _gaps(rng, n, rate, depth):
    """An envelope with 2-6 smooth dips of 40-200 ms each, down to ``1 - depth``."""
    env = np.ones(n)
    ramp = int(0.01 * rate)
    for _ in range(int(rng.integers(2, 7))):
        width = int(rng.uniform(0.04, 0.2) * rate)
        start = int(rng.integers(0, max(1, n - width)))
        shape = np.ones(width)
        edge = min(ramp, width // 2)
        shape[:edge] = np.linspace(0, 1, edge)
        shape[width - edge:] = np.linspace(1, 0, edge)
        env[start:start + width] = np.minimum(env[start:start + width], 1 - depth * shape)
    return env


def _am(t, rate_hz, depth, rng):
    return 1.0 + depth * np.sin(2 * np.pi * rate_hz * t + rng.uniform(0, 2 * np.pi))


def _plant_sound(p: PlantProfile, rng, n, rate, speed, anomaly: str | None, severity: float):
    """The machine's own sound (no room, background or microphone) with an anomaly of ``severity`` in [0, 1]."""
    t = np.arange(n) / rate
    f = p.rate_hz * speed * (1.0 + 0.01 * rng.standard_normal())
    tones = np.array(p.tone_amps) * 10 ** (rng.normal(0, 1.5, len(p.tone_amps)) / 20)
    decay = p.event_decay * (1.0 + 0.05 * rng.standard_normal())
    if anomaly == "damping":  # the housing or a valve rings longer (looser) or shorter (stiffer)
        factor = (1.5 + 1.5 * severity) ** rng.choice([-1, 1])
        decay, q = decay * factor, p.structure_q * factor
    else:
        q = p.structure_q * (1.0 + 0.05 * rng.standard_normal())
    structure = _resonant_noise(rng, n, rate, p.structure_hz * (1 + 0.02 * rng.standard_normal()), q)
    noise_level = 10 ** (rng.normal(0, 2.0) / 20)

    if p.family in ("reciprocating", "conveyor"):
        if p.family == "reciprocating":
            kernels = [ring(rate, res, decay) for res in p.event_resonances]
        else:  # two seams: a sharp click and a duller one
            kernels = [ring(rate, (p.carrier_hz * 1.3, p.event_resonances[0][0]), 0.3 * decay),
                       ring(rate, p.event_resonances[1], decay)]
        amps = np.array(p.event_amps)
        late, drop, wander = None, None, 0.006
        if anomaly == "missing":  # a misfire / a lost seam: the main event is missing in some cycles
            drop = np.zeros(len(amps))
            drop[0] = 0.15 + 0.45 * severity
        elif anomaly == "jitter":  # a worn linkage: one event comes irregularly early or late
            late = np.full(len(amps), 0.003)
            late[int(rng.integers(len(amps)))] = 0.02 + 0.08 * severity
            wander = 0.006 + 0.02 * severity
        events = _cycle_events(rng, n, rate, f, p.phases, amps * 10 ** (rng.normal(0, 1.0, len(amps)) / 20),
                               kernels, wander=wander, late=late, drop=drop)
        if p.family == "reciprocating":
            pulsation = harmonics(rng, t, f, tones)
            sound = events / rms(events) + 0.5 * pulsation / rms(pulsation) + 0.2 * noise_level * structure
        else:
            roller = f * p.count
            belt = band_noise(rng, n, rate, 200, 3000) * _am(t, roller, 0.3, rng)
            hum = harmonics(rng, t, roller, tones[:4])
            sound = 0.6 * events / rms(events) + belt * noise_level + 0.3 * hum / rms(hum)
        sub_rate = f / 2 if p.family == "reciprocating" else f * p.count / 2
    elif p.family == "pump":
        vane = f * p.count
        tone = harmonics(rng, t, vane, tones[:4]) + 0.3 * harmonics(rng, t, f, tones[:3])
        if anomaly == "sideband":  # a damaged vane: the vane-pass tone swells once per revolution
            tone = tone * _am(t, f, 0.15 + 0.5 * severity, rng)
        sound = 0.6 * tone / rms(tone) + noise_level * structure
        sub_rate = f / 2
    elif p.family == "motor":
        hum_hz = 4 * f  # twice the electrical frequency of a 2-pole-pair motor
        hum = harmonics(rng, t, hum_hz, tones[:5])
        slot = f * p.count
        slots = sum(np.sin(2 * np.pi * (slot + s * hum_hz / 2) * t + rng.uniform(0, 2 * np.pi)) for s in (-1, 1))
        if anomaly == "sideband":  # rotor eccentricity: slot harmonics modulated at the shaft rate
            slots = slots * _am(t, f, 0.2 + 0.6 * severity, rng)
        pwm = sum(a * np.sin(2 * np.pi * (p.carrier_hz + s * hum_hz / 2) * t + rng.uniform(0, 2 * np.pi))
                  for s, a in ((-1, 0.6), (0, 1.0), (1, 0.6)))
        fan = band_noise(rng, n, rate, 250, 2500)
        sound = (hum / rms(hum) + 0.35 * slots / rms(slots) + 0.08 * pwm / rms(pwm)
                 + 0.35 * noise_level * fan)
        sub_rate = f / 2
    else:  # gear
        mesh = f * p.count
        depth = 0.05 * (1.0 + 0.3 * rng.standard_normal())
        fm = 0.0
        if anomaly == "sideband":  # a cracked tooth: mesh amplitude and phase modulated at the shaft rate
            depth, fm = 0.15 + 0.5 * severity, 0.002 + 0.01 * severity
        f0 = mesh * (1.0 + fm * np.sin(2 * np.pi * f * t))
        tone = harmonics(rng, t, f0, tones[:5]) * _am(t, f, depth, rng)
        sound = tone / rms(tone) + 0.4 * noise_level * structure
        sub_rate = f / 2

    level = rms(sound)
    if anomaly == "rattle":  # a loose part struck at half the cycle / shaft / roller rate, not every time
        hits = _cycle_events(rng, n, rate, sub_rate, (rng.uniform(0, 1),), (1.0,),
                             [ring(rate, (p.carrier_hz * rng.uniform(0.9, 1.1),), 0.004)],
                             wander=0.03, drop=(0.3,), amp_jitter=0.4)
        sound = sound + level * 10 ** ((-20 + 12 * severity) / 20) * hits / rms(hits)
    elif anomaly == "cavitation":  # vapour bubbles collapsing: short broadband bursts at random times
        n_bursts = rng.poisson((3 + 9 * severity) * n / rate)
        env = np.zeros(n)
        for start in rng.integers(0, n, n_bursts):
            width = int(rng.uniform(0.005, 0.03) * rate)
            env[start:start + width] += np.hanning(width)[: n - start] * rng.uniform(0.5, 1.0)
        burst = band_noise(rng, n, rate, rng.uniform(400, 1500), rng.uniform(3000, 6000)) * env
        sound = sound + level * 10 ** ((-14 + 10 * severity) / 20) * burst / (rms(burst) + 1e-9)
    elif anomaly == "whine":  # a tone sets in partway through the clip, wavering slightly
        onset = rng.uniform(0.1, 0.6) * n / rate
        hz = rng.uniform(600, 4000) * (1.0 + 0.003 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        tone = harmonics(rng, t, hz, (1.0, 0.3)) / (1 + np.exp(-(t - onset) / 0.05))
        sound = sound + level * 10 ** ((-22 + 12 * severity) / 20) * tone / 0.75
    elif anomaly == "dropout":  # an intermittent contact / a slipping belt: the machine drops out briefly
        sound = sound * _gaps(rng, n, rate, 0.5 + 0.45 * severity)
    elif anomaly == "tilt":  # wear moves energy up or down the spectrum
        tilt = (1.0 + 2.0 * severity) * rng.choice([-1, 1])
        sound = spectral_filter(sound, rate, lambda fr: tilt * np.log2(np.maximum(fr, 50.0) / 1000.0))
    # Put the level back: an anomaly must not be found by loudness.
    return sound * (level / rms(sound))


_DOMAIN = {
    # SNR (dB) over the background; room reverberation time (s) and wet level; microphone low cut (Hz),
    # presence peak (Hz, dB) and high cut (Hz). The target's brighter microphone is balanced by a darker,
    # louder background, so that plain vs K-weighted energy (RMS after loudness normalisation) does not
    # give the domain away.
    "source": {"snr": 12.0, "rt60": 0.12, "wet": 0.25, "low_cut": 40.0, "peak": (2000.0, 0.0), "high_cut": 7500.0},
    "target": {"snr": 5.0, "rt60": 0.45, "wet": 0.6, "low_cut": 80.0, "peak": (2500.0, -1.0), "high_cut": 6000.0},
}


def _background(rng, n, rate, domain):
    """A hall's pink noise and mains hum (source) or ventilation rumble with a fan tone (target), unit RMS."""
    t = np.arange(n) / rate
    if domain == "source":
        noise = coloured_noise(rng, n, rate, -1.0 + rng.normal(0, 0.15))
        tonal = harmonics(rng, t, 50.0, (1.0, 0.5, 0.3, 0.2))
        mix = noise + 0.25 * tonal / rms(tonal)
    else:
        noise = coloured_noise(rng, n, rate, -2.0 + rng.normal(0, 0.15))
        tonal = harmonics(rng, t, rng.uniform(90, 130), (1.0, 0.4))
        mix = noise + 0.35 * tonal / rms(tonal)
    return mix / rms(mix)


def _microphone(x, rate, domain, rng):
    d = _DOMAIN[domain]
    low, high = d["low_cut"] * 2 ** rng.normal(0, 0.2), d["high_cut"] * 2 ** rng.normal(0, 0.1)
    peak_hz, peak_db = d["peak"][0] * 2 ** rng.normal(0, 0.1), d["peak"][1] + rng.normal(0, 1.0)

    def gain_db(f):
        f = np.maximum(f, 1.0)
        return (-10 * np.log10(1 + (low / f) ** 4) - 10 * np.log10(1 + (f / high) ** 6)
                + peak_db * np.exp(-0.5 * (np.log2(f / peak_hz) / 0.4) ** 2))

    return spectral_filter(x, rate, gain_db)


def synth_clip(profile: PlantProfile, *, domain: str, variant: int, anomaly: str | None, severity: float,
               rng: np.random.Generator, seconds: float, rate: int = 16_000) -> np.ndarray:
    """One style-B clip of ``profile``'s machine in ``domain`` (float32, mono, peak below 1)."""
    n = int(seconds * rate)
    d = _DOMAIN[domain]
    speed = profile.target_speed if domain == "target" else profile.source_speeds[variant]
    sound = _plant_sound(profile, rng, n, rate, speed, anomaly, severity)
    return placed(sound, rng, rate=rate, rt60=d["rt60"] * 2 ** rng.normal(0, 0.15), wet=d["wet"], snr_db=d["snr"],
                  background=lambda: _background(rng, n, rate, domain),
                  microphone=lambda mix: _microphone(mix, rate, domain, rng))


def noise_clip(rng: np.random.Generator, *, domain: str, seconds: float, rate: int = 16_000) -> np.ndarray:
    """A noise-only supplemental clip: the domain's background through its microphone, no machine."""
    n = int(seconds * rate)
    return random_gain(_microphone(_background(rng, n, rate, domain), rate, domain, rng), rng, -40, -30)


STYLE = CorpusStyle(PlantProfile.draw, synth_clip, noise_clip)
