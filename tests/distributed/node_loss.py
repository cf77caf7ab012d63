"""Losing a worker node of a multi-node Ray on one machine (``ray.cluster_utils.Cluster``), run by
test_node_loss.py in a process of its own: the test session's own Ray is never touched.

    python tests/distributed/node_loss.py OUT [--run CORPUS] [--fleet CORPUS BANKS] [--finetune CORPUS INIT]

One cluster for the scenarios asked for, one after the other, as a cluster serves job after job: a head without
CPUs (the driver's node) and two worker nodes of 1 CPU each. In each scenario the worker node holding the work is
removed at a fixed point of it; a node of 1 CPU then joins in its place (what a cluster's autoscaler does), so that
each scenario starts on the same three nodes:
- ``run``: ``ray_run`` of the local-feature detector, once its first batch of log-mel matrices came back (Ray Data
  tasks on the workers go on elsewhere; the fitting tasks that follow find one node);
- ``fleet``: ``score_streams`` of every test clip through the bank and embedding actors, once its first request
  was answered (the actors on that node restart on the other one and their calls are retried).
- ``finetune``: the fault test's fine-tuning run (``tiny.fault_run_settings``; workers of 0.6 CPU, so that each worker
  node holds one, beside feed tasks of 0.4) with the node of a training worker removed once Ray Train has registered
  the first checkpoint; the replacement joins during the run, since the one node left cannot hold both workers.
  Ray Train restarts the group from the last checkpoint.
Writes ``OUT/<scenario>/result.json``: {"removed": node id, "alive_nodes": live nodes at the scenario's end, before
a replacement joins, "scores": {machine: {file: raw score}}, "errors": [...], "requests": n}; for ``finetune``:
{"removed", "alive_nodes", "run_dir", "final": the last checkpoint's folder name, "steps": rank 0's step numbers,
"start_steps": the steps its workers (re)started from}; a scenario that raised: {"error": its traceback}, and the
next one runs. Starting the cluster once saves two cluster starts (~25 s each here) of three separate processes.
The run without the fault is the reference run (no Ray) for ``run`` and ``fleet``, the test session's unbroken run
(``unbroken_finetune``) for ``finetune``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path


def _worker_node_of(workers: dict[str, object], names: tuple[str, ...]) -> str | None:
    """The id of a worker node (of ``workers``) whose raylet runs an actor process titled ``ray::<name>`` for one of
    ``names`` (from /proc: no dashboard, hence no state API, here); None when none does."""
    raylets = {node.all_processes["raylet"][0].process.pid: node_id for node_id, node in workers.items()}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid in raylets and any(title.startswith(f"ray::{n}") for n in names):
            return raylets[ppid]
    return None


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train has registered for the run in ``run_dir`` (its checkpoint manager's snapshot), the
    ones a restart resumes from; a checkpoint folder appears before it is registered, and a worker lost in between
    restarts the run from scratch."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return []
    return [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]


def checkpoints(folder: Path) -> dict[int, dict]:
    """{step: the student's weights (name -> array)} of every checkpoint of a fine-tuning run's folder."""
    from safetensors.numpy import load_file

    from asd_ray.models.finetune import load_training_state

    return {int(load_training_state(d / "training_state.pt")["step"]): load_file(str(d / "model.safetensors"))
            for d in sorted(folder.glob("checkpoint_*")) if d.is_dir()}


def _finetune_faulted(corpus: str, out_dir: Path, init: str, cluster, workers: dict, remove) -> dict:
    import threading
    import time

    from asd_ray.config import RunConfig, load_config
    from asd_ray.distributed.finetune import finetune

    if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: tests/ (tiny) is not on its path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny import fault_run_settings

    # workers of 0.6 CPU, so that each worker node of 1 CPU holds one, beside feed tasks of 0.4
    config = load_config(RunConfig, None, [*fault_run_settings(init, out_dir / "store", "faulted"),
                                           "finetune.worker_cpus=0.6", "finetune.feed_cpus=0.4"])
    got: list = []

    def run() -> None:  # in a thread: nodes are added from the main thread only
        try:
            got.append(finetune([corpus], config))
        except BaseException as err:  # noqa: BLE001 - raised again in the main thread
            got.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():  # the first checkpoint in: the node of a training worker goes
        if registered_checkpoints(out_dir / "store" / "faulted"):
            remove(("RayTrainWorker",))
            node = cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)  # the autoscaler's replacement
            workers[node.node_id] = node
            print("replacement node added", node.node_id, flush=True)
            break
        time.sleep(0.02)
    thread.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    result = got[0]
    print("faulted done:", result.checkpoint, flush=True)
    return {"run_dir": str(result.run_dir), "final": result.checkpoint.name, "steps": [s["step"] for s in result.steps],
            "start_steps": sorted({s["start_step"] for s in result.steps})}


def _start_cluster(Cluster, attempts: int = 3):
    """The head (no CPU) and two worker nodes of 1 CPU: (cluster, {node id: node}). Ray waits a fixed 30 s for a new
    raylet to register (ray/_private/node.py), which a machine busy with other work can exceed: the whole cluster
    is then started again, so the scenario is always the same three nodes."""
    # a lost node is known dead after 5 missed health checks, 1 s apart (Ray's default: 3 s apart, 15 s of waiting
    # in each test); a live raylet still has Ray's own 10 s to answer each
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                    "object_store_memory": 128 * 2**20,
                                                                    "_system_config": health})
            workers = {}
            for _ in range(2):
                node = cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
                workers[node.node_id] = node
            return cluster, workers
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for it
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            print(f"a node timed out starting (attempt {attempt}): the cluster again", flush=True)
            if cluster is not None:
                cluster.shutdown()


def _run_scenario(corpus: str, config, out_dir: Path, remove) -> dict:
    import asd_ray.distributed.embed as embed
    import asd_ray.distributed.run as run

    advance = embed.advance

    def advance_then_fail(n: int = 1) -> None:  # the first batch of log-mel matrices is back: lose its node
        advance(n)
        remove(None)

    embed.advance = advance_then_fail
    try:
        report = run.ray_run([corpus], config, out_dir / "ray")
    finally:
        embed.advance = advance
    return {"scores": {m: dict(zip(r.filenames, map(float, r.raw_scores))) for m, r in report.results.items()},
            "decisions": {m: r.decisions.tolist() for m, r in report.results.items()}}


def _fleet_scenario(corpus: str, banks: str, config, out_dir: Path, remove) -> dict:
    from asd_ray.distributed import fleet, streams

    finish = fleet.Router._finish

    def finish_then_fail(self, pending, *args, **kwargs):  # one request answered: lose a node with actors
        finish(self, pending, *args, **kwargs)
        remove(("StreamEmbedder", "BankActor"))

    fleet.Router._finish = finish_then_fail
    try:
        results = streams.score_streams(banks, config, out_dir / "fleet", roots=[corpus])
    finally:
        fleet.Router._finish = finish
    scores: dict = {}
    for r in results:
        scores.setdefault(r.machine, {})[r.path.rsplit("/", 1)[1]] = r.raw_score
    return {"requests": len(results), "errors": [r.error for r in results if r.error], "scores": scores}


def main(argv: list[str]) -> None:
    import argparse
    import traceback

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--run", metavar="CORPUS")
    parser.add_argument("--fleet", nargs=2, metavar=("CORPUS", "BANKS"))
    parser.add_argument("--finetune", nargs=2, metavar=("CORPUS", "INIT"))
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from asd_ray.config import RunConfig, load_config

    cluster, workers = _start_cluster(Cluster)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    print("cluster up:", len(workers), "worker nodes", flush=True)
    for mode in ("run", "fleet", "finetune"):
        if getattr(args, mode) is None:
            continue
        out_dir = Path(args.out) / mode
        out_dir.mkdir(parents=True, exist_ok=True)
        config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "detector=local",
                                               "local.bank_size=300", f"ray.cache_dir={out_dir / 'cache'}"])
        removed: list[str] = []

        def remove(names: tuple[str, ...] | None) -> None:
            if removed:
                return
            victim = _worker_node_of(workers, names) if names else None
            victim = victim or next(iter(workers))  # tasks run on both worker nodes (the head has no CPU)
            print(mode, ": removing worker node", victim, flush=True)
            cluster.remove_node(workers.pop(victim), allow_graceful=False)
            removed.append(victim)
            print("removed", flush=True)

        print("scenario", mode, flush=True)
        try:
            if mode == "run":
                result = _run_scenario(args.run, config, out_dir, remove)
            elif mode == "fleet":
                result = _fleet_scenario(*args.fleet, config, out_dir, remove)
            else:
                result = _finetune_faulted(args.finetune[0], out_dir, args.finetune[1], cluster, workers, remove)
            result["removed"] = removed[0] if removed else None
            result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        except Exception:  # noqa: BLE001 - this scenario's test reports it; the next scenario runs
            result = {"error": traceback.format_exc()}
            print(result["error"], flush=True)
        (out_dir / "result.json").write_text(json.dumps(result))
        while len(workers) < 2:  # the autoscaler's replacement: the next scenario starts on three nodes again
            node = cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
            workers[node.node_id] = node
            print("replacement node added", node.node_id, flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
