"""What a chunked body far over `serve.max_body_bytes` costs the HTTP service: bytes read before the answer, and
the memory (RSS) of Serve's proxy and of the replica before and 3 s after.

    python benchmarks/serve_body_limit.py [--mib 200] [--limit-mib 16] [--port 18700] [--without-limit]
                                          [--json out.json]

`asd-ray serve`'s way of starting a local Ray (2 CPUs; Serve's proxy and direct ingress), one 16-d bank. The
body goes to the proxy's port as 64 KiB chunks (Transfer-Encoding: chunked, no length declared); the client
stops as soon as the server answers or closes. `--without-limit`: Serve's servers without BodyLimit (as before
it), the replica's own check only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def chunked_upload(host: str, port: int, path: str, total: int, token: str, chunk: int = 64 * 1024):
    """-> (status answered or None when the connection was reset first, body bytes sent)."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    sent, piece, answer = 0, f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n", b""
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(65536)
    except OSError:
        pass
    finally:
        sock.close()
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else None), sent


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=200, help="size of the chunked body, MiB")
    p.add_argument("--limit-mib", type=int, default=16, help="serve.max_body_bytes, MiB")
    p.add_argument("--port", type=int, default=18700)
    p.add_argument("--without-limit", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from asd_ray.bank.memory_bank import MemoryBank
    from asd_ray.config import RunConfig, load_config
    from asd_ray.distributed import service

    if args.without_limit:
        service.body_limit_env = lambda max_body_bytes: None
    banks = Path(tempfile.mkdtemp(prefix="body-limit-")) / "banks"
    members = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    MemoryBank(k=3).fit(members, [f"m{i}" for i in range(50)]).save(banks / "fan")
    token = "bench-token"
    config = load_config(RunConfig, None, [f"serve.port={args.port}", "serve.app_name=body-limit", "ray.num_cpus=2",
                                           f"serve.token={token}", f"serve.max_body_bytes={args.limit_mib * 2**20}"])
    service.start_ray(config)
    service.deploy(banks, config)
    proxy = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "PROXY" in a["name"])
    proxy_pid = ray.get(ray.get_actor(proxy["name"], namespace=proxy["namespace"]).__ray_call__.remote(
        lambda self: os.getpid()))
    health = urllib.request.Request(f"http://127.0.0.1:{args.port}/healthz",
                                    headers={"Authorization": f"Bearer {token}"})
    replica_pid = json.loads(urllib.request.urlopen(health, timeout=60).read())["replica_pid"]
    before = rss_mib(proxy_pid), rss_mib(replica_pid)
    status, sent = chunked_upload("127.0.0.1", args.port, "/score?machine=fan&stream=s", args.mib * 2**20, token)
    time.sleep(3)
    after = rss_mib(proxy_pid), rss_mib(replica_pid)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}", "load_average": os.getloadavg(),
           "body_limit_in_serve_servers": not args.without_limit, "body_mib": args.mib, "limit_mib": args.limit_mib,
           "sent_bytes": sent, "status": status, "proxy_rss_mib_before_after": (before[0], after[0]),
           "replica_rss_mib_before_after": (before[1], after[1])}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
