"""Losing a worker node (SPEC §8, issue 22 item 9): a run, a fleet and a fine-tuning run on a multi-node Ray on one
machine end as they would without the fault. ``node_loss.py`` runs the three scenarios one after the other on one
cluster (a replacement node joins after each loss, as an autoscaler's does) in a process of its own, so the session's
Ray and the tests after these never see it; each test reads its scenario's result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asd_ray.config import RunConfig, load_config
from asd_ray.detect import reference_run
from node_loss import checkpoints
from tiny import command_env

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m 'not slow'` leaves it out

SCRIPT = Path(__file__).with_name("node_loss.py")


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """The run without the fault (no Ray), and its banks (``<folder>/banks``, what the fleet serves)."""
    config = load_config(RunConfig, None, ["detector=local", "local.bank_size=300"])
    folder = tmp_path_factory.mktemp("node-loss-ref")
    return reference_run([tiny_corpus], config, folder), folder


@pytest.fixture(scope="module")
def lost_nodes(tiny_corpus, corpus_with_bad_clips, tiny_hubert, reference, tmp_path_factory) -> dict:
    """``node_loss.py`` with the three scenarios, in a process group of its own: {scenario: its result.json}."""
    out = tmp_path_factory.mktemp("node-loss")
    env = command_env()
    log = out / "node_loss.log"
    args = ["--run", tiny_corpus, "--fleet", tiny_corpus, reference[1] / "banks",
            "--finetune", corpus_with_bad_clips, tiny_hubert]
    with open(log, "w") as fh:  # a group of its own: a timeout ends its Ray cluster's processes too
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), *map(str, args)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=1500)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timed out"
    assert rc == 0, f"node_loss.py: {rc}\n" + log.read_text()[-6000:]
    return {mode: json.loads((out / mode / "result.json").read_text()) | {"log": log}
            for mode in ("run", "fleet", "finetune")}


def _scenario(lost_nodes: dict, mode: str) -> dict:
    got = lost_nodes[mode]
    assert "error" not in got, f"{mode}: {got['error']}\n" + got["log"].read_text()[-6000:]
    return got


def _assert_same_scores(got: dict, ref) -> None:
    assert set(got["scores"]) == set(ref.results)
    for machine, res in ref.results.items():
        assert sorted(got["scores"][machine]) == sorted(res.filenames)  # every clip scored: none lost
        np.testing.assert_allclose([got["scores"][machine][f] for f in res.filenames], res.raw_scores, rtol=1e-6)


@pytest.mark.timeout(1800)  # the first test starts the three scenarios
def test_a_run_that_loses_a_worker_node_while_it_embeds_scores_as_without_the_fault(lost_nodes, reference):
    ref = reference[0]
    got = _scenario(lost_nodes, "run")
    assert got["removed"] and got["alive_nodes"] == 2  # the head and the worker node left
    _assert_same_scores(got, ref)
    assert got["decisions"] == {m: r.decisions.tolist() for m, r in ref.results.items()}


@pytest.mark.timeout(1800)
def test_a_fleet_that_loses_a_worker_node_while_it_scores_streams_answers_every_request(lost_nodes, reference):
    ref = reference[0]
    got = _scenario(lost_nodes, "fleet")
    assert got["removed"] and got["alive_nodes"] == 2
    assert got["errors"] == [] and got["requests"] == sum(len(r.filenames) for r in ref.results.values())
    _assert_same_scores(got, ref)


@pytest.mark.timeout(1800)
def test_a_finetuning_run_that_loses_a_worker_node_checkpoints_as_without_the_fault(lost_nodes, unbroken_finetune):
    got = _scenario(lost_nodes, "finetune")
    assert got["removed"] and got["alive_nodes"] == 3  # the head, the worker node left and its replacement
    # rank 0's steps since its last write before the loss may be lost with it: the restart shows in start_step
    first, resumed = got["start_steps"]
    faulted, unbroken = checkpoints(Path(got["run_dir"])), checkpoints(unbroken_finetune.run_dir)
    assert first == 0 and resumed in faulted  # resumed from a checkpoint, not from scratch
    total = len(unbroken_finetune.steps)
    assert sorted(set(got["steps"])) == [s["step"] for s in unbroken_finetune.steps] == list(range(1, total + 1))
    assert sorted(faulted) == sorted(unbroken) and max(faulted) == total  # every checkpoint, the last at the end
    # every checkpoint's student weights bit for bit (the same draws and rows, one torch thread per worker in both,
    # whatever CPUs the workers were given, in another process and another Ray)
    for step, weights in unbroken.items():
        assert sorted(faulted[step]) == sorted(weights)
        for key, w in weights.items():
            np.testing.assert_array_equal(faulted[step][key], w, err_msg=f"step {step}: {key}")
