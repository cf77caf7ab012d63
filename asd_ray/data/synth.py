"""A synthetic corpus laid out exactly like DCASE 2025 Task 2, hard enough to fail a bad detector.

Each machine type has its own timbre drawn from the seed: a rotating machine (harmonics of a shaft
frequency), an impulsive one (resonances struck at a rate) or a broadband one (shaped noise with a
blade-pass line). Normal clips vary inside a domain (speed, harmonic balance, noise level, phase).
The target domain differs from the source in speed, background noise colour and level, and
microphone response; only ``train_target`` of its normal clips are in train/.
Anomalies come in several kinds per machine (bearing impulses, imbalance modulation, shifted
harmonics / resonances, friction noise) at severities drawn per clip. After an anomaly is added
the clip is brought back to its pre-anomaly level and every clip gets a random microphone gain, so
loudness and RMS carry no information about the label.

Everything is deterministic per seed: each clip draws from its own generator seeded by
(seed, machine, split, domain, label, index).

These sound models are corpus style "A", the default; ``generate_corpus(..., style="B")`` writes the
same layout from the independently designed sound models of :mod:`asd_ray.data.synth_b`.
"""

from __future__ import annotations

import csv
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import soundfile as sf
from scipy.signal import oaconvolve

from asd_ray.data.layout import DEV_MACHINES, EVAL_MACHINES, ground_truth_paths
from asd_ray.data.synth_parts import (NO_ATTRIBUTE, CorpusStyle, band_noise, coloured_noise, harmonics, random_gain,
                                      ring, rms, seeded_rng, spectral_filter)
from asd_ray.progress import advance, stage

ANOMALY_KINDS = ("bearing", "imbalance", "shifted", "friction")
def eval_list_name(year: int = 2025) -> str:
    """The eval list a corpus of ``year`` has at its root: every eval test clip's labelled name, named and laid out
    as the official baseline repo's ``datasets/eval_data_list_<year>.csv`` (``--eval-list`` reads it)."""
    return f"eval_data_list_{year}.csv"

# Machine families: which sound model a machine type uses. Machine types absent here get one from the seed.
FAMILIES = {
    "ToyCar": "harmonic", "ToyTrain": "impulsive", "bearing": "harmonic", "fan": "broadband",
    "gearbox": "harmonic", "slider": "impulsive", "valve": "impulsive",
    "ToyRCCar": "harmonic", "ToyPet": "impulsive", "HomeCamera": "harmonic", "AutoTrash": "impulsive",
    "Polisher": "broadband", "ScrewFeeder": "impulsive", "BandSealer": "broadband", "CoffeeGrinder": "broadband",
}


@dataclass(frozen=True)
class MachineProfile:
    """The timbre of one machine type, drawn once from (seed, machine)."""

    machine: str
    family: str
    f0: float  # shaft / blade / strike rate at speed 1, Hz
    harmonic_amps: tuple[float, ...]
    resonances: tuple[float, ...]  # Hz, struck by impulses
    decay: float  # s, impulse resonance decay
    noise_centre: float  # Hz, centre of the machine's own broadband noise
    source_speeds: tuple[float, ...]  # speed multipliers of the source attribute values
    target_speed: float
    anomaly_kinds: tuple[str, ...]

    @staticmethod
    def draw(machine: str, seed: int) -> "MachineProfile":
        rng = seeded_rng(seed, "profile", machine)
        family = FAMILIES.get(machine) or str(rng.choice(["harmonic", "impulsive", "broadband"]))
        f0 = {"harmonic": rng.uniform(70, 180), "impulsive": rng.uniform(4, 12),
              "broadband": rng.uniform(30, 90)}[family]
        n_harm = 12
        amps = np.arange(1, n_harm + 1) ** -rng.uniform(0.6, 1.4) * rng.uniform(0.3, 1.0, n_harm)
        amps[0] = max(amps[0], 0.6)
        kinds = list(ANOMALY_KINDS)
        rng.shuffle(kinds)
        return MachineProfile(
            machine=machine, family=family, f0=float(f0),
            harmonic_amps=tuple(float(a) for a in amps),
            resonances=tuple(float(f) for f in np.sort(rng.uniform(400, 4500, 3))),
            decay=float(rng.uniform(0.008, 0.04)),
            noise_centre=float(rng.uniform(300, 2500)),
            source_speeds=tuple(float(s) for s in np.sort(rng.uniform(0.9, 1.1, 3))),
            target_speed=float(rng.choice([rng.uniform(0.7, 0.8), rng.uniform(1.22, 1.35)])),
            anomaly_kinds=tuple(kinds[: 3 if family == "broadband" else 4]),
        )

    def attributes(self, domain: str, variant: int) -> str:
        if self.machine in NO_ATTRIBUTE:
            return "noAttribute"
        spd = f"{int(round(100 * (self.target_speed if domain == 'target' else self.source_speeds[variant])))}"
        return f"spd_{spd}_mic_{2 if domain == 'target' else 1}"


def _impulses(rng, n, rate, strike_rate, resonances, decay, jitter=0.08, amp_jitter=0.25):
    """Resonances struck at ``strike_rate`` Hz with timing and amplitude jitter."""
    train = np.zeros(n)
    period = rate / strike_rate
    pos = rng.uniform(0, period)
    while pos < n:
        train[int(pos)] = 1.0 + amp_jitter * rng.standard_normal()
        pos += period * (1.0 + jitter * rng.standard_normal())
    return oaconvolve(train, ring(rate, resonances, decay))[:n]


def _machine_sound(profile: MachineProfile, rng, n, rate, speed, anomaly: str | None, severity: float):
    """The machine's own sound (no background), with an anomaly of ``severity`` in [0, 1] mixed in."""
    t = np.arange(n) / rate
    f0 = profile.f0 * speed * (1.0 + 0.012 * rng.standard_normal())
    amps = np.array(profile.harmonic_amps) * 10 ** (rng.normal(0, 2.0, len(profile.harmonic_amps)) / 20)
    resonances = np.array(profile.resonances) * (1.0 + 0.01 * rng.standard_normal(len(profile.resonances)))
    if anomaly == "shifted" and profile.family == "impulsive":
        resonances = resonances * (1.0 + (0.06 + 0.14 * severity) * rng.choice([-1, 1]))
    detune = None
    if anomaly == "shifted" and profile.family != "impulsive":
        detune = np.zeros(len(amps))
        hit = rng.choice(np.arange(1, 6), size=3, replace=False)  # partials 2..6: audible in every family
        detune[hit] = (0.015 + 0.05 * severity) * rng.choice([-1, 1], size=3)
    own_noise = band_noise(rng, n, rate, profile.noise_centre * 0.5, profile.noise_centre * 2.0)
    noise_level = 10 ** (rng.normal(0, 2.5) / 20)
    if profile.family == "harmonic":
        main = harmonics(rng, t, f0, amps, detune)
        sound = main / rms(main) + 0.3 * noise_level * own_noise
    elif profile.family == "impulsive":
        main = _impulses(rng, n, rate, f0, resonances, profile.decay)
        hum = harmonics(rng, t, 50.0 * speed, amps[:6])
        sound = main / rms(main) + 0.1 * hum / rms(hum) + 0.25 * noise_level * own_noise
    else:  # broadband: shaped noise dominates, with a blade-pass line and its harmonics
        main = own_noise
        blade = harmonics(rng, t, f0, amps[:6], detune[:6] if detune is not None else None)
        sound = main * noise_level + 0.35 * blade / rms(blade)
    level = rms(sound)
    if anomaly == "imbalance":
        depth = 0.12 + 0.45 * severity
        f_mod = rng.uniform(3, 12)
        sound = sound * (1.0 + depth * np.sin(2 * np.pi * f_mod * t + rng.uniform(0, 2 * np.pi)))
    elif anomaly == "bearing":
        clicks = _impulses(rng, n, rate, rng.uniform(15, 45), (rng.uniform(2500, 6000),), 0.002,
                           jitter=0.02, amp_jitter=0.1)
        sound = sound + level * 10 ** ((-24 + 14 * severity) / 20) * clicks / rms(clicks)
    elif anomaly == "friction":
        lo = rng.uniform(1200, 4000)
        band = band_noise(rng, n, rate, lo, lo * 1.6)
        env = (np.convolve(rng.random(n // 800 + 1) < rng.uniform(0.3, 0.7), np.ones(3) / 3, "same")
               .repeat(800)[:n])
        sound = sound + level * 10 ** ((-20 + 12 * severity) / 20) * band * env
    elif anomaly == "shifted" and profile.family == "harmonic":
        extra = harmonics(rng, t, f0 * rng.uniform(1.3, 2.7), amps[:3])
        sound = sound + level * 10 ** ((-26 + 12 * severity) / 20) * extra / rms(extra)
    # Put the level back: an anomaly must not be found by loudness.
    return sound * (level / rms(sound))


_DOMAIN = {
    # background noise colour exponent, SNR of the machine over it (dB), microphone tilt (dB per octave)
    # The target's brighter microphone is balanced by a darker (brown) background, so that the
    # ratio of plain to K-weighted energy, i.e. RMS after loudness normalisation, does not give the domain away.
    "source": {"noise_exp": -1.0, "snr": 14.0, "tilt": 0.0},
    "target": {"noise_exp": -2.0, "snr": 7.0, "tilt": 1.0},
}


def _microphone(x: np.ndarray, rate: int, tilt_db_per_octave: float) -> np.ndarray:
    if tilt_db_per_octave == 0.0:
        return x
    return spectral_filter(x, rate, lambda f: tilt_db_per_octave * np.log2(np.maximum(f, 50.0) / 1000.0))


def synth_clip(profile: MachineProfile, *, domain: str, variant: int, anomaly: str | None, severity: float,
               rng: np.random.Generator, seconds: float, rate: int = 16_000) -> np.ndarray:
    """One clip of ``profile``'s machine in ``domain`` (float32, mono, peak below 1)."""
    n = int(seconds * rate)
    d = _DOMAIN[domain]
    speed = profile.target_speed if domain == "target" else profile.source_speeds[variant]
    sound = _machine_sound(profile, rng, n, rate, speed, anomaly, severity)
    background = coloured_noise(rng, n, rate, d["noise_exp"] + rng.normal(0, 0.2))
    snr = d["snr"] + rng.normal(0, 2.5)
    mix = sound / rms(sound) + 10 ** (-snr / 20) * background
    mix = _microphone(mix, rate, d["tilt"] + rng.normal(0, 1.0))  # every microphone differs a little
    return random_gain(mix, rng)


def noise_clip(rng: np.random.Generator, *, domain: str, seconds: float, rate: int = 16_000) -> np.ndarray:
    """A noise-only supplemental clip: the domain's background, no machine."""
    n = int(seconds * rate)
    x = _microphone(coloured_noise(rng, n, rate, _DOMAIN[domain]["noise_exp"]), rate, _DOMAIN[domain]["tilt"])
    return (x * 10 ** (rng.uniform(-40, -30) / 20) / rms(x)).astype(np.float32)


# A: this module's sound models; B: asd_ray.data.synth_b's, designed independently; C: asd_ray.data.synth_c's,
# rhythms with anomalies in timing and in narrow bands
STYLES = ("A", "B", "C")


def corpus_style(name: str) -> CorpusStyle:
    """The corpus style called ``name`` (one of :data:`STYLES`)."""
    if name == "A":
        return CorpusStyle(MachineProfile.draw, synth_clip, noise_clip)
    if name == "B":
        from asd_ray.data import synth_b  # style B: its sound models load only when asked for

        return synth_b.STYLE
    if name == "C":
        from asd_ray.data import synth_c

        return synth_c.STYLE
    raise ValueError(f"unknown corpus style {name!r}; choose one of {', '.join(STYLES)}")


@dataclass(frozen=True)
class _Job:
    path: str
    machine: str
    domain: str
    variant: int
    anomaly: str | None
    severity: float
    noise_only: bool
    key: tuple
    seconds: float
    style: str = "A"
    year: int = 2025  # 2026: a near/far pair (synth_2026.two_channels)
    noise: str = "direct"  # 2026: the factory's noise style (synth_2026.NOISE_STYLES)


def _write(job: _Job, seed: int, rate: int) -> None:
    rng = seeded_rng(seed, *job.key)
    style = corpus_style(job.style)
    profile = style.draw(job.machine, seed)
    if job.noise_only:
        x = style.noise(rng, domain=job.domain, seconds=job.seconds, rate=rate)
    else:
        x = style.clip(profile, domain=job.domain, variant=job.variant, anomaly=job.anomaly,
                       severity=job.severity, rng=rng, seconds=job.seconds, rate=rate)
    if job.year == 2026:
        from asd_ray.data.synth_2026 import two_channels

        x = two_channels(x, rng, rate, job.domain, job.noise)
    sf.write(job.path, x, rate, subtype="PCM_16")


def _write_many(args):
    jobs, seed, rate = args
    for job in jobs:
        _write(job, seed, rate)
    return len(jobs)


def _plan_machine(root: Path, dataset: str, machine: str, *, seed: int, train_source: int, train_target: int,
                  test_per_cell: int, supplemental: int, seconds: float,
                  style: str = "A", year: int = 2025,
                  noise: str = "direct") -> tuple[list[_Job], list[list[str]], list]:
    """Jobs for one machine, its attributes_00.csv rows and its test clips' ground-truth rows
    (file name, label 0/1, domain 0/1, labelled name without ``.wav``)."""
    profile = corpus_style(style).draw(machine, seed)
    mdir = root / f"{dataset}_data" / "raw" / machine
    rng = seeded_rng(seed, "plan", dataset, machine)
    jobs, attr_rows, truth = [], [], []

    def add(split, domain, label, index, name, anomaly=None, noise_only=False, test_name=None):
        variant = int(rng.integers(len(profile.source_speeds)))
        severity = float(rng.uniform(0.15, 1.0)) if anomaly else 0.0
        attrs = profile.attributes(domain, variant)
        fname = test_name or f"{name}_{index:04d}_{attrs}.wav"
        path = mdir / split / fname
        jobs.append(_Job(str(path), machine, domain, variant, anomaly, severity, noise_only,
                         (dataset, machine, split, domain, label, index), seconds, style, year, noise))
        values = [] if attrs == "noAttribute" else attrs.split("_")
        attr_rows.append([f"{machine}/{split}/{fname}", *values])
        if split == "test":  # the labelled name: the file's own on dev, the one the eval list gives on eval
            labelled = f"section_00_{domain}_test_{label}_{index:04d}_{attrs}"
            truth.append((fname, int(label == "anomaly"), int(domain == "target"), labelled))
        return fname

    for domain, count in (("source", train_source), ("target", train_target)):
        for i in range(count):
            add("train", domain, "normal", i, f"section_00_{domain}_train_normal")
    cells = [(d, lab) for d in ("source", "target") for lab in ("normal", "anomaly")]
    if dataset == "dev":
        for domain, label in cells:
            for i in range(test_per_cell):
                kind = profile.anomaly_kinds[i % len(profile.anomaly_kinds)] if label == "anomaly" else None
                add("test", domain, label, i, f"section_00_{domain}_test_{label}", anomaly=kind)
    else:
        order = [(d, lab, i) for d, lab in cells for i in range(test_per_cell)]
        perm = rng.permutation(len(order))
        for new_index, j in enumerate(perm):
            domain, label, i = order[j]
            kind = profile.anomaly_kinds[i % len(profile.anomaly_kinds)] if label == "anomaly" else None
            add("test", domain, label, i, "", anomaly=kind, test_name=f"section_00_{new_index:04d}.wav")
    for i in range(supplemental):
        add("supplemental", "source", "noise", i, "section_00_source_supplemental_noise", noise_only=True)
        add("supplemental", "source", "clean", i, "section_00_source_supplemental_clean")
    return jobs, attr_rows, truth


def generate_corpus(out: str | Path, *, dev_machines: Iterable[str] | None = None,
                    eval_machines: Iterable[str] | None = None, train_source: int = 990, train_target: int = 10,
                    test_per_cell: int = 50, supplemental: int | None = None, seconds: float | None = None,
                    rate: int = 16_000, seed: int = 0, workers: int = 1, style: str = "A", year: int = 2025,
                    noise: str = "direct") -> Path:
    """Write a DCASE 2025-format corpus under ``out`` and return ``out``.

    Sizes default to DCASE's (990 + 10 train normals, 50 test clips per domain x label, 10 s);
    eval test clips are named ``section_00_0000.wav`` in shuffled order. The official evaluator's
    ground-truth tables of every machine are under ``{dev,eval}_data/ground_truth_{data,domain,attributes}/``
    (run the evaluator in either folder), and the eval labels also in ``eval_data_list_<year>.csv`` at the root,
    named and laid out as the official baseline repo's ``datasets/eval_data_list_<year>.csv``. ``style`` picks
    the sound models and anomaly kinds (:data:`STYLES`); the layout is the same for every style.

    ``year=2026``: DCASE 2026's set-up (``synth_2026``): its machine names, two-channel clips (near, far), no
    supplemental clips, each machine type's clip length unless ``seconds`` is given, the factory's noise in the
    style ``noise`` (``synth_2026.NOISE_STYLES``: ``direct``, ``diffuse``). None (machines, supplemental,
    seconds): the year's own (2025: the 7 dev and 8 eval machines, 5 supplemental clips of each kind, 10 s).
    """
    root = Path(out)
    corpus_style(style)  # an unknown style fails before anything is written
    if year not in (2025, 2026):
        raise ValueError(f"year {year}: the synthetic corpus is laid out as DCASE 2025 or 2026")
    if year == 2026:
        from asd_ray.data import synth_2026 as y

        if noise not in y.NOISE_STYLES:
            raise ValueError(f"unknown noise style {noise!r}; choose one of {', '.join(y.NOISE_STYLES)}")
        machines = (y.DEV_MACHINES, y.EVAL_MACHINES, 0, y.SECONDS)
    else:
        if noise != "direct":
            raise ValueError(f"noise style {noise!r}: a 2025 corpus is mono, without the 2026 factory (year=2026)")
        machines = (DEV_MACHINES, EVAL_MACHINES, 5, {})
    dev_machines = machines[0] if dev_machines is None else dev_machines
    eval_machines = machines[1] if eval_machines is None else eval_machines
    supplemental = machines[2] if supplemental is None else supplemental
    lengths = machines[3]
    all_jobs: list[_Job] = []
    eval_list: list[list[str]] = []
    for dataset, machines in (("dev", dev_machines), ("eval", eval_machines)):
        for machine in machines:
            jobs, attr_rows, truth = _plan_machine(root, dataset, machine, seed=seed, train_source=train_source,
                                                   train_target=train_target, test_per_cell=test_per_cell,
                                                   supplemental=supplemental,
                                                   seconds=seconds or lengths.get(machine, 10.0), style=style,
                                                   year=year, noise=noise)
            mdir = root / f"{dataset}_data" / "raw" / machine
            for split in ("train", "test", *(("supplemental",) if year == 2025 else ())):  # 2026 has none
                (mdir / split).mkdir(parents=True, exist_ok=True)
            width = max((len(r) for r in attr_rows), default=1) - 1
            header = ["file_name"] + [f"d{i // 2 + 1}{'pv'[i % 2]}" for i in range(width)]
            with (mdir / "attributes_00.csv").open("w", newline="") as fh:
                csv.writer(fh).writerows([header] + [r + [""] * (width + 1 - len(r)) for r in attr_rows])
            truth.sort()
            for path, col in zip(ground_truth_paths(root, machine, dataset=dataset), (1, 2, 3)):
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("w", newline="") as fh:
                    csv.writer(fh, lineterminator="\n").writerows([(row[0], row[col]) for row in truth])
            if dataset == "eval":
                eval_list += [[machine]] + [[row[0], f"{row[3]}.wav"] for row in truth]
            all_jobs.extend(jobs)
    if eval_list:
        with (root / eval_list_name(year)).open("w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(eval_list)
    # small chunks, so that the bar moves (a chunk of 32 ten-second clips takes a second or two on one core)
    chunks = [c for c in (all_jobs[i:i + 32] for i in range(0, len(all_jobs), 32)) if c]
    with stage("synth", total=len(all_jobs)):
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for done in as_completed([pool.submit(_write_many, (c, seed, rate)) for c in chunks]):
                    advance(done.result())
        else:
            for c in chunks:
                advance(_write_many((c, seed, rate)))
    return root
