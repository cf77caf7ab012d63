"""What `asd-ray run` prints: a bar per stage and a summary on the console, Ray's own lines in run.log only."""

import os
import subprocess
import sys


def test_run_console_shows_stage_bars_and_a_summary_and_sends_ray_lines_to_the_run_log(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    # RAY_ADDRESS=local: a Ray of its own, whatever else runs on this machine
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-m", "asd_ray.cli", "run", "--data", str(tiny_corpus), "--out", str(out),
                           "--machines", "valve", "--detector", "knn", "--set", f"ray.cache_dir={tmp_path / 'cache'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("discover", "embed", "banks", "scoring", "report"):
        assert name in done.stderr
    assert "100%" in done.stderr and "clip/s" in done.stderr
    assert "official score" in done.stdout and "time: discover" in done.stdout and "run.log" in done.stdout
    console = done.stdout + done.stderr
    assert " INFO " not in console and "WARNING" not in console and "streaming_executor" not in console
    ray_lines = (out / "run.log").read_text()
    assert "Started a local Ray instance" in ray_lines and "Starting execution of Dataset" in ray_lines
