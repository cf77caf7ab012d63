"""What the commands on Ray print: a bar per stage and a summary on the console, Ray's own lines (and the output
of its worker processes) in run.log only, errors on the console; -v shows everything."""

import json
import re
import subprocess
import sys

import pytest

from asd_ray.distributed.session import worker_output_is_error
from tiny import asd_ray, command_env

ENV = command_env()  # a Ray of its own, as a user's command starts it


def imported(done: subprocess.CompletedProcess) -> tuple[set[str], str]:
    """A run under ``python -X importtime``: (the modules its process imported, its stderr without those lines)."""
    lines = done.stderr.splitlines(keepends=True)
    names = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return names, "".join(line for line in lines if not line.startswith("import time:"))


def assert_quiet(console: str) -> None:
    # Ray's own lines put a tab before the level ("...,123\tINFO worker.py:...")
    assert not re.search(r"\bINFO\b", console) and "WARNING" not in console and "streaming_executor" not in console


PROBE = """
import json, sys
import ray
import asd_ray.distributed.embed_pool as embed_pool
from asd_ray.cli import main

HEAVY = ("ray.data", "pandas", "sklearn", "torch", "matplotlib", "asd_ray.detect")
seen = {}

def probe(name, fn):
    def wrapped(*args, **kwargs):
        seen.setdefault(name, sorted(m for m in HEAVY if m in sys.modules))
        return fn(*args, **kwargs)
    return wrapped

ray.init = probe("ray.init", ray.init)
embed_pool.actor_embed_kwargs = probe("pool", embed_pool.actor_embed_kwargs)  # called as the actors are submitted
code = main(sys.argv[2:])
json.dump(seen, open(sys.argv[1], "w"))
sys.exit(code)
"""


@pytest.mark.slow
def test_a_run_shows_stage_bars_and_a_summary_and_starts_ray_and_its_actors_before_its_heavy_imports(
        tiny_corpus, tiny_hubert, tmp_path):
    """One run of the clip k-NN detector over a tiny HuBERT, under ``python -X importtime`` and the probe above:
    - the console shows a bar per stage and a summary; Ray's own lines go to run.log only;
    - the embedding actors' start (their own imports of torch and transformers: 11 s on a GPU node) can only
      follow Ray's, so the driver starts Ray and the actors before importing Ray Data, scoring and the report
      (5.4 s on the GPU node; before this, all of it came first);
    - the driver never needs torch (seconds of its start on a GPU node, before Ray is up), and the report's plots
      are drawn in Ray tasks."""
    seen, out = tmp_path / "seen.json", tmp_path / "run"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE, seen, "run", "--data", tiny_corpus,
                           "--out", out, "--machines", "valve", "--detector", "knn", "--backbone", tiny_hubert,
                           "--set", f"ray.cache_dir={tmp_path / 'cache'}"], env=ENV, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(seen.read_text()) == {"ray.init": [], "pool": []}
    modules, stderr = imported(done)
    assert "ray.data" in modules and "sklearn" in modules and "torch" not in modules and "matplotlib" not in modules
    assert (out / "plot_valve.png").read_bytes().startswith(b"\x89PNG") and "(plot_valve.png)" in (out / "report.md").read_text()
    for name in ("discover", "embed", "banks", "scoring", "report"):
        assert name in stderr
    assert "100%" in stderr and "clip/s" in stderr
    assert "official score" in done.stdout and "time: discover" in done.stdout and "run.log" in done.stdout
    assert_quiet(done.stdout + stderr)
    ray_lines = (out / "run.log").read_text()
    assert "Started a local Ray instance" in ray_lines and "Starting execution of Dataset" in ray_lines


@pytest.mark.slow
def test_embed_sends_ray_lines_to_its_run_log_and_verbose_shows_them(tiny_corpus, tmp_path):
    common = ["--data", tiny_corpus, "--machines", "valve", "--set", f"ray.cache_dir={tmp_path / 'cache'}"]
    done = asd_ray("embed", "--out", tmp_path / "quiet", *common)
    assert "36 clips embedded, 0 rejected, 2 not used" in done.stdout
    assert f"{tmp_path / 'quiet' / 'run.log'}" in done.stdout
    assert_quiet(done.stdout + done.stderr)
    ray_lines = (tmp_path / "quiet" / "run.log").read_text()
    assert "Started a local Ray instance" in ray_lines and "Starting execution of Dataset" in ray_lines
    assert "supplemental clip: not part of a bank" in (tmp_path / "quiet" / "unused.csv").read_text()

    loud = asd_ray("-v", "embed", "--out", tmp_path / "verbose", *common)  # the cache answers this time
    assert "Started a local Ray instance" in loud.stderr and "not embedding again" in loud.stderr
    assert "Started a local Ray instance" in (tmp_path / "verbose" / "run.log").read_text()


@pytest.mark.slow
def test_finetune_sends_ray_train_output_to_the_run_folders_log(unbroken_finetune):
    """Ray Train's controller and workers print from their own processes: their lines go to run.log too. The run is
    the session's unbroken fine-tuning run, ``asd-ray finetune`` with 2 workers over ``corpus_with_bad_clips``."""
    done, run_dir = unbroken_finetune.console, unbroken_finetune.run_dir
    console = done.stdout + done.stderr
    assert f"fine-tuned on {unbroken_finetune.clips} clips (1 rejected, " in done.stdout
    total = len(unbroken_finetune.steps)
    # a bar of the training steps (steps/s and ETA are tqdm's) with the latest loss
    assert re.search(rf"finetune\s*: 100%.*\| {total}/{total} .*step.*loss [0-9.e+-]+, epoch 2", done.stderr), \
        done.stderr[-1000:]
    assert_quiet(console)
    assert "TrainController" not in console and "RayTrainWorker" not in console and "core_worker" not in console
    assert run_dir.name.startswith("finetune-")  # named by the command, before Ray started
    assert f"{run_dir / 'run.log'}" in done.stdout
    ray_lines = (run_dir / "run.log").read_text()
    assert "Started a local Ray instance" in ray_lines and "(TrainController pid=" in ray_lines
    assert "(RayTrainWorker pid=" in ray_lines
    assert json.loads((run_dir / "finetune.json").read_text())["counts"]["trained_on"] == unbroken_finetune.clips


def test_worker_output_reaches_the_console_only_when_it_reports_an_error():
    assert worker_output_is_error(["Exception in thread Monitor:", "Traceback (most recent call last):",
                                   '  File "x.py", line 1, in run', "ConnectionError: no"])
    assert worker_output_is_error(["2026-11-25 17:56:04,529\tERROR worker.py:12 -- a task failed"])
    assert worker_output_is_error(["[2026-11-25 17:56:04,529 E 20525 20557] task_manager.cc:1: Task failed"])
    assert not worker_output_is_error(["Requesting resources: {'CPU': 0.5} * 1",
                                       "Setting up process group for: env:// [rank=0, world_size=1]"])
    assert not worker_output_is_error([  # Ray's notice at level E on a clean run (ray-project/ray#53727)
        "[2026-11-25 17:56:04,529 E 20525 20557] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: '2d4d' has constructor arguments in the object store and max_restarts > 0. If the arguments in "
        "the object store go out of scope or are lost, the actor restart will fail."])


NOTICES = """
import sys
from pathlib import Path

import ray._private.worker as worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from asd_ray.distributed import session

session.route_logs(Path(sys.argv[1]))
dispatcher.add_handler("ray_print_logs", lambda data: worker.print_to_stdstream(data, ignore_prefix=False))
session._route_worker_output()  # as after ray.init with log_to_driver
def notice(text):  # as the driver's thread listen_error_messages passes the GCS's error notices on
    worker.print_to_stdstream({"lines": [text], "pid": "raylet", "is_err": False}, ignore_prefix=False)
notice("A worker died or was killed while executing a task by an unexpected system error.")
session.mute_worker_output()  # a command stopping: Serve's shutdown, Ctrl-C
notice("Task ServeController.graceful_shutdown failed. There are infinite retries remaining")
"""


def test_the_gcs_error_notices_reach_the_run_log_and_the_console_unless_the_command_is_stopping(tmp_path):
    """The raylet's notices (a worker killed: on the console; Serve's controller killed by the shutdown a Ctrl-C
    asked for: run.log only). Before, the second reached the console of a serve stopped by Ctrl-C."""
    log = tmp_path / "run.log"
    done = subprocess.run([sys.executable, "-c", NOTICES, str(log)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "A worker died" in console and "graceful_shutdown" not in console
    assert "(raylet) A worker died" in log.read_text() and "(raylet) Task ServeController" in log.read_text()


def test_synth_shows_a_bar_of_the_clips_it_writes(tmp_path):
    done = asd_ray("synth", "--out", tmp_path / "c", "--machines", "fan", "--train-source", "40", "--test-per-cell",
                   "2", "--supplemental", "0", "--seconds", "1", "--workers", "2")
    bar = [line for line in re.split(r"[\r\n]", done.stderr) if line.startswith("synth")]
    assert bar and "58/58" in bar[-1] and "100%" in bar[-1], done.stderr  # 40 + 10 train, 8 test clips
    assert "wrote 58 clips" in done.stdout
