"""Corpus style C: machines whose normal sound is a rhythm, and anomalies in timing and in narrow bands.

Written for issue 26 after styles A and B, apart from every detector: in styles A and B most anomalies change a
clip's spectrum, so windows of a few log-mel frames pooled without order find them. Here most do not: a clip with
irregular impacts has nearly the spectrum of a normal one, and only the order and spacing of its events give it
away; the others add a narrow line or band that a clip-level spectrum dilutes. Four machine families:

- press: a stamping press, a main strike and a release click at fixed fractions of each stroke, each ringing its
  own resonances, over the flywheel motor's hum;
- sorter: a pick-and-place sorter, a repeating pattern of 3-6 actuator clicks at fixed, unequal intervals, over
  a conveyor's whirr;
- indexer: a rotary indexing table, a motor whirr during the move part of each cycle and a clunk at each stop;
- spindle: a rotating spindle, shaft harmonics and a bearing's broadband noise, no impacts.

Anomaly kinds (four per family), severities drawn per clip: ``irregular`` (the events' spacing varies from cycle to
cycle), ``dropped`` (the main event is missing in some cycles), ``double`` (a bounce: a second strike a few tens of
ms after the main one), ``reordered`` (a sorter's intervals in another order, the same intervals), ``wobble`` (the
speed swings slowly up and down), ``tone`` (a faint steady line, a bearing defect's) and ``hiss`` (a faint band of
noise 60-200 Hz wide, a leak). As in styles A and B the machine's sound is brought back to its pre-anomaly level
and every clip gets a random gain, so loudness carries no information.

The target domain runs at another speed, in another room and over a background that has its own impacts (a
neighbouring machine's clanks at random times), so a detector of "events off the beat" must know which events are
the machine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import oaconvolve

from asd_ray.data.synth_parts import (NO_ATTRIBUTE, CorpusStyle, band_noise, coloured_noise, harmonics, placed,
                                      random_gain, ring, rms, seeded_rng, spectral_filter)

ANOMALY_KINDS = ("irregular", "dropped", "double", "reordered", "wobble", "tone", "hiss")
FAMILY_KINDS = {
    "press": ("irregular", "dropped", "double", "tone"),
    "sorter": ("irregular", "reordered", "dropped", "hiss"),
    "indexer": ("irregular", "wobble", "double", "hiss"),
    "spindle": ("wobble", "tone", "hiss", "dropped"),
}
# Which family a machine type is in this style; machine types absent here get one from the seed.
FAMILIES = {
    "ToyCar": "indexer", "ToyTrain": "sorter", "bearing": "spindle", "fan": "spindle", "gearbox": "indexer",
    "slider": "sorter", "valve": "press",
    "ToyRCCar": "spindle", "ToyPet": "press", "HomeCamera": "sorter", "AutoTrash": "indexer",
    "Polisher": "spindle", "ScrewFeeder": "sorter", "BandSealer": "press", "CoffeeGrinder": "spindle",
}
# Cycle rate at speed 1 (Hz): strokes, patterns, index steps, shaft revolutions.
_RATES = {"press": (1.2, 3.0), "sorter": (0.6, 1.2), "indexer": (0.8, 1.8), "spindle": (18.0, 40.0)}


@dataclass(frozen=True)
class RhythmProfile:
    """The sound of one machine type in style C, drawn once from (seed, machine)."""

    machine: str
    family: str
    rate_hz: float  # cycles per second at speed 1
    offsets: tuple[float, ...]  # when each event of a cycle comes, fractions of a cycle (press, sorter, indexer)
    event_amps: tuple[float, ...]
    event_resonances: tuple[tuple[float, ...], ...]  # Hz, rung by each event
    event_decay: float  # s
    tone_amps: tuple[float, ...]  # harmonic amplitudes of the continuous part
    hum_hz: float  # the continuous part's fundamental at speed 1
    move_fraction: float  # indexer: the part of a cycle the table moves
    line_hz: float  # where a ``tone`` anomaly's line sits
    band_hz: float  # where a ``hiss`` anomaly's band is centred
    source_speeds: tuple[float, ...]
    target_speed: float
    anomaly_kinds: tuple[str, ...]

    @staticmethod
    def draw(machine: str, seed: int) -> "RhythmProfile":
        rng = seeded_rng(seed, "profile-C", machine)
        family = FAMILIES.get(machine) or str(rng.choice(sorted(FAMILY_KINDS)))
        lo, hi = _RATES[family]
        n_events = {"press": 2, "sorter": int(rng.integers(3, 7)), "indexer": 1, "spindle": 0}[family]
        if family == "sorter":  # unequal gaps, each at least 8 % of the cycle: a pattern, not a pulse
            gaps = rng.dirichlet(np.full(n_events, 2.0)) * (1 - 0.08 * n_events) + 0.08
            offsets = np.cumsum(np.concatenate([[0.0], gaps[:-1]]))
        elif family == "press":
            offsets = np.array([0.0, rng.uniform(0.35, 0.6)])
        else:
            offsets = np.zeros(n_events)
        amps = np.concatenate([[1.0], rng.uniform(0.3, 0.8, max(0, n_events - 1))])[:n_events]
        kinds = list(FAMILY_KINDS[family])
        rng.shuffle(kinds)
        return RhythmProfile(
            machine=machine, family=family, rate_hz=float(rng.uniform(lo, hi)),
            offsets=tuple(float(o) for o in offsets), event_amps=tuple(float(a) for a in amps),
            event_resonances=tuple(tuple(float(f) for f in np.sort(rng.uniform(300, 4500, 2))) for _ in range(n_events)),
            event_decay=float(rng.uniform(0.01, 0.04)),
            tone_amps=tuple(float(a) for a in np.arange(1, 7) ** -rng.uniform(0.4, 1.2) * rng.uniform(0.5, 1.0, 6)),
            hum_hz=float(rng.uniform(45, 140)), move_fraction=float(rng.uniform(0.3, 0.6)),
            line_hz=float(rng.uniform(900, 5500)), band_hz=float(rng.uniform(1200, 6000)),
            source_speeds=tuple(float(s) for s in np.sort(rng.uniform(0.85, 1.15, 3))),
            target_speed=float(rng.choice([rng.uniform(0.65, 0.75), rng.uniform(1.3, 1.4)])),
            anomaly_kinds=tuple(kinds),
        )

    def attributes(self, domain: str, variant: int) -> str:
        if self.machine in NO_ATTRIBUTE:
            return "noAttribute"
        speed = self.target_speed if domain == "target" else self.source_speeds[variant]
        return f"cpm_{int(round(60 * self.rate_hz * speed))}_loc_{'2' if domain == 'target' else '1'}"


def cycle_starts(rng, seconds: float, rate_hz: float, *, wobble: float = 0.0, wobble_hz: float = 0.5,
                 wander: float = 0.004) -> np.ndarray:
    """Start times (s) of the cycles of a machine running at ``rate_hz``, from one cycle before the clip to its end.

    ``wobble``: the relative depth of a slow sinusoidal speed swing at ``wobble_hz``; ``wander``: each cycle's own
    small random variation of length (a normal machine's)."""
    dt = 1e-3
    t = np.arange(-2.0 / rate_hz, seconds + dt, dt)
    speed = 1.0 + wobble * np.sin(2 * np.pi * wobble_hz * t + rng.uniform(0, 2 * np.pi))
    phase = np.cumsum(rate_hz * speed * dt)
    starts = t[np.searchsorted(phase, np.arange(np.ceil(phase[0]), phase[-1]))]
    lengths = np.diff(starts, append=starts[-1] + 1.0 / rate_hz)
    return starts[0] + np.concatenate([[0.0], np.cumsum(lengths * (1 + wander * rng.standard_normal(len(lengths))))[:-1]])


def event_onsets(rng, starts: np.ndarray, offsets, *, jitter: float = 0.003, order=None) -> list[np.ndarray]:
    """Per event of a cycle, its onset (s) in every cycle: ``starts`` + the event's offset in a cycle of that
    cycle's length, plus a random shift of ``jitter`` cycles (standard deviation); ``order`` permutes the gaps
    between a cycle's events (a sorter's pattern in another order)."""
    offsets = np.asarray(offsets, dtype=float)
    if order is not None:
        gaps = np.diff(np.append(offsets, 1.0))[order]
        offsets = np.cumsum(np.concatenate([[0.0], gaps[:-1]]))
    lengths = np.diff(starts, append=starts[-1] + np.median(np.diff(starts)) if len(starts) > 1 else 1.0)
    return [starts + lengths * (o + jitter * rng.standard_normal(len(starts))) for o in offsets]


def _strikes(n: int, rate: int, onsets: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Struck ``kernel``s at ``onsets`` (s) with ``amps``, over n samples."""
    pos = np.round(np.asarray(onsets) * rate).astype(int)
    keep = (pos >= 0) & (pos < n)
    train = np.zeros(n)
    np.add.at(train, pos[keep], np.asarray(amps)[keep])
    return oaconvolve(train, kernel)[:n]


def _machine_sound(p: RhythmProfile, rng, n: int, rate: int, speed: float, anomaly: str | None, severity: float):
    """The machine's own sound (no room, background or microphone) with an anomaly of ``severity`` in [0, 1]."""
    seconds = n / rate
    t = np.arange(n) / rate
    f = p.rate_hz * speed * (1.0 + 0.01 * rng.standard_normal())
    wobble = (0.03 + 0.09 * severity) if anomaly == "wobble" else 0.003
    wobble_hz = rng.uniform(0.3, 1.5)
    starts = cycle_starts(rng, seconds, f, wobble=wobble, wobble_hz=wobble_hz)
    tones = np.array(p.tone_amps) * 10 ** (rng.normal(0, 1.5, len(p.tone_amps)) / 20)
    decay = p.event_decay * (1.0 + 0.05 * rng.standard_normal())
    hum_f = p.hum_hz * speed * (1.0 + wobble * np.sin(2 * np.pi * wobble_hz * t + rng.uniform(0, 2 * np.pi)))

    if p.family == "spindle":
        shaft = f * (1.0 + wobble * np.sin(2 * np.pi * wobble_hz * t + rng.uniform(0, 2 * np.pi)))
        tone = harmonics(rng, t, shaft, tones)
        noise = band_noise(rng, n, rate, 300, 5000)
        if anomaly == "dropped":  # a slipping drive: the shaft tone fades for a few tenths of a second, twice or more
            env = np.ones(n)
            for _ in range(int(rng.integers(2, 5))):
                width, start = int(rng.uniform(0.1, 0.4) * rate), int(rng.integers(0, n))
                env[start:start + width] *= 1 - (0.5 + 0.45 * severity) * np.hanning(width)[: n - start]
            tone = tone * env
        sound = tone / rms(tone) + 0.5 * noise
    else:
        jitter = (0.02 + 0.08 * severity) if anomaly == "irregular" else 0.003
        order = rng.permutation(len(p.offsets)) if anomaly == "reordered" else None
        if order is not None and len(order) > 1 and np.array_equal(order, np.arange(len(order))):
            order = np.roll(order, 1)  # another order, not the same one by chance
        onsets = event_onsets(rng, starts, p.offsets, jitter=jitter, order=order)
        events = np.zeros(n)
        for i, (on, amp, res) in enumerate(zip(onsets, p.event_amps, p.event_resonances)):
            a = amp * np.maximum(0.2, 1.0 + 0.12 * rng.standard_normal(len(on)))
            if anomaly == "dropped" and i == 0:
                a = np.where(rng.random(len(on)) < 0.15 + 0.4 * severity, 0.0, a)
            kernel = ring(rate, res, decay)
            events += _strikes(n, rate, on, a, kernel)
            if anomaly == "double" and i == 0:  # a bounce after the main strike, in most cycles
                bounce = on + rng.uniform(0.015, 0.045)
                events += _strikes(n, rate, bounce, a * rng.uniform(0.25, 0.45 + 0.3 * severity, len(on))
                                   * (rng.random(len(on)) < 0.5 + 0.4 * severity), kernel)
        hum = harmonics(rng, t, hum_f, tones)
        if p.family == "indexer":  # the table moves for part of each cycle: the motor's whirr on, then off
            cycle = np.searchsorted(starts, t, side="right") - 1
            length = np.diff(starts, append=starts[-1] + 1 / f)[np.maximum(cycle, 0)]
            within = (t - starts[np.maximum(cycle, 0)]) / length
            move = 1 / (1 + np.exp(-(p.move_fraction - within) / 0.02))
            whirr = band_noise(rng, n, rate, 400, 2500) * move + 0.6 * hum / rms(hum) * (0.3 + move)
            sound = events / rms(events) + 0.7 * whirr / rms(whirr)
        else:
            belt = band_noise(rng, n, rate, 150, 2000) if p.family == "sorter" else coloured_noise(rng, n, rate, -1.0)
            sound = events / rms(events) + 0.4 * hum / rms(hum) + 0.25 * belt
    level = rms(sound)
    if anomaly == "tone":  # a bearing defect's faint steady line
        line = np.sin(2 * np.pi * p.line_hz * (1 + 0.02 * rng.standard_normal()) * t + rng.uniform(0, 2 * np.pi))
        sound = sound + level * 10 ** ((-30 + 12 * severity) / 20) * line / rms(line)
    elif anomaly == "hiss":  # a leak: a faint narrow band of noise
        width = rng.uniform(60, 200)
        centre = p.band_hz * (1 + 0.03 * rng.standard_normal())
        band = band_noise(rng, n, rate, centre - width / 2, centre + width / 2)
        sound = sound + level * 10 ** ((-26 + 12 * severity) / 20) * band
    return sound * (level / rms(sound))  # an anomaly must not be found by loudness


_DOMAIN = {
    # SNR (dB) over the background, room reverberation (s) and wet level, microphone tilt (dB per octave from 1 kHz;
    # the same in both: a darker target microphone gave the domain away to loudness-normalised RMS), clanks per s
    "source": {"snr": 14.0, "rt60": 0.15, "wet": 0.2, "tilt": 0.0, "clanks": 0.0},
    "target": {"snr": 7.0, "rt60": 0.5, "wet": 0.5, "tilt": 0.0, "clanks": 1.5},
}


def _background(rng, n: int, rate: int, domain: str) -> np.ndarray:
    """A workshop's noise, unit RMS; the target's has a neighbouring machine's clanks at random times (per s:
    the domain's ``clanks``, Poisson)."""
    mix = coloured_noise(rng, n, rate, -1.3 + rng.normal(0, 0.15))
    clanks = rng.poisson(_DOMAIN[domain]["clanks"] * n / rate)
    if clanks:
        kernel = ring(rate, tuple(rng.uniform(200, 2500, 2)), rng.uniform(0.02, 0.06))
        hits = _strikes(n, rate, rng.uniform(0, n / rate, clanks), rng.uniform(0.5, 1.0, clanks), kernel)
        mix = mix + 1.5 * hits / rms(hits) * np.sqrt(clanks / max(1.0, n / rate))
    return mix / rms(mix)


def _microphone(x: np.ndarray, rate: int, domain: str, rng) -> np.ndarray:
    tilt = _DOMAIN[domain]["tilt"] + rng.normal(0, 0.3)
    return spectral_filter(x, rate, lambda fr: tilt * np.log2(np.maximum(fr, 60.0) / 1000.0)
                           - 10 * np.log10(1 + (50.0 / np.maximum(fr, 1.0)) ** 4))


def synth_clip(profile: RhythmProfile, *, domain: str, variant: int, anomaly: str | None, severity: float,
               rng: np.random.Generator, seconds: float, rate: int = 16_000) -> np.ndarray:
    """One style-C clip of ``profile``'s machine in ``domain`` (float32, mono, peak below 1)."""
    n = int(seconds * rate)
    d = _DOMAIN[domain]
    speed = profile.target_speed if domain == "target" else profile.source_speeds[variant]
    sound = _machine_sound(profile, rng, n, rate, speed, anomaly, severity)
    return placed(sound, rng, rate=rate, rt60=d["rt60"] * 2 ** rng.normal(0, 0.15), wet=d["wet"], snr_db=d["snr"],
                  background=lambda: _background(rng, n, rate, domain),
                  microphone=lambda mix: _microphone(mix, rate, domain, rng))


def noise_clip(rng: np.random.Generator, *, domain: str, seconds: float, rate: int = 16_000) -> np.ndarray:
    """A noise-only supplemental clip: the domain's background through its microphone, no machine."""
    n = int(seconds * rate)
    return random_gain(_microphone(_background(rng, n, rate, domain), rate, domain, rng), rng, -40, -30)


STYLE = CorpusStyle(RhythmProfile.draw, synth_clip, noise_clip)
