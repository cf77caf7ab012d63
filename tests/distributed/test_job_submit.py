"""`ray job submit` of jobs/run.py to a local head this test starts (and stops): the job writes the official CSVs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The ray CLI of the interpreter running the tests (its console script may live in another bin folder,
# e.g. a virtualenv over the system site-packages).
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """A second Ray (head + dashboard with the Jobs server) in its own process group, killed with it after."""
    gcs, dash, agent, agent_grpc, client, metrics, runtime_env = _free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the whole group: gcs, raylet, dashboard, workers of this head only
        head.wait()
        log.close()
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` left the dead head's address for ray.init()
        if current.is_file() and f":{gcs}" in current.read_text():
            current.unlink()


@pytest.mark.timeout(400)
def test_ray_job_submit_runs_the_main_job(ray_head, tiny_corpus, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-out"
    cmd = [*RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), "--",
           sys.executable, "jobs/run.py", "--data", str(tiny_corpus), "--out", str(out),
           "--set", f"ray.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    for machine in ("ToyCar", "valve", "ToyPet"):
        assert (out / f"anomaly_score_{machine}_section_00_test.csv").is_file()
        assert (out / f"decision_result_{machine}_section_00_test.csv").is_file()
    assert json.loads((out / "metrics.json").read_text())["official_score"] > 0
