"""`ray job submit` to a local head these tests start (and stop), with Ray's token authentication as
docs/security.md sets it up: jobs/run.py writes the official CSVs; jobs/serve.py deploys the HTTP scoring
service, which answers, and stops it again; a client without the token is refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from asd_ray.config import RunConfig, load_config
from asd_ray.data.audio import preprocess_clip
from asd_ray.data.layout import discover
from asd_ray.detect import reference_run
from asd_ray.detectors import load_detector
from asd_ray.models.backbones import load_backbone

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m 'not slow'` leaves it out

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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A second Ray (head + dashboard with the Jobs server) in its own process group, killed with it after; the
    tests of this module share it (a head starts in tens of seconds on 2 cores). Token authentication on, as
    docs/security.md says: the head and the clients get RAY_AUTH_MODE=token and the token (here in RAY_AUTH_TOKEN,
    a fresh one, so that ~/.ray/auth_token is neither needed nor written)."""
    tmp_path = tmp_path_factory.mktemp("head")
    gcs, dash, agent, agent_grpc, client, metrics, runtime_env = _free_ports(7)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0"}
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


def submit(ray_head, *job, timeout=300) -> str:
    """``ray job submit`` of ``job`` (run by the tests' interpreter) with this repository as its working dir;
    -> what the job printed. Fails unless the job succeeded."""
    address, env = ray_head
    cmd = [*RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", sys.executable, *map(str, job)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_client_without_the_token_is_refused(ray_head, tmp_path):
    """The head runs with token auth: a submit without the token, or with another one, runs nothing."""
    address, env = ray_head
    marker = tmp_path / "ran"
    for client in ({k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
                   {**env, "RAY_AUTH_TOKEN": "0" * 64}):
        done = subprocess.run([*RAY, "job", "submit", "--address", address, "--", sys.executable, "-c",
                               f"open({str(marker)!r}, 'w')"], env=client, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "authentication token" in done.stdout + done.stderr
    assert not marker.exists()


@pytest.mark.timeout(400)
def test_ray_job_submit_runs_the_main_job(ray_head, tiny_corpus, tmp_path):
    out = tmp_path / "job-out"
    submit(ray_head, "jobs/run.py", "--data", tiny_corpus, "--out", out, "--set", f"ray.cache_dir={tmp_path / 'cache'}")
    for machine in ("ToyCar", "valve", "ToyPet"):
        assert (out / f"anomaly_score_{machine}_section_00_test.csv").is_file()
        assert (out / f"decision_result_{machine}_section_00_test.csv").is_file()
    assert json.loads((out / "metrics.json").read_text())["official_score"] > 0


def _get(url, body=None, content_type=None):
    """-> (status, decoded JSON answer) of a GET, or of a POST when ``body`` is given."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _alive_actors(ray_head, name: str) -> list[dict]:
    address, env = ray_head
    done = subprocess.run([*RAY, "list", "actors", "--address", address, "--filter", f"name={name}",
                           "--filter", "state=ALIVE", "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return [] if done.stdout.startswith("No resource") else json.loads(done.stdout)  # its answer when none match


@pytest.mark.timeout(500)
def test_ray_job_submit_runs_the_scoring_service_which_answers_and_stops(ray_head, tiny_corpus, tmp_path):
    """jobs/serve.py deploys the service over one machine's banks (1 replica) and returns; /healthz and a
    /score of a WAV body answer over HTTP with the saved bank's score; jobs/serve.py --stop takes the
    application, Serve and the bank actors down."""
    config = load_config(RunConfig, None, ["detector=knn"])
    reference_run([tiny_corpus], config, tmp_path / "run", ["valve"])
    banks = tmp_path / "run" / "banks"
    (port,) = _free_ports(1)
    namespace = f"job-{uuid.uuid4().hex[:8]}"
    sets = [a for kv in (f"serve.port={port}", f"fleet.namespace={namespace}", f"serve.app_name={namespace}",
                         "serve.replicas=1", "ray.embed_actors=1") for a in ("--set", kv)]
    printed = submit(ray_head, "jobs/serve.py", "--banks", banks, *sets)
    assert f"scoring service '{namespace}' at http://127.0.0.1:{port}" in printed

    url = f"http://127.0.0.1:{port}"
    status, health = _get(url + "/healthz")
    assert status == 200 and health["banks"] == {"valve": "ok"}, health
    clip = sorted(r.path for r in discover([tiny_corpus], ["valve"]) if r.split == "test")[0]
    status, got = _get(url + "/score?machine=valve&stream=line-1", Path(clip).read_bytes(), "audio/wav")
    assert status == 200, got
    embedding = load_backbone(backbone="logmel").embed([preprocess_clip(clip).waveform])[0].astype(np.float32)
    assert got["raw_score"] == pytest.approx(float(load_detector(banks / "valve").score(embedding[None])[0]), rel=1e-6)
    assert len(_alive_actors(ray_head, "bank:valve")) == 1

    printed = submit(ray_head, "jobs/serve.py", "--banks", banks, "--stop", *sets)
    assert f"scoring service '{namespace}': application deleted, Serve stopped; bank actors stopped: bank:valve" \
        in printed
    with pytest.raises(urllib.error.URLError):  # nothing listens on the port any more
        _get(url + "/healthz")
    assert _alive_actors(ray_head, "bank:valve") == []
