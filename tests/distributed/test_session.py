"""Starting a local Ray (``session.ensure_ray``)."""

import os
import subprocess
import sys

import pytest

from tiny import command_env

SCRIPT = """
import os
os.nice(3)
import ray
from asd_ray.distributed.session import ensure_ray
assert ensure_ray(1, data_logs_now=False)
print("worker nice", ray.get(ray.remote(lambda: os.nice(0)).remote()), "cpus", ray.cluster_resources()["CPU"])
"""


@pytest.mark.parametrize("address", [None, "local"])
def test_a_runs_own_ray_keeps_its_workers_at_the_runs_priority(address):
    """Ray starts its workers 15 nice levels below their raylet: beside another busy process they got about 1/30
    of a CPU and the run crawled where --local got a fair share. A run's own Ray keeps them at the run's, and has
    the CPUs the run asked for. ``RAY_ADDRESS=local`` asks for a Ray of one's own too: it took the path of joining
    a cluster (every CPU of the machine, a dashboard, Ray's niceness)."""
    env = command_env()  # no RAY_ADDRESS: a user's shell
    env.pop("RAY_worker_niceness", None)
    if address:
        env["RAY_ADDRESS"] = address
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    base = os.nice(0)
    assert f"worker nice {min(base + 3, 19)} cpus 1.0" in done.stdout, done.stdout
