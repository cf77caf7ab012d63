"""A simulated fleet: many machine streams sending clips' features to a ``Router`` open loop, with the
throughput and latency it sustained (``asd-ray serve-fleet --simulate``, ``benchmarks/fleet_scoring.py``)."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from asd_ray.distributed.fleet import Request, Result, Router


@dataclass
class FleetStats:
    """A simulated fleet run: what was offered, what came back, and how long it took."""

    streams: int
    offered_per_s: float
    requests: int
    errors: int
    seconds: float
    sustained_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float


async def simulate_fleet(router: Router, pools: dict[str, Sequence], *, streams: int, rate_hz: float,
                         seconds: float, seed: int = 0) -> tuple[FleetStats, list[Result]]:
    """``streams`` machine streams (machine types round-robin over ``pools``), each sending one clip's features
    (drawn from its machine's pool: an (n x dim) array of clip embeddings, or a list of (T x n_mels) log-mel
    matrices for frame detectors) every ``1 / rate_hz`` s at its own phase, open loop, for
    ``seconds``. Latency runs from a request's scheduled time to its result, so a scheduler falling
    behind shows up in it."""
    rng = np.random.default_rng(seed)
    machines = sorted(pools)
    phase = rng.uniform(0, 1 / rate_hz, streams)
    n_per = int(seconds * rate_hz)
    times = (phase[:, None] + np.arange(n_per)[None, :] / rate_hz).ravel()
    who = np.repeat(np.arange(streams), n_per)
    order = np.argsort(times, kind="stable")
    picks = rng.integers(0, 1 << 30, len(order))
    latencies = np.zeros(len(order))
    results: list[Result | None] = [None] * len(order)
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    remaining = [len(order)]
    # The heap built so far (Ray, numpy, the pools) is frozen out of the cyclic GC: full collections over
    # it stall the loop for 100-800 ms every few seconds, which is the whole p99 budget.
    gc.freeze()
    start = loop.time()

    def finish(j: int, due: float) -> Callable:
        def cb(fut: asyncio.Future) -> None:
            latencies[j] = loop.time() - due
            results[j] = fut.result()
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set_result(None)
        return cb

    for j, idx in enumerate(order):
        due = start + times[idx]
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        s = int(who[idx])
        machine = machines[s % len(machines)]
        pool = pools[machine]
        fut = router.submit(Request(machine, f"stream{s:05d}", embedding=pool[picks[j] % len(pool)]))
        fut.add_done_callback(finish(j, due))
    await all_done
    took = loop.time() - start
    gc.unfreeze()
    stats = FleetStats(streams=streams, offered_per_s=streams * rate_hz, requests=len(results),
                       errors=sum(1 for r in results if r.error), seconds=took, sustained_per_s=len(results) / took,
                       latency_p50_ms=float(np.percentile(latencies, 50) * 1e3),
                       latency_p99_ms=float(np.percentile(latencies, 99) * 1e3))
    return stats, results
