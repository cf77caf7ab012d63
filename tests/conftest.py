"""Shared fixtures: small synthetic DCASE trees, tiny random encoders of every backbone family, bad clips.
Nothing touches the network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asd_ray.data.synth import generate_corpus

from tiny import NOT_FILES, TINY, save_tiny_encoder

CHECKOUT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The suite tests the checkout it lives in, whatever copy of asd_ray is installed: pyproject's ``pythonpath``
    puts its root first on this process's path, and PYTHONPATH here on the path of Ray's worker processes and of
    the commands the tests start."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    # every Ray the suite starts (the session's, `ray start` heads, multi-node clusters, the commands' own) keeps
    # its workers at the suite's priority, as asd-ray's own local Ray does: Ray's default (15 nice levels below)
    # left them about 1/30 of a CPU beside another busy process, and the suite crawled
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray Train's controller polls its workers every 2 s and a worker's report (each checkpoint) waits for the next
    # poll: 9 reports of a 20-step test run waited ~12 s in all, and the run's end ~5 s more. Ray Train passes this
    # on to every controller the suite starts; what a run computes does not depend on it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def unbroken_finetune(corpus_with_bad_clips, tiny_hubert, tmp_path_factory):
    """The fault test's fine-tuning run (``tiny.fault_run_settings``) without a fault, as ``asd-ray finetune``
    runs it: a Ray of its own of 2 CPUs, the default resources, the run named by the command. What a run that loses
    a node must end with, checkpoint for checkpoint (test_node_loss), what test_finetune checks the training of, and
    whose console and run.log test_console reads. -> (checkpoint, run_dir, steps, clips, console: the finished
    process, its stdout and stderr)."""
    import json
    from types import SimpleNamespace

    from asd_ray.distributed.finetune import read_steps
    from tiny import asd_ray, fault_run_settings

    store = tmp_path_factory.mktemp("unbroken-finetune")
    settings = [*fault_run_settings(tiny_hubert, store, None), "ray.num_cpus=2"]
    done = asd_ray("finetune", "--data", corpus_with_bad_clips, *[a for kv in settings for a in ("--set", kv)],
                   timeout=600)
    (run_dir,) = store.iterdir()  # named finetune-<time> by the command
    summary = json.loads((run_dir / "finetune.json").read_text())
    return SimpleNamespace(checkpoint=Path(summary["checkpoint"]), run_dir=run_dir, clips=summary["clips"],
                           steps=read_steps(run_dir / "steps.jsonl"), console=done)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """2 dev machines + 1 eval machine, DCASE layout, 2 s clips."""
    return generate_corpus(tmp_path_factory.mktemp("tiny") / "data", **TINY)


@pytest.fixture(scope="session")
def corpus_with_bad_clips(tiny_corpus, tmp_path_factory):
    """The tiny corpus plus one bad clip of each kind among ToyCar's train and test clips, and in each of the two
    folders a directory named like a clip and a dangling symbolic link (``NOT_FILES``)."""
    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(tiny_corpus, root)
    train = root / "dev_data/raw/ToyCar/train"
    test = root / "dev_data/raw/ToyCar/test"
    (train / "section_00_source_train_normal_0900_spd_99_mic_1.wav").write_bytes(b"RIFF....WAVEjunk")
    (test / "section_00_source_test_normal_0900_spd_99_mic_1.wav").write_bytes(b"")
    good = sorted(test.glob("section_00_target_test_anomaly_*"))[0].read_bytes()
    (test / "section_00_target_test_anomaly_0901_spd_99_mic_2.wav").write_bytes(good[:40])
    (train / "clip recorded tuesday.wav").write_bytes(good)
    for name, reason in NOT_FILES.items():
        entry = (train if "_train_" in name else test) / name
        if "directory" in reason:
            entry.mkdir()
        else:
            entry.symlink_to(root / "gone" / name)
    return root


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """tiny_encoder(family) -> the directory of a tiny randomly initialised encoder of that family (``tiny.FAMILIES``)
    and its feature extractor, saved with save_pretrained once per session."""
    saved = {}

    def get(family):
        if family not in saved:
            saved[family] = tmp_path_factory.mktemp("encoders") / f"tiny-{family}"
            save_tiny_encoder(family, saved[family])
        return saved[family]

    return get


@pytest.fixture(scope="session")
def tiny_hubert(tiny_encoder):
    """A randomly initialised 2-layer HuBERT (GroupNorm feature encoder, as Base; no feature extractor saved)."""
    return tiny_encoder("hubert")


@pytest.fixture
def make_wav(tmp_path):
    """make_wav(name, samples, rate=16000, subtype="PCM_16") -> path of a wav written in tmp_path."""

    def write(name, samples, rate=16_000, subtype="PCM_16"):
        path = tmp_path / name
        sf.write(str(path), samples, rate, subtype=subtype)
        return path

    return write


def tone(seconds=2.0, rate=16_000, freq=440.0, channels=1, amp=0.1):
    """A sine with a little noise; (n,) or (n x channels)."""
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


@pytest.fixture
def make_tone():
    return tone


@pytest.fixture(scope="session")
def tiny_beats(tmp_path_factory):
    """A 2-layer BEATs checkpoint file in the official format ({"cfg", "model"}), the seeded weights of the fixtures
    that the reference implementation made (tests/fixtures/beats/tiny.npz)."""
    import json

    from asd_ray.models.beats import write_random_checkpoint

    made = np.load(CHECKOUT / "tests/fixtures/beats/tiny.npz")
    return write_random_checkpoint(tmp_path_factory.mktemp("beats") / "tiny.pt", json.loads(str(made["cfg"])),
                                   int(made["seed"]))


@pytest.fixture(scope="session")
def tiny_eat(tmp_path_factory):
    """A 2-block EAT checkpoint file in the fairseq layout ({"cfg": {"model"}, "model"}), the seeded weights of the
    fixtures that the reference implementation made (tests/fixtures/eat/tiny.npz)."""
    import json

    from asd_ray.models.eat import write_random_checkpoint

    made = np.load(CHECKOUT / "tests/fixtures/eat/tiny.npz")
    return write_random_checkpoint(tmp_path_factory.mktemp("eat") / "tiny.pt", **json.loads(str(made["size"])),
                                   seed=int(made["seed"]))
