"""The HTTP scoring service on Ray Serve (``asd-ray serve``, ``jobs/serve.py``): a thin layer over the fleet.

Each Serve replica holds a ``Router`` (``fleet.py``) over the shared named bank actors, and embedding actors
for clips sent as sound files: batching into the bank actors and each stream's causal post-processing are
the router's. This module only turns HTTP into router calls and router results into HTTP.

- ``POST /score?machine=M&stream=S[&clip=ID][&dim=N]``: the body is a sound file (``Content-Type: audio/*``,
  e.g. ``audio/wav``) or a raw little-endian float32 embedding of N values (``application/octet-stream``;
  for banks of frame detectors, T x N log-mel frames) -> ``{"machine", "stream", "clip", "raw_score",
  "score", "decision", "threshold", "bank_version"}``; ``threshold`` is on the scale of ``score``.
- ``POST /normals?machine=M&clip=ID[&domain=target][&dim=N]``: the same bodies; the clip's embedding is
  appended to the machine's bank (first-shot calibration), persisted before the reply; a clip id the bank
  holds already is not added again (``"added": false``). It writes to the banks: without ``serve.token`` it
  is refused (403) unless ``serve.allow_unauthenticated_writes`` is on, which a loopback host only allows.
- ``GET /machines``: each bank's kind, size, version, threshold and score-time settings (and where each
  came from); ``GET /healthz``: this replica, its banks' answers and its request counts.

Every answer that is not 200 is ``{"error": reason}`` with its status: 400 a malformed request, 401 a
missing or wrong bearer token (``serve.token``, checked on every request; the scheme in any case), 403 a
write without a token (above), 404 an unknown machine or route, 405 a wrong method, 413 a body over
``serve.max_body_bytes``, 415 a content type other than the two above, 422 content that cannot be scored
(unreadable, empty or too short audio, audio longer than ``serve.max_audio_seconds`` (refused while it is
decoded), a ``dim`` other than the bank's, an embedding of the wrong size), 503 a bank that failed or gave
no score within ``serve.timeout_s`` (retry), 500 anything else (the replica goes on). Counters through
``ray.util.metrics`` (Prometheus on Ray's metrics port): ``asd_ray_requests_total`` and
``asd_ray_request_errors_total`` by route and status, ``asd_ray_request_seconds`` by route.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from asd_ray.bank.memory_bank import BankError
from asd_ray.config import RunConfig
from asd_ray.distributed.bank_actors import actor_name, saved_banks
from asd_ray.distributed.fleet import BAD_INPUT, UNAVAILABLE, UNKNOWN_MACHINE, Request, fleet_router
from asd_ray.distributed.http_requests import (EMBEDDING_TYPE, Access, HttpError, body_limit_env, check_write_access,
                                               content_kind, embedding, param, read_body)
from asd_ray.scoring.postprocess import output_threshold

log = logging.getLogger(__name__)

FAILURE_STATUS = {UNKNOWN_MACHINE: 404, BAD_INPUT: 422, UNAVAILABLE: 503}
LATENCY_BOUNDARIES_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


class ServiceMetrics:
    """Request counters and latencies through ``ray.util.metrics``, and the same counts kept here for /healthz.
    Latencies are observed per request; the counters take their increments once per ``flush`` (a call per
    request into ``ray.util.metrics`` is a few per cent of a replica's CPU at thousands of requests/s)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter("asd_ray_requests_total", "HTTP requests answered, by route and status",
                                        tag_keys=("route", "status"))
        self.errors = metrics.Counter("asd_ray_request_errors_total", "HTTP requests answered with a status >= 400",
                                      tag_keys=("route", "status"))
        self.latency = metrics.Histogram("asd_ray_request_seconds", "time from a request's arrival to its answer",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route",))
        self.counts: Counter = Counter()
        self.flushed: Counter = Counter()

    def record(self, route: str, status: int, seconds: float) -> None:
        self.latency.observe(seconds, {"route": route})
        self.counts[route, status] += 1

    def flush(self) -> None:
        for (route, status), n in list(self.counts.items()):
            if n > self.flushed[route, status]:
                tags = {"route": route, "status": str(status)}
                self.requests.inc(n - self.flushed[route, status], tags)
                if status >= 400:
                    self.errors.inc(n - self.flushed[route, status], tags)
                self.flushed[route, status] = n

    def summary(self) -> dict:
        return {"requests": sum(self.counts.values()),
                "errors": sum(n for (_, status), n in self.counts.items() if status >= 400),
                "by_status": {f"{route} {status}": n for (route, status), n in sorted(self.counts.items())}}


class ScoringService:
    """The Serve deployment (see the module docstring): one router per replica over the shared bank actors."""

    def __init__(self, bank_root: str, config: RunConfig, given: Iterable[str] = ()):
        self.serve, self.minmax = config.serve, config.post.minmax
        # detached bank actors: they outlive any one replica (a replica killed takes none down with it)
        if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
            from asd_ray.private_apis import keep_direct_port

            keep_direct_port()
        self.router = fleet_router(bank_root, config, with_embedders=True, given=given, detached=True,
                                   decode_limit_s=config.serve.max_audio_seconds)
        self.access = Access(self.serve.token, self.serve.allow_unauthenticated_writes)
        self.metrics = ServiceMetrics()
        self.routes = {("POST", "/score"): self.score, ("POST", "/normals"): self.normals,
                       ("GET", "/machines"): self.machines, ("GET", "/healthz"): self.healthz}
        self.follower: asyncio.Task | None = None
        # The start-up heap (Ray, numpy, the router) is frozen out of the cyclic GC: full collections over it
        # stall every request in flight (``simulate_fleet`` measured 100-800 ms stalls).
        gc.freeze()

    async def __call__(self, request) -> Any:
        from starlette.responses import Response

        start = time.perf_counter()
        path = request.scope["path"].rstrip("/") or "/"
        route = path if any(path == p for _, p in self.routes) else "other"
        try:
            self.access.check(request.method, path, request.headers.get("authorization", ""))
            handler = self.routes.get((request.method, path))
            if handler is None:
                if route == "other":
                    raise HttpError(404, f"no route {path}: use POST /score, POST /normals, GET /machines, GET /healthz")
                raise HttpError(405, f"{request.method} {path}: use {[m for m, p in self.routes if p == path][0]}")
            if self.follower is None:
                self.follower = asyncio.get_running_loop().create_task(self._follow())
            status, body = 200, await handler(request)
        except HttpError as err:
            status, body = err.status, {"error": err.reason}
        except Exception as err:  # nothing a request sends may take the replica down
            log.exception("request %s %s failed", request.method, path)
            status, body = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
        self.metrics.record(route, status, time.perf_counter() - start)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)

    def _machine(self, request) -> str:
        machine = param(request, "machine")
        if machine not in self.router.banks:
            raise HttpError(404, self.router.unknown(machine))
        return machine

    async def _features(self, request, machine: str) -> dict:
        """The body as a ``Request`` keyword: ``embedding`` (a float32 array) or ``audio`` (a sound file's bytes)."""
        kind = content_kind(request)
        body = await read_body(request, self.serve.max_body_bytes)
        if kind == EMBEDDING_TYPE:
            dim = request.query_params.get("dim")
            return {"embedding": embedding(body, dim, self.router.dims[machine], machine)}
        return {"audio": body}

    async def _answer(self, awaitable, machine: str) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.serve.timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(503, f"no answer from the {machine} bank within {self.serve.timeout_s} s "
                                 f"(serve.timeout_s): its actor may be restarting; retry") from None

    async def score(self, request) -> dict:
        machine, stream = self._machine(request), param(request, "stream")
        result = await self._answer(self.router.submit(Request(machine, stream,
                                                               **await self._features(request, machine))), machine)
        if result.error:
            retry = " (a bank or embedding actor failed: retry)" if result.failure == UNAVAILABLE else ""
            raise HttpError(FAILURE_STATUS[result.failure], result.error + retry)
        return {"machine": machine, "stream": stream, "clip": request.query_params.get("clip"),
                "raw_score": result.raw_score, "score": result.score, "decision": result.decision,
                "threshold": result.threshold, "bank_version": result.bank_version}

    async def normals(self, request) -> dict:
        from ray.exceptions import RayActorError

        machine, clip = self._machine(request), param(request, "clip")
        domain = param(request, "domain", "target")
        if domain not in ("source", "target"):
            raise HttpError(400, f"domain={domain!r}: source or target")
        if not self.router.stats[machine]["takes_normals"]:
            raise HttpError(422, f"the {machine} bank ({self.router.stats[machine]['kind']}) takes no added "
                                 f"normals: refit it with asd-ray run")
        features = await self._features(request, machine)
        embedding = features.get("embedding")
        if embedding is None:
            embedding, reason = await self._answer(self.router.embed(features["audio"]), machine)
            if reason:
                raise HttpError(422, f"audio body: {reason}")
        try:  # the bank checks the size and values (its BankError names what is wrong)
            stats = await self._answer(self.router.add_async(machine, np.atleast_2d(embedding), [clip], domain),
                                       machine)
        except BankError as err:  # the bank refused the normals (raised in its actor: the cause says why)
            raise HttpError(422, str(getattr(err, "cause", None) or err)) from None
        except RayActorError as err:
            raise HttpError(503, f"the {machine} bank actor failed: {err}; retry") from None
        return {"machine": machine, "clip": clip, "domain": domain, "added": bool(stats["added"]),
                "size": stats["size"], "bank_version": stats["version"],
                "threshold": output_threshold(self.router.calibrations[machine], self.minmax)}

    async def machines(self, request) -> dict:
        return {"machines": {m: {
            "kind": st["kind"], "features": st["features"], "size": st["size"], "dim": st["dim"],
            "bank_version": st["version"], "replicas": len(self.router.banks[m]),
            "threshold": output_threshold(self.router.calibrations[m], self.minmax),
            "settings": {key: {"value": value, "from": source} for key, (value, source) in st["settings"].items()},
        } for m, st in sorted(self.router.stats.items())}}

    async def healthz(self, request) -> dict:
        """200 when every bank actor answers within 2 s, else 503 naming the ones that did not."""
        async def ping(actor) -> str:
            try:
                await asyncio.wait_for(actor.stats.remote(), 2.0)
                return "ok"
            except Exception as err:
                return f"no answer ({type(err).__name__})"

        banks = dict(zip(self.router.banks, await asyncio.gather(
            *[ping(actors[0]) for actors in self.router.banks.values()])))
        import ray

        body = {"status": "ok", "replica": ray.get_runtime_context().get_actor_name(), "replica_pid": os.getpid(),
                "banks": banks, **self.metrics.summary()}
        down = sorted(m for m, state in banks.items() if state != "ok")
        if down:
            raise HttpError(503, f"bank actors not answering: {down}")
        return body

    async def _follow(self) -> None:
        """Every ``serve.follow_s``: hand the counts to the metrics, and re-calibrate the banks another replica
        added normals to (their version changed)."""
        while True:
            await asyncio.sleep(self.serve.follow_s)
            self.metrics.flush()
            try:
                await self.router.follow_versions()
            except Exception as err:  # a bank restarting: look again next time
                log.info("following bank versions: %s", err)


def direct_ingress_env(port: int) -> None:
    """Serve's direct ingress for a Ray started after this call (replicas on ``port + 1``, ``port + 2`` ...):
    Serve reads it from the environment of its processes, which a local Ray takes from its driver. The
    handlers also run on the replica's own event loop, not a second thread's (they never block it): about
    0.07 ms less CPU per request here. A port a replica held is handed to its successor at once (Serve
    otherwise quarantines it for its HAProxy mode, unused here, and the successor gets the next port) and
    bound again (``keep_direct_port``): a replica's address survives its restart."""
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port + 1)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1 + 100)
    os.environ["RAY_SERVE_PORT_QUARANTINE_S"] = "0"
    os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    # A replica stopping keeps answering for this long (30 s by default) so that load balancers in front can
    # forget it; none is in front of a Ray this command starts, and Ctrl-C should not wait 30 s
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")


def start_ray(config: RunConfig) -> bool:
    """``ensure_ray`` for the service; a local Ray that this call starts gets ``serve.max_body_bytes`` enforced
    in Serve's HTTP servers (``body_limit_env``), and Serve's direct ingress when ``serve.direct_ingress`` is on.
    Returns True when this call started Ray."""
    import ray

    from asd_ray.distributed.session import ensure_ray, joins_a_cluster

    if not ray.is_initialized() and not joins_a_cluster():
        body_limit_env(config.serve.max_body_bytes)
        if config.serve.direct_ingress:
            direct_ingress_env(config.serve.port)
    return ensure_ray(num_cpus=config.ray.num_cpus or None)


def serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM, then shut Serve down."""
    import signal

    from ray import serve

    from asd_ray.distributed.session import mute_worker_output

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # Serve's controller, killed as Serve shuts down, makes the raylet print "Task ServeController.
        # graceful_shutdown failed ...": a stop asked for, not a failure; such lines go to serve.log only
        mute_worker_output()
        # a second Ctrl-C (or the one Ray's processes pass on) would cut the shutdown short, with a traceback
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)


def deploy(bank_root: str | Path, config: RunConfig, given: Iterable[str] = ()) -> None:
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` and run the scoring service over the banks saved
    under ``bank_root`` (Ray must be running; the bank actors are started or found by each replica)."""
    from ray import serve

    s = config.serve
    check_write_access(s.token, s.allow_unauthenticated_writes, s.host)
    serve.start(http_options={"host": s.host, "port": s.port})
    # Serve's access log writes a line per request: at thousands of requests/s, a share of the CPU
    deployment = serve.deployment(ScoringService, name="ScoringService", num_replicas=s.replicas,
                                  max_ongoing_requests=s.max_ongoing_requests,
                                  ray_actor_options={"num_cpus": s.replica_cpus},
                                  logging_config={"enable_access_log": s.access_log})
    app = deployment.bind(str(Path(bank_root).expanduser().resolve()), config, sorted(given))
    serve.run(app, name=s.app_name, route_prefix="/")


def stop(bank_root: str | Path, config: RunConfig) -> dict:
    """Stop the service deployed over the banks saved under ``bank_root``: delete its Serve application
    (``serve.app_name``), stop Serve when no other application runs on it, and kill the service's detached bank
    actors (``fleet.namespace``, ``fleet.replicas`` per machine). Ray must be running.
    -> {"application": deleted or not running, "serve_stopped": bool, "banks": [actor names killed]}."""
    import ray
    from ray import serve

    running = serve.status().applications
    app = config.serve.app_name
    if app in running:
        serve.delete(app)
    stopped = not set(running) - {app}
    if stopped and running:
        serve.shutdown()  # no other application: its controller and HTTP proxies go too
    try:  # the banks' folder may be gone since; the application still goes
        machines = saved_banks(bank_root, empty_ok=True)[1]
    except FileNotFoundError:
        machines = []
    killed = []
    for machine in machines:
        for r in range(config.fleet.replicas):
            try:
                actor = ray.get_actor(actor_name(machine, r), namespace=config.fleet.namespace)
            except ValueError:  # not running (never started, or stopped already)
                continue
            ray.kill(actor, no_restart=True)
            killed.append(actor_name(machine, r))
    return {"application": "deleted" if app in running else "not running", "serve_stopped": stopped and bool(running),
            "banks": killed}


def replica_urls(app_name: str, host: str = "127.0.0.1") -> list[str]:
    """With direct ingress, the address each replica serves HTTP on itself (``host``, as ``serve.host``),
    else the proxy's; empty when Serve cannot say."""
    import ray

    from asd_ray.private_apis import serve_controller

    try:  # Serve has no public call for this in 2.60; its own test utilities ask the controller the same way
        controller = serve_controller()
        groups = ray.get(controller.get_target_groups.remote(app_name))
    except Exception:
        return []
    return sorted({f"http://{host}:{t.port}" for g in groups if str(g.protocol).endswith("HTTP")
                   for t in g.targets})
