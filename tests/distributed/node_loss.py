"""Losing a worker node of a multi-node Ray on one machine (``ray.cluster_utils.Cluster``), run by
test_node_loss.py in a process of its own: the test session's own Ray is never touched.

    python tests/distributed/node_loss.py {run|fleet} <corpus root> <out dir>

A head without CPUs (the driver's node) and two worker nodes of 1 CPU each; the worker node holding the work is
removed at a fixed point of it:
- ``run``: ``ray_run`` of the local-feature detector, once its first batch of log-mel matrices came back (Ray Data
  tasks on the workers go on elsewhere; the fitting tasks that follow find one node);
- ``fleet``: ``score_streams`` of every test clip through the bank and embedding actors, once its first request
  was answered (the actors on that node restart on the other one and their calls are retried).
Writes ``<out dir>/result.json``: {"removed": node id, "scores": {machine: {file: raw score}}, "errors": [...],
"requests": n}. The reference run (no Ray) is the run without the fault.
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


def main(mode: str, corpus: str, out: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from asd_ray.config import RunConfig, load_config

    out_dir = Path(out)
    config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "detector=local",
                                           "local.bank_size=300", f"ray.cache_dir={out_dir / 'cache'}"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 128 * 2**20})
    workers = {}
    for _ in range(2):
        node = cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
        workers[node.node_id] = node
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    print("cluster up:", len(workers), "worker nodes", flush=True)
    removed: list[str] = []

    def remove(names: tuple[str, ...] | None) -> None:
        if removed:
            return
        victim = _worker_node_of(workers, names) if names else None
        victim = victim or next(iter(workers))  # tasks run on both worker nodes (the head has no CPU)
        print("removing worker node", victim, flush=True)
        cluster.remove_node(workers[victim], allow_graceful=False)
        removed.append(victim)
        print("removed", flush=True)

    result: dict = {"errors": []}
    if mode == "run":
        import asd_ray.distributed.embed as embed
        import asd_ray.distributed.run as run

        advance = embed.advance

        def advance_then_fail(n: int = 1) -> None:  # the first batch of log-mel matrices is back: lose its node
            advance(n)
            remove(None)

        embed.advance = advance_then_fail
        report = run.ray_run([corpus], config, out_dir / "ray")
        result["scores"] = {m: dict(zip(r.filenames, map(float, r.raw_scores))) for m, r in report.results.items()}
        result["decisions"] = {m: r.decisions.tolist() for m, r in report.results.items()}
    elif mode == "fleet":
        from asd_ray.distributed import fleet, streams

        finish = fleet.Router._finish

        def finish_then_fail(self, pending, *args, **kwargs):  # one request answered: lose a node with actors
            finish(self, pending, *args, **kwargs)
            remove(("StreamEmbedder", "BankActor"))

        fleet.Router._finish = finish_then_fail
        results = streams.score_streams(out_dir / "ref" / "banks", config, out_dir / "fleet", roots=[corpus])
        result["requests"] = len(results)
        result["errors"] = [r.error for r in results if r.error]
        scores: dict = {}
        for r in results:
            scores.setdefault(r.machine, {})[r.path.rsplit("/", 1)[1]] = r.raw_score
        result["scores"] = scores
    else:
        raise SystemExit(f"mode {mode!r}: run or fleet")
    result["removed"] = removed[0] if removed else None
    result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
    (out_dir / "result.json").write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
