"""Ctrl-C ends a command on Ray cleanly: one line, no traceback, exit status 130, and Ray shut down (none of its
processes left behind). The signal goes to the command's whole process group, as a terminal sends it, once the
command has printed the bar of the stage it is in (never after a guessed duration)."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from test_console import ENV

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m 'not slow'` leaves it out


def _processes_tagged(tag: str) -> list[str]:
    """Command lines of the live processes whose environment holds ``ASD_RAY_TEST_TAG=tag``: the command and every
    process of the Ray it started (raylet, GCS, workers inherit its environment), wherever they were re-parented."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if f"ASD_RAY_TEST_TAG={tag}".encode() not in open(f"/proc/{entry.name}/environ", "rb").read().split(b"\0"):
                continue
            if open(f"/proc/{entry.name}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found.append(open(f"/proc/{entry.name}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return found


def interrupt_when(args: list, marker: str) -> tuple[int, str, list[str]]:
    """Run ``asd-ray args`` in a session of its own; once ``marker`` is on its stderr, SIGINT its process group.
    Returns (exit status, its stderr from then on, processes of its Ray still alive after it exited)."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "asd_ray.cli", *map(str, args)], env={**ENV, "ASD_RAY_TEST_TAG": tag},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen, chunks = threading.Event(), []

    def read():  # tqdm redraws with "\r" and no newline: read what comes, not lines
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append(chunk)
            if marker.encode() in b"".join(chunks):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(400), f"{marker!r} never printed: {b''.join(chunks).decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGINT)
        sent = len(chunks)
        code = proc.wait(timeout=180)
        reader.join(timeout=30)
        for _ in range(120):  # Ray's workers end as their raylet goes: give them the moment it takes
            if not (left := _processes_tagged(tag)):
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # what the command printed from the moment Ctrl-C reached it (the run's own output before is no concern here:
    # with several Rays on one machine, Ray Train's placement-group cleaner prints a traceback of its own)
    return code, b"".join(chunks[sent:]).decode(errors="replace"), left


@pytest.mark.timeout(600)
def test_ctrl_c_ends_a_sweep_cleanly(tiny_corpus, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("base:\n  detector: local\ngrid:\n  local.pca_dim: [16, 32]\n  local.whiten: [true, false]\n")
    code, stderr, left = interrupt_when(["sweep", "--data", tiny_corpus, "--space", space, "--out", tmp_path / "s",
                                         "--machines", "valve", "--set", f"ray.cache_dir={tmp_path / 'cache'}"],
                                        marker="trials")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("asd-ray sweep: interrupted (Ctrl-C); Ray shut down")
    assert not left, left


@pytest.mark.timeout(600)
def test_ctrl_c_ends_a_run_cleanly(tiny_corpus, tmp_path):
    code, stderr, left = interrupt_when(["run", "--data", tiny_corpus, "--out", tmp_path / "r", "--machines", "valve",
                                         "--detector", "local", "--set", f"ray.cache_dir={tmp_path / 'cache'}"],
                                        marker="embed")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("asd-ray run: interrupted (Ctrl-C); Ray shut down")
    assert not left, left


@pytest.mark.timeout(600)
def test_ctrl_c_ends_a_finetune_cleanly(tiny_corpus, tiny_hubert, tmp_path):
    """Ray Train's own SIGINT handler aborted the run and let the command go on as if training had ended."""
    code, stderr, left = interrupt_when(["finetune", "--data", tiny_corpus, "--machines", "valve", "--init", tiny_hubert,
                                         "--set", "finetune.batch_size=4", "--set", "finetune.crop_seconds=1.0",
                                         "--set", "finetune.heldout_clips=4", "--set", "finetune.epochs=50",
                                         "--set", f"finetune.storage_path={tmp_path / 'store'}"],
                                        marker="loss ")  # steps are being trained: Ray Train is in charge
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("asd-ray finetune: interrupted (Ctrl-C); Ray shut down")
    assert not left, left
