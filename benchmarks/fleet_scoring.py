"""P3: k-NN scoring directly on FAISS vs through the bank actors and the router; a simulated fleet.

    python benchmarks/fleet_scoring.py [--streams 1000 --rate 5 --seconds 20] [--json out.json]
    python benchmarks/fleet_scoring.py --frames [--streams 12 --rate 1 --seconds 30] [--work DIR] [--json out.json]

Banks are 1000 x 768 float32 (one per machine type, 7 types), euclidean, k = 3, one FAISS thread,
embeddings pre-computed. Prints one JSON object with every figure.

``--frames``: the same for a fleet of the default detector (``fusion``: a local-feature bank of log-mel windows
and a pooled log-mel clip bank, which eat log-mel frame matrices): a synthetic corpus of 10 s clips
(``--machines``, ``--train`` source train clips each), banks fitted by the reference run, the queries the
log-mel matrices of each machine's test clips (computed by the fleet's embedding actor before the clock
starts, as ``asd-ray serve-fleet --simulate N --data ROOT`` does). Figures: scoring one batch of clips directly
with the saved detector (this process) and through its bank actor, then the simulated fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from asd_ray.bank.memory_bank import MemoryBank
from asd_ray.config import FleetConfig
from asd_ray.data.layout import DEV_MACHINES
from asd_ray.distributed.bank_actors import start_banks
from asd_ray.distributed.fleet import Request, Router
from asd_ray.distributed.simulation import simulate_fleet


def rate(fn, n_items: int, min_seconds: float = 1.5) -> float:
    """Items per second of ``fn`` (called repeatedly for at least ``min_seconds``)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return calls * n_items / (time.perf_counter() - t0)


def pipelined(actor, q: np.ndarray, calls: int = 20, in_flight: int = 2) -> None:
    """``calls`` batches through one actor with ``in_flight`` outstanding, as the router sends them:
    the driver serialises the next batch while the actor searches the last."""
    import ray

    pending = []
    for _ in range(calls):
        if len(pending) >= in_flight:
            ray.get(pending.pop(0))
        pending.append(actor.score.remote(q))
    ray.get(pending)


async def single_latency(router: Router, queries: np.ndarray, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await router.submit(Request("fan", "one", embedding=queries[i % len(queries)]))
        out.append(time.perf_counter() - t0)
    return out


def frame_fleet(args) -> dict:
    """The ``--frames`` figures (see the module docstring)."""
    import platform

    import ray

    from asd_ray.config import RunConfig, load_config
    from asd_ray.data.synth import generate_corpus
    from asd_ray.detect import reference_run
    from asd_ray.detectors import load_detector
    from asd_ray.distributed.fleet import fleet_router
    from asd_ray.distributed.streams import query_pools

    work = args.work or Path(tempfile.mkdtemp(prefix="p3-frames-"))
    corpus, run = work / "corpus", work / "run"
    config = load_config(RunConfig, None, [f"fleet.namespace=p3-frames-{os.getpid()}"])
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "ray_cpus": args.num_cpus,
                 "load_average_at_start": os.getloadavg(), "detector": config.detector,
                 "corpus": {"machines": args.machines, "train_source": args.train, "train_target": 4,
                            "test_per_cell": 10, "seconds": 10.0}}
    if not all((run / "banks" / m / "bank.json").is_file() for m in args.machines):
        t0 = time.perf_counter()
        generate_corpus(corpus, dev_machines=args.machines, eval_machines=(), train_source=args.train,
                        train_target=4, test_per_cell=10, supplemental=0, seconds=10.0, workers=2)
        out["corpus_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        reference_run([corpus], config, run)
        out["fit_s"] = round(time.perf_counter() - t0, 1)
    banks = run / "banks"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    router = fleet_router(banks, config, with_embedders=True)
    out["banks"] = {m: {"kind": st["kind"], "size": st["size"]} for m, st in router.stats.items()}
    t0 = time.perf_counter()
    pools, skipped = query_pools(router, [corpus])
    out["query_clips"] = {m: len(v) for m, v in pools.items()}
    out["query_features_s"] = round(time.perf_counter() - t0, 1)
    out["query_frames_per_clip"] = int(np.median([q.shape[0] for v in pools.values() for q in v]))
    assert not skipped, skipped
    machine = sorted(pools)[0]
    detector, batch = load_detector(banks / machine, faiss_threads=1), pools[machine][:20]
    out["direct_clips_per_s"] = round(rate(lambda: detector.score(batch), len(batch), 5.0), 1)
    actor = router.banks[machine][0]
    out["actor_clips_per_s"] = round(rate(lambda: ray.get(actor.score.remote(batch)), len(batch), 5.0), 1)
    stats, _ = asyncio.run(simulate_fleet(router, pools, streams=args.streams, rate_hz=args.rate,
                                          seconds=args.seconds))
    out["fleet"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.__dict__.items()}
    out["load_average_at_end"] = os.getloadavg()
    ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per stream")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--frames", action="store_true", help="a fleet of the default frame detector (fusion) instead")
    p.add_argument("--machines", nargs="+", default=["ToyCar", "fan", "valve"], help="--frames: machine types")
    p.add_argument("--train", type=int, default=100, help="--frames: source train clips per machine")
    p.add_argument("--work", type=Path, help="--frames: folder for the corpus and banks (kept; reused when there)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.frames:
        out = frame_fleet(args)
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="p3-banks-"))
    banks = {}
    for i, machine in enumerate(DEV_MACHINES):
        bank = MemoryBank(k=3).fit(rng.standard_normal((1000, 768)).astype(np.float32) + 0.1 * i)
        bank.save(root / machine)
        banks[machine] = bank
    actors = start_banks(root, namespace="p3-bench")
    queries = rng.standard_normal((1000, 768)).astype(np.float32)
    out: dict = {"cpus": os.cpu_count(), "ray_cpus": args.num_cpus, "direct_clips_per_s": {},
                 "actor_clips_per_s": {}, "actor_put_clips_per_s": {},
                 "actor_pipelined_clips_per_s": {}}
    fan, actor = banks["fan"], actors["fan"][0]
    for b in (1, 64, 256, 1000):
        q = queries[:b]
        out["direct_clips_per_s"][b] = round(rate(lambda: fan.score(q), b))
        out["actor_clips_per_s"][b] = round(rate(lambda: ray.get(actor.score.remote(q)), b))
        ref = ray.put(q)
        out["actor_put_clips_per_s"][b] = round(rate(lambda: ray.get(actor.score.remote(ref)), b))
        out["actor_pipelined_clips_per_s"][b] = round(rate(lambda: pipelined(actor, q), b * 20))
    out["actor_vs_direct_at_1000"] = round(out["actor_clips_per_s"][1000] / out["direct_clips_per_s"][1000], 3)
    out["pipelined_vs_direct_at_1000"] = round(
        out["actor_pipelined_clips_per_s"][1000] / out["direct_clips_per_s"][1000], 3)

    router = Router(actors, fleet=FleetConfig())
    lat = np.array(asyncio.run(single_latency(router, queries, 2000))) * 1e3
    out["router_single_ms"] = {"p50": round(float(np.percentile(lat, 50)), 3),
                               "p99": round(float(np.percentile(lat, 99)), 3)}

    pools = {m: (b.members() + 0.05 * rng.standard_normal((b.size, 768))).astype(np.float32) for m, b in banks.items()}
    router = Router(actors, fleet=FleetConfig())
    stats, _ = asyncio.run(simulate_fleet(router, pools, streams=args.streams, rate_hz=args.rate, seconds=args.seconds))
    out["fleet"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.__dict__.items()}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
