"""The fleet router: k-NN scoring for many machine streams through the bank actors (``bank_actors``; SPEC §8).

The ``Router`` lives in the caller's event loop. Requests ``(machine, stream_id, features or clip)``
queue per machine; a batch leaves when a bank actor has a free slot (after ``max_wait_ms`` at most)
or when ``max_batch`` requests wait, so that under load one actor call carries many requests
(one call per request cannot go beyond about 2k requests/s here). Clips (paths, or a sound file's bytes
from the HTTP service) are embedded first through a pool of embedding actors (``embed_pool.start_embedders``:
clip embeddings, or log-mel frame matrices for detectors that eat frames). Raw scores come back per stream in
request order and go through that stream's ``StreamPostprocessor`` (causal median, the bank's calibration range
and threshold; added normals re-calibrate running streams too). A request without a score says why
(``Result.failure``: the caller's mistake, or an actor that failed). ``fleet_router`` starts a fleet (bank and
embedding actors) and its router: what ``serve-fleet`` and the HTTP service stand on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from asd_ray.bank.memory_bank import BankError
from asd_ray.config import FleetConfig, PostConfig, RunConfig
from asd_ray.detectors import SCORE_SETTINGS, fit_time_keys, frame_settings, given_score_settings
from asd_ray.distributed.bank_actors import start_banks
from asd_ray.distributed.batches import actor_embed_kwargs
from asd_ray.distributed.embed_pool import start_embedders
from asd_ray.distributed.session import ensure_ray, gpu_wanted
from asd_ray.scoring.postprocess import Calibration, StreamPostprocessor, calibrate

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One clip of one stream: its embedding, or its audio (a path, or a sound file's bytes) embedded on the way."""

    machine: str
    stream_id: str
    embedding: np.ndarray | None = None
    path: str | None = None
    audio: bytes | None = None


# Why a request has no score (``Result.failure``): the caller's mistake, or the fleet's.
UNKNOWN_MACHINE = "unknown machine"
BAD_INPUT = "bad input"  # an embedding of the wrong size, a clip that cannot be used
UNAVAILABLE = "unavailable"  # an actor failed; the same request may succeed later


@dataclass
class Result:
    """A request's outcome: raw k-NN score, post-processed score and decision (with the decision threshold on
    the score's scale and the version of the bank that scored it), or the reason it has none."""

    machine: str
    stream_id: str
    path: str | None
    raw_score: float | None = None
    score: float | None = None
    decision: int | None = None
    threshold: float | None = None
    bank_version: str = ""
    error: str = ""
    failure: str = ""  # UNKNOWN_MACHINE, BAD_INPUT or UNAVAILABLE when ``error`` is set


class _Lane:
    """Micro-batches items for a set of actors: a batch leaves when an actor has a free slot (after
    ``max_wait`` at most) or ``max_batch`` items wait; ``call(actor, items)`` returns an ObjectRef and
    ``done(items, value, error)`` receives its result."""

    def __init__(self, actors: list, call: Callable, done: Callable, *, max_batch: int, max_wait: float,
                 max_in_flight: int):
        self.actors, self.call, self.done = actors, call, done
        self.max_batch, self.max_wait, self.max_in_flight = max_batch, max_wait, max_in_flight
        self.waiting: list = []
        self.in_flight = [0] * len(actors)
        self.calls = [0] * len(actors)  # batches sent to each actor so far
        self.timer: asyncio.TimerHandle | None = None

    def put(self, item: Any) -> None:
        self.waiting.append(item)
        if len(self.waiting) >= self.max_batch or self.max_wait <= 0:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.max_wait, self._flush)

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiting:
            slot = min(range(len(self.actors)), key=self.in_flight.__getitem__)
            if self.in_flight[slot] >= self.max_in_flight:
                return  # every actor busy: the next completion sends what waits
            batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
            self.in_flight[slot] += 1
            self.calls[slot] += 1
            asyncio.get_running_loop().create_task(self._send(slot, batch))

    async def _send(self, slot: int, batch: list) -> None:
        try:
            value, error = await self.call(self.actors[slot], batch), None
        except Exception as err:  # an actor error answers every request of the batch; the lane goes on
            value, error = None, f"{type(err).__name__}: {err}"
        self.in_flight[slot] -= 1
        self.done(batch, value, error)
        self._flush()


@dataclass
class _Pending:
    request: Request
    seq: int
    future: asyncio.Future


class Router:
    """Scores requests of many machine streams through the bank actors (see the module docstring).

    ``submit(request)`` (inside a running event loop) returns a future of its ``Result``; ``score``
    scores a list and returns results in request order. An unknown machine, an embedding of the wrong
    size or a clip that cannot be used gives a ``Result`` with ``error`` and ``failure`` set; other
    requests go on. ``add`` appends normals (first-shot calibration) and re-calibrates the machine's streams.
    """

    def __init__(self, banks: dict[str, list], *, post: PostConfig = PostConfig(), fleet: FleetConfig = FleetConfig(),
                 embedders: list | None = None):
        import ray

        self.banks, self.post, self.fleet, self.embedders = banks, post, fleet, embedders
        stats = ray.get([actors[0].stats.remote() for actors in banks.values()])
        self.stats = dict(zip(banks, stats))  # each bank's ``BankActor.stats()`` as of its last calibration
        self.dims = {m: s["dim"] for m, s in zip(banks, stats)}
        self.frames = {m: s["features"] == "frames" for m, s in zip(banks, stats)}  # queries are T x dim matrices
        self.calibrations: dict[str, Calibration] = {}
        self.streams: dict[str, StreamPostprocessor] = {}
        for machine, loo in zip(banks, ray.get([actors[0].loo_scores.remote() for actors in banks.values()])):
            self._calibrate(machine, loo)
        self.next_seq: dict[str, int] = defaultdict(int)  # per stream: next request number handed out
        self.next_out: dict[str, int] = defaultdict(int)  # per stream: next request number to post-process
        self.ready: dict[str, dict[int, tuple[_Pending, float | None, str, str]]] = defaultdict(dict)
        self.lanes: dict[str, _Lane] = {}
        self.embed_lane: _Lane | None = None

    def _calibrate(self, machine: str, loo_scores: np.ndarray) -> None:
        """The machine's calibration from its bank's leave-one-out scores, for its new and running streams."""
        try:
            cal = self.calibrations[machine] = calibrate(loo_scores, self.post.threshold_quantile)
        except ValueError as err:  # e.g. all train scores equal: name the bank, not only the gamma fit
            raise BankError(f"saved bank {self.stats[machine]['bank_dir']}: no decision threshold from its "
                            f"leave-one-out train scores ({err})") from None
        for key, stream in self.streams.items():
            if key.split("/", 1)[0] == machine:
                stream.calibration = cal

    async def recalibrate(self, machine: str) -> Calibration:
        """Read the machine's bank stats and leave-one-out scores again (after normals were added)."""
        actor = self.banks[machine][0]
        self.stats[machine], loo = await asyncio.gather(actor.stats.remote(), actor.loo_scores.remote())
        self._calibrate(machine, loo)
        return self.calibrations[machine]

    async def follow_versions(self) -> list[str]:
        """Re-calibrate the machines whose bank version changed since this router last looked (normals added
        through another router); returns them."""
        now = await asyncio.gather(*[actors[0].stats.remote() for actors in self.banks.values()])
        changed = [m for m, st in zip(self.banks, now) if st["version"] != self.stats[m]["version"]]
        await asyncio.gather(*[self.recalibrate(m) for m in changed])
        return changed

    async def add_async(self, machine: str, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target"
                        ) -> dict:
        """Append normals to every replica of ``machine``'s bank (persisted before this returns; ids it has
        already are skipped), then re-calibrate its streams. Returns the bank's stats and ``added``."""
        if machine not in self.banks:
            raise KeyError(self.unknown(machine))
        stats = await asyncio.gather(*[a.add.remote(np.asarray(embeddings, np.float32), list(ids), domain)
                                       for a in self.banks[machine]])
        await self.recalibrate(machine)
        return stats[0]

    def add(self, machine: str, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> dict:
        """Blocking form of ``add_async`` for code without an event loop."""
        return asyncio.run(self.add_async(machine, embeddings, ids, domain))

    def unknown(self, machine: str) -> str:
        """The reason a request for ``machine`` has no bank."""
        return f"no bank for machine {machine!r} (banks: {sorted(self.banks)})"

    def submit(self, request: Request) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        key = f"{request.machine}/{request.stream_id}"
        pending = _Pending(request, self.next_seq[key], loop.create_future())
        self.next_seq[key] += 1
        if request.machine not in self.banks:
            self._finish(pending, None, self.unknown(request.machine), UNKNOWN_MACHINE)
        elif request.embedding is not None:
            self._to_bank(pending, request.embedding)
        elif request.path is not None or request.audio is not None:
            self._embed(request.path if request.audio is None else request.audio, functools.partial(self._embedded, pending))
        else:
            self._finish(pending, None, "request has neither an embedding nor a clip", BAD_INPUT)
        return pending.future

    async def score(self, requests: Sequence[Request]) -> list[Result]:
        return list(await asyncio.gather(*[self.submit(r) for r in requests]))

    def embed(self, clip: str | bytes) -> asyncio.Future:
        """A clip (path, or a sound file's bytes) -> future of (its features, "") or (None, the reason it has
        none), through the embedding actors."""
        future = asyncio.get_running_loop().create_future()

        def then(features: Any, reason: str, failure: str) -> None:
            if not future.done():  # a caller that stopped waiting cancelled it
                future.set_result((features, reason))

        self._embed(clip, then)
        return future

    def _to_bank(self, pending: _Pending, embedding: np.ndarray) -> None:
        machine = pending.request.machine
        e = np.asarray(embedding, dtype=np.float32)
        dim, frames = self.dims[machine], self.frames[machine]
        e = e if frames else e.reshape(-1)
        ok = (e.ndim == 2 and e.shape[1] == dim and len(e) > 0) if frames else e.shape[0] == dim
        if not ok or not np.isfinite(e).all():
            finite = bool(np.isfinite(e).all())
            self._finish(pending, None, f"features of shape {e.shape} (finite: {finite}); the {machine} bank takes "
                                        f"finite (frames x {dim}) matrices" if frames else
                                        f"embedding of size {e.shape[0]} (finite: {finite}); the {machine} bank "
                                        f"takes finite vectors of size {dim}", BAD_INPUT)
            return
        self._lane(machine).put((pending, e))

    def _lane(self, machine: str) -> _Lane:
        if machine not in self.lanes:
            f = self.fleet
            pack = list if self.frames[machine] else np.stack  # matrices of clips differ in length
            self.lanes[machine] = _Lane(self.banks[machine], lambda actor, items: actor.score.remote(
                pack([e for _, e in items])), self._scored, max_batch=f.max_batch,
                max_wait=f.max_wait_ms / 1000, max_in_flight=f.max_in_flight)
        return self.lanes[machine]

    def _scored(self, items: list, raw: np.ndarray | None, error: str | None) -> None:
        for i, (pending, _) in enumerate(items):
            self._finish(pending, None if error else float(raw[i]), error or "", UNAVAILABLE if error else "")

    def _embed(self, clip: str | bytes, then: Callable[[Any, str, str], None]) -> None:
        """Queue ``clip`` for the embedding actors; ``then(features, reason, failure)`` receives the outcome."""
        if not self.embedders:
            raise RuntimeError("requests carry clips but the router has no embedding actors")
        if self.embed_lane is None:
            f = self.fleet
            self.embed_lane = _Lane(self.embedders, lambda actor, items: actor.embed.remote(
                [clip for clip, _ in items]), self._clips_embedded, max_batch=f.embed_batch,
                max_wait=f.max_wait_ms / 1000, max_in_flight=1)
        self.embed_lane.put((clip, then))

    @staticmethod
    def _clips_embedded(items: list, value: tuple | None, error: str | None) -> None:
        for i, (_, then) in enumerate(items):
            reason = error or value[1][i]
            then(None if reason else value[0][i], reason, (UNAVAILABLE if error else BAD_INPUT) if reason else "")

    def _embedded(self, pending: _Pending, features: Any, reason: str, failure: str) -> None:
        if reason:
            self._finish(pending, None, f"{pending.request.path or 'audio body'}: {reason}", failure)
        else:
            self._to_bank(pending, features)

    def _finish(self, pending: _Pending, raw: float | None, error: str, failure: str = "") -> None:
        """Hand results to each stream's post-processing strictly in request order."""
        key = f"{pending.request.machine}/{pending.request.stream_id}"
        self.ready[key][pending.seq] = (pending, raw, error, failure)
        while self.next_out[key] in self.ready[key]:
            p, raw, error, failure = self.ready[key].pop(self.next_out[key])
            self.next_out[key] += 1
            r = p.request
            result = Result(r.machine, r.stream_id, r.path, error=error, failure=failure)
            if not error:
                stream = self.streams.get(key)
                if stream is None:
                    stream = self.streams[key] = StreamPostprocessor(
                        self.calibrations[r.machine], minmax=self.post.minmax, median_window=self.post.median_window)
                result.raw_score = raw
                result.score, result.decision = stream.push(raw)
                result.threshold, result.bank_version = stream.threshold, self.stats[r.machine]["version"]
            if not p.future.done():  # a caller that stopped waiting (a timeout) cancelled it
                p.future.set_result(result)


def score_requests(router: Router, requests: Sequence[Request]) -> list[Result]:
    """Blocking form of ``router.score`` for code without an event loop."""
    return asyncio.run(router.score(requests))


def settings_lines(stats: dict[str, dict], config: RunConfig, given: Iterable[str] = ()) -> list[str]:
    """Where each scoring setting of a fleet came from, for people: per machine its detector's score-time
    settings (the config where given, else the saved bank), the post-processing (the config: never saved
    with a bank), and given keys that no bank took (fixed when the banks were fitted, or of another kind)."""
    given = set(given)
    lines = ["scoring settings (config: given in --config/--set; saved bank: as `asd-ray run` saved it):"]
    applied = set()
    for machine, st in sorted(stats.items()):
        parts = [f"{key}={value} ({source})" for key, (value, source) in sorted(st["settings"].items())]
        applied |= {key.split(".", 1)[1] if key.startswith("member_") else key for key in st["settings"]}
        lines.append(f"  {machine}: {st['kind']}, {st['size']} members, version {st['version']}"
                     + (f"; {', '.join(parts)}" if parts else "; no score-time settings"))
    post = [f"post.{k}={v} ({'config' if f'post.{k}' in given else 'default'})"
            for k, v in dataclasses.asdict(config.post).items()]
    lines.append(f"  post-processing: {', '.join(post)}")
    unused = sorted(k for k in given if k in SCORE_SETTINGS and k not in applied)
    if unused:
        lines.append(f"  not applied: {', '.join(unused)} (no saved detector here takes it)")
    fixed = fit_time_keys(given)
    if fixed:
        lines.append(f"  not applied: {', '.join(fixed)} (fixed when the banks were fitted: the saved banks' "
                     f"values are used; refit with asd-ray run to change them)")
    return lines


def fleet_banks(bank_root: str | Path, config: RunConfig, machines=None, given: Iterable[str] = (),
                detached: bool = False) -> tuple[dict[str, list], dict[str, dict]]:
    """Start (or find) the bank actors of the banks saved under ``bank_root``, taking the score-time settings
    among the ``given`` config keys, and log where each setting came from. -> (actors, stats by machine)."""
    import ray

    ensure_ray(num_cpus=config.ray.num_cpus or None)
    banks = start_banks(bank_root, machines=machines, replicas=config.fleet.replicas,
                        namespace=config.fleet.namespace, faiss_threads=config.bank.faiss_threads,
                        settings=given_score_settings(config, given), detached=detached)
    stats = dict(zip(banks, ray.get([actors[0].stats.remote() for actors in banks.values()])))
    for line in settings_lines(stats, config, given):
        log.info(line)
    return banks, stats


def fleet_router(bank_root: str | Path, config: RunConfig, machines=None, with_embedders: bool = False,
                 given: Iterable[str] = (), detached: bool = False, decode_limit_s: float = 0.0) -> Router:
    """``fleet_banks``, embedding actors when clips are to be scored, and the router over them.
    ``decode_limit_s`` > 0: the embedding actors refuse longer sound files while decoding them."""
    banks, kinds = fleet_banks(bank_root, config, machines, given, detached)
    embedders = None
    frames = {s["features"] == "frames" for s in kinds.values()}
    if with_embedders and len(frames) > 1:
        raise BankError(f"{bank_root}: banks of clip and frame detectors mixed ({kinds}); serve one kind at a time")
    if with_embedders and frames == {True}:
        embedders = start_embedders("frames", frame_settings(config), config.preprocess,
                                    num_actors=config.ray.embed_actors, actor_cpus=config.ray.actor_cpus,
                                    decode_limit_s=decode_limit_s)
    elif with_embedders:
        use_gpu = gpu_wanted(config.ray.use_gpu, config.embed.device)
        embedders = start_embedders("clip", actor_embed_kwargs(config.embed, use_gpu), config.preprocess,
                                    num_actors=config.ray.embed_actors, actor_cpus=config.ray.actor_cpus,
                                    use_gpu=use_gpu, decode_limit_s=decode_limit_s)
    return Router(banks, post=config.post, fleet=config.fleet, embedders=embedders)
