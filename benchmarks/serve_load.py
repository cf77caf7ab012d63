"""Load test of the HTTP scoring service (`asd-ray serve`) against loopback, and the faults an operator meets.

    python benchmarks/serve_load.py [--seconds 10] [--max-requests 50000] [--connections 32] [--json out.json]

Banks: 5 machines of 1000 x 768 random float32 members (euclidean, k = 3: the embedding path, as P3) and
2 machines fitted by `asd-ray run --detector knn` on a small synthetic corpus of 10 s clips with the logmel
backbone (the WAV path: their test clips are posted as WAV files). One local Ray with 2 CPUs, Serve's
direct ingress on (replicas answer HTTP themselves), the proxy too. Each load is closed-loop: `--connections`
keep-alive connections each send their next request when the last is answered, until `--seconds` pass or
`--max-requests` are answered. The client is a small asyncio HTTP/1.1 client in this process, on the same
2 cores as the service (it takes some of them).

Figures: requests/s, p50/p99 latency, the answers by status and the CPU time per request of every process
below this one (client, Ray, bank and embedding actors, Serve), for
- the in-process router (`Router.submit` in this process, the same bank and embedding actors),
- HTTP: embedding bodies (binary float32) to a replica directly and through Serve's proxy; WAV bodies,
- faults: a bank actor killed during the embedding load (1 replica); the only replica killed while the
  clients keep to its direct address, then while they keep to the proxy's (``--restart-seconds`` loads: does
  the address a client was given survive the restart?); then one of 2 replicas killed. The client retries a
  request whose connection broke (on another replica) or that was answered 503, and counts both; "lost"
  counts requests that never got an answer other than those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

MACHINES_768 = ("bearing", "fan", "gearbox", "slider", "ToyTrain")
WAV_MACHINES = ("ToyCar", "valve")


def build_banks(root: Path) -> tuple[Path, dict[str, np.ndarray], list[tuple[str, str]]]:
    """-> (bank root, embedding queries per 768-d machine, [(machine, test clip path)] for the WAV path)."""
    from asd_ray.bank.memory_bank import MemoryBank
    from asd_ray.config import RunConfig, load_config
    from asd_ray.data.layout import discover
    from asd_ray.data.synth import generate_corpus
    from asd_ray.detect import reference_run

    corpus, banks = root / "corpus", root / "run" / "banks"
    if not (banks / WAV_MACHINES[0] / "bank.json").is_file():
        generate_corpus(corpus, dev_machines=WAV_MACHINES, eval_machines=(), train_source=30, train_target=4,
                        test_per_cell=4, supplemental=0, seconds=10.0, workers=2)
        reference_run([corpus], load_config(RunConfig, None, ["detector=knn"]), root / "run")
    rng = np.random.default_rng(0)
    queries = {}
    for i, machine in enumerate(MACHINES_768):
        members = rng.standard_normal((1000, 768)).astype(np.float32) + 0.1 * i
        MemoryBank(k=3).fit(members, [f"m{j}" for j in range(1000)]).save(banks / machine)
        queries[machine] = (members[:200] + 0.3 * rng.standard_normal((200, 768))).astype(np.float32)
    clips = [(r.machine, r.path) for r in discover([corpus]) if r.split == "test"]
    return banks, queries, clips


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every process below it: the client, Ray's processes,
    the bank actors and Serve's replicas (Linux /proc; other people's work on the machine is not counted)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return total


class Tally:
    """Answers of a load: latencies of the final answers, statuses, retries and losses."""

    def __init__(self):
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.retried_connection = 0  # requests resent after their connection broke
        self.retried_503 = 0  # requests answered 503 (with a reason) and sent again
        self.reasons_503: dict[str, int] = {}
        self.lost = 0  # requests that got no answer after every retry

    def summary(self, seconds: float, cpu: float) -> dict:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        return {"answered": len(self.latencies), "seconds": round(seconds, 2),
                "requests_per_s": round(len(self.latencies) / seconds, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "max_ms": round(float(lat.max()), 1), "over_500ms": int((lat > 500).sum()), "cpu_ms_per_request": round(cpu * 1e3 / max(1, len(lat)), 3),
                "load_average_1min": round(os.getloadavg()[0], 1),
                "statuses": dict(sorted(self.statuses.items())), "retried_after_connection_loss": self.retried_connection,
                "answered_503_and_retried": self.retried_503, "reasons_503": self.reasons_503, "lost": self.lost}


async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status, length = int(lines[0].split()[1]), 0
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, (await reader.readexactly(length) if length else b"")


async def http_load(urls: list[str], requests: list[bytes], *, connections: int, seconds: float, max_requests: int,
                    retries: int = 20, retry_sleep: float = 0.05, during=None) -> dict:
    """Closed loop over keep-alive connections (connection i starts on ``urls[i % len(urls)]``); each sends
    ``requests`` round-robin from its own offset. A broken connection or a 503 is retried (another URL
    next time) after ``retry_sleep`` s, up to ``retries`` times, and counted. ``during``: a coroutine run
    alongside (a fault)."""
    tally, sent = Tally(), [0]
    deadline = time.perf_counter() + seconds
    targets = [urlsplit(u) for u in urls]

    async def connection(i: int) -> None:
        at, reader, writer = i % len(targets), None, None
        j = i * 7919
        while time.perf_counter() < deadline and sent[0] < max_requests:
            sent[0] += 1
            request, t0 = requests[j % len(requests)], time.perf_counter()
            j += 1
            for attempt in range(retries + 1):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(targets[at].hostname, targets[at].port)
                    status, body = await _exchange(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ConnectionError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    at = (at + 1) % len(targets)
                    if attempt == retries:
                        tally.lost += 1
                        break
                    tally.retried_connection += 1
                    await asyncio.sleep(retry_sleep)
                    continue
                if status == 503 and attempt < retries:
                    tally.retried_503 += 1
                    reason = json.loads(body).get("error", "")[:80] if body.startswith(b"{") else body[:80].decode()
                    tally.reasons_503[reason] = tally.reasons_503.get(reason, 0) + 1
                    await asyncio.sleep(retry_sleep)
                    continue
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                tally.latencies.append(time.perf_counter() - t0)
                break
        if writer is not None:
            writer.close()

    start, cpu = time.perf_counter(), cpu_seconds()
    tasks = [asyncio.create_task(connection(i)) for i in range(connections)]
    if during is not None:
        tasks.append(asyncio.create_task(during()))
    await asyncio.gather(*tasks)
    return tally.summary(time.perf_counter() - start, cpu_seconds() - cpu)


def raw_request(url: str, path: str, body: bytes, content_type: str, token: str = "") -> bytes:
    host = urlsplit(url).netloc
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def embedding_requests(url: str, queries: dict[str, np.ndarray], streams: int = 64) -> list[bytes]:
    out = []
    for i in range(2000):
        machine = MACHINES_768[i % len(MACHINES_768)]
        q = queries[machine][i % len(queries[machine])]
        out.append(raw_request(url, f"/score?machine={machine}&stream=s{i % streams}&dim={q.shape[0]}", q.tobytes(),
                               "application/octet-stream"))
    return out


def wav_requests(url: str, clips: list[tuple[str, str]]) -> list[bytes]:
    return [raw_request(url, f"/score?machine={m}&stream=wav{i % 8}", Path(p).read_bytes(), "audio/wav")
            for i, (m, p) in enumerate(clips)]


async def router_load(router, make_request, *, concurrency: int, seconds: float, max_requests: int) -> dict:
    """The in-process router under the same closed loop (``concurrency`` callers awaiting one request each)."""
    tally, sent = Tally(), [0]
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        j = i * 7919
        while time.perf_counter() < deadline and sent[0] < max_requests:
            sent[0] += 1
            t0 = time.perf_counter()
            result = await router.submit(make_request(j))
            j += 1
            status = 200 if not result.error else 500
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            tally.latencies.append(time.perf_counter() - t0)

    start, cpu = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*[caller(i) for i in range(concurrency)])
    return tally.summary(time.perf_counter() - start, cpu_seconds() - cpu)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def answers(url: str) -> bool:
    try:
        return get_json(url + "/healthz")["status"] == "ok"
    except OSError:
        return False


def replica_restart(urls: list[str], replica_url: str, requests: list[bytes], load: dict) -> dict:
    """The only replica killed (Serve starts another) during a load whose clients keep to ``urls`` (the
    replica's direct address, or the proxy's): every refused connection is retried on the same address every
    0.1 s for up to 90 s. -> the load's figures, the replica's direct addresses before and after."""
    from ray.serve._private.constants import SERVE_NAMESPACE  # where Serve names its replica actors

    import ray
    from asd_ray.distributed import service

    before = sorted(service.replica_urls("load", "127.0.0.1"))
    victim = get_json(replica_url + "/healthz")

    async def kill_replica():
        await asyncio.sleep(load["seconds"] / 4)
        ray.kill(ray.get_actor(victim["replica"], namespace=SERVE_NAMESPACE), no_restart=False)

    figures = asyncio.run(http_load(urls, requests, **load, retries=900, retry_sleep=0.1, during=kill_replica))
    deadline = time.time() + 120
    while time.time() < deadline and not answers(replica_url):
        time.sleep(1)
    return {"client_urls": urls, "killed": victim["replica"], "replica_urls_before": before,
            "replica_urls_after": sorted(service.replica_urls("load", "127.0.0.1")), **figures}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0, help="length of each load")
    p.add_argument("--max-requests", type=int, default=50_000, help="answers after which a load stops")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--wav-connections", type=int, default=8)
    p.add_argument("--port", type=int, default=18200)
    p.add_argument("--skip-faults", action="store_true")
    p.add_argument("--restart-seconds", type=float, default=40.0,
                   help="length of each load during which the only replica is killed and restarted")
    p.add_argument("--work", type=Path, help="folder for the corpus and banks (kept; reused when there)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for the router and the service, e.g. fleet.max_wait_ms=5")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from asd_ray.config import RunConfig, load_config
    from asd_ray.distributed import service
    from asd_ray.distributed.bank_actors import actor_name
    from asd_ray.distributed.fleet import Request, fleet_router

    banks, queries, clips = build_banks(args.work or Path(tempfile.mkdtemp(prefix="serve-load-")))
    sets = [f"serve.port={args.port}", "serve.app_name=load", *args.overrides]
    config = load_config(RunConfig, None, sets)
    service.direct_ingress_env(args.port)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "ray_cpus": 2,
                 "load_average_at_start": os.getloadavg(), "connections": args.connections,
                 "seconds_per_load": args.seconds, "max_requests_per_load": args.max_requests, "overrides": sets}

    router = fleet_router(banks, config, with_embedders=True, detached=True)  # as the service starts them
    emb = [(MACHINES_768[j % 5], queries[MACHINES_768[j % 5]][j % 200]) for j in range(2000)]
    out["router_embedding"] = asyncio.run(router_load(
        router, lambda j: Request(emb[j % 2000][0], f"s{j % 64}", embedding=emb[j % 2000][1]),
        concurrency=args.connections, seconds=args.seconds, max_requests=args.max_requests))
    out["router_wav_path"] = asyncio.run(router_load(
        router, lambda j: Request(clips[j % len(clips)][0], f"wav{j % 8}", path=clips[j % len(clips)][1]),
        concurrency=args.wav_connections, seconds=args.seconds, max_requests=args.max_requests))
    print(json.dumps(out, indent=2), flush=True)
    for actor in router.embedders:  # their CPUs go to the service's replicas and embedders
        ray.kill(actor)

    service.deploy(banks, config)
    proxy = f"http://127.0.0.1:{args.port}"
    direct = [u for u in service.replica_urls("load", "127.0.0.1") if not u.endswith(f":{args.port}")]
    out["replica_urls"], out["proxy_url"] = direct, proxy
    fast = direct or [proxy]
    load = dict(connections=args.connections, seconds=args.seconds, max_requests=args.max_requests)
    out["http_embedding_direct"] = asyncio.run(http_load(fast, embedding_requests(fast[0], queries), **load))
    print(json.dumps(out["http_embedding_direct"]), flush=True)
    out["http_embedding_proxy"] = asyncio.run(http_load([proxy], embedding_requests(proxy, queries), **load))
    print(json.dumps(out["http_embedding_proxy"]), flush=True)
    out["http_wav_direct"] = asyncio.run(http_load(fast, wav_requests(fast[0], clips), **{
        **load, "connections": args.wav_connections}))
    print(json.dumps(out["http_wav_direct"]), flush=True)

    if not args.skip_faults:
        namespace = config.fleet.namespace

        async def kill_bank():
            await asyncio.sleep(args.seconds / 3)
            actor = ray.get_actor(actor_name("fan"), namespace=namespace)
            out["fault_bank_actor_pid_before"] = (await actor.stats.remote())["pid"]
            ray.kill(actor, no_restart=False)

        out["fault_bank_actor_killed"] = asyncio.run(http_load(fast, embedding_requests(fast[0], queries),
                                                               **load, during=kill_bank))
        print(json.dumps(out["fault_bank_actor_killed"]), flush=True)
        for path, urls in (("direct", fast), ("proxy", [proxy])):
            out[f"fault_replica_restarted_{path}"] = replica_restart(
                urls, fast[0], embedding_requests(urls[0], queries), {**load, "seconds": args.restart_seconds})
            print(json.dumps(out[f"fault_replica_restarted_{path}"]), flush=True)

        service.deploy(banks, load_config(RunConfig, None, sets + ["serve.replicas=2"]))
        urls = []
        while len(urls) < 2:  # the new version's two replicas, each answering
            time.sleep(1)
            urls = [u for u in service.replica_urls("load", "127.0.0.1") if not u.endswith(f":{args.port}")
                    and answers(u)]
        victim = get_json(urls[0] + "/healthz")

        async def kill_replica():
            await asyncio.sleep(args.seconds / 3)
            from ray.serve._private.constants import SERVE_NAMESPACE  # where Serve's replica actors are named

            ray.kill(ray.get_actor(victim["replica"], namespace=SERVE_NAMESPACE), no_restart=False)

        out["fault_replica_killed"] = {"replicas": urls, "killed": victim["replica"], **asyncio.run(http_load(
            urls, embedding_requests(urls[0], queries), **load, during=kill_replica))}
        print(json.dumps(out["fault_replica_killed"]), flush=True)

    from ray import serve

    serve.shutdown()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
