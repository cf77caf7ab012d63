"""Bank actors and the fleet router: k-NN scoring for many machine streams (SPEC §4, §8).

One named actor per machine type (``bank:<machine>`` in one namespace; replicas ``bank:<machine>#i``)
wraps whatever detector was saved there (``load_detector``: a clip k-NN bank, a local-feature bank, an
AE ...) and nothing more. Ray restarts a dead one (``max_restarts``), which
reloads its bank from storage, and retries the calls that were in flight (``max_task_retries``), so
no request is lost. ``add()`` persists before it returns, so a restarted actor serves what it had.

The ``Router`` lives in the caller's event loop. Requests ``(machine, stream_id, features or clip)``
queue per machine; a batch leaves when a bank actor has a free slot (after ``max_wait_ms`` at most)
or when ``max_batch`` requests wait, so that under load one actor call carries many requests
(one call per request cannot go beyond about 2k requests/s here). Clips (paths, or a sound file's bytes
from the HTTP service) are embedded first through a pool of embedding actors (clip embeddings, or log-mel
frame matrices for detectors that eat frames). Raw scores come back per stream in request order and go
through that stream's ``StreamPostprocessor`` (causal median, the bank's calibration range and threshold;
added normals re-calibrate running streams too). A request without a score says why (``Result.failure``:
the caller's mistake, or an actor that failed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from asd_ray.bank.memory_bank import BankError
from asd_ray.config import EmbedConfig, FleetConfig, FramesConfig, PostConfig, PreprocessConfig
from asd_ray.detectors import bank_version, check_bank_folder, configure_detector, load_detector
from asd_ray.scoring.postprocess import Calibration, StreamPostprocessor, calibrate


def actor_name(machine: str, replica: int = 0) -> str:
    return f"bank:{machine}" if replica == 0 else f"bank:{machine}#{replica}"


class BankActor:
    """One machine's saved detector as a Ray actor; ``__init__`` (also after a restart) loads it from ``bank_dir``."""

    def __init__(self, machine: str, bank_dir: str, faiss_threads: int = 1, persist: bool = True,
                 settings: dict[str, Any] | None = None):
        self.machine = machine
        self.bank_dir = Path(bank_dir)
        self.persist = persist  # one replica writes the shared bank_dir; the others only apply the same add
        self.bank = load_detector(self.bank_dir, faiss_threads=faiss_threads)
        self.requested = dict(settings or {})  # score-time settings given in the config (``SCORE_SETTINGS`` keys)
        self.settings = configure_detector(self.bank, self.requested)
        self.version = bank_version(self.bank_dir)
        self.pid = os.getpid()

    def score(self, features: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(m x dim) float32 clip embeddings, or m (T x n_mels) log-mel matrices -> (m,) raw scores, exactly
        the saved detector's ``score``."""
        return self.bank.score(features)

    def loo_scores(self) -> np.ndarray:
        return self.bank.loo_scores()

    def add(self, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> dict:
        """Append normals (first-shot calibration) and persist; ids already in the bank are skipped,
        so a call retried after a restart does not add twice. Only clip k-NN banks take added normals.
        Returns ``stats()`` and ``added``, how many were new."""
        added = self.bank.add_normals(embeddings, ids, domain)
        if added and self.persist:
            self._save()
        return {**self.stats(), "added": added}

    def _save(self) -> None:
        tmp, old = self.bank_dir.with_name(self.bank_dir.name + ".new"), self.bank_dir.with_name(self.bank_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        self.bank.save(tmp)
        shutil.rmtree(old, ignore_errors=True)
        self.bank_dir.rename(old)
        tmp.rename(self.bank_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.version = bank_version(self.bank_dir)

    def stats(self) -> dict:
        """What the actor serves: the detector's kind, size and dimension, its score-time settings with where
        each came from ({config key: (value, "config" | "saved bank")}), the bank version and the process."""
        return {"machine": self.machine, "kind": self.bank.kind, "features": self.bank.features,
                "size": self.bank.size, "dim": self.bank.dim, "takes_normals": self.bank.takes_normals,
                **{key: self.bank.score_settings().get(key) for key in ("k", "metric")}, "settings": self.settings,
                "requested": self.requested, "version": self.version, "pid": self.pid,
                "bank_dir": str(self.bank_dir)}


def saved_banks(bank_root: str | Path, *, empty_ok: bool = False) -> tuple[Path, list[str]]:
    """(the bank folder, the machines with a bank saved in it, sorted). A missing folder is a FileNotFoundError;
    so are one machine's bank folder (its domain banks would pass for machines named source and target) and,
    unless ``empty_ok``, a folder without a bank (a fleet over it would serve nothing: most often the run's
    folder given for its ``banks/``). Every fleet, serve and stream command lists its banks here."""
    root = Path(bank_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"bank folder not found: {root}")
    if (root / "bank.json").is_file():
        raise FileNotFoundError(f"{root} is one machine's bank: give the folder that holds a folder per machine "
                                f"({root.parent}?)")
    machines = sorted(d.name for d in root.iterdir() if (d / "bank.json").is_file())
    if not machines and not empty_ok:
        inner = root / "banks"
        hint = (f": did you mean {inner}?" if inner.is_dir() and any((d / "bank.json").is_file() for d in inner.iterdir())
                else " (asd-ray run saves them to <out>/banks: a folder per machine holding its bank.json)")
        raise FileNotFoundError(f"no saved bank in {root}{hint}")
    return root, machines


def check_saved_banks(bank_root: str | Path, *, n_mels: int | None = None) -> tuple[Path, list[str]]:
    """``saved_banks``, then every machine's bank read and checked as a load would (``check_bank_folder``; frame
    detectors against ``n_mels``, the config's ``frames.n_mels``): a corrupt or mismatched bank is refused in one
    line naming its folder and file before Ray starts, not by a bank actor or a replica after it."""
    root, machines = saved_banks(bank_root)
    for machine in machines:
        check_bank_folder(root / machine, n_mels=n_mels)
    return root, machines


def start_banks(bank_root: str | Path, *, machines: Iterable[str] | None = None, replicas: int = 1,
                namespace: str = "asd-ray", faiss_threads: int = 1,
                settings: dict[str, Any] | None = None, detached: bool = False) -> dict[str, list]:
    """Start (or find) the bank actors of every machine saved under ``bank_root/<machine>``.

    ``settings``: score-time settings given in the config ({``SCORE_SETTINGS`` key: value}); each saved
    detector takes those of its kind and keeps its saved values for the rest (``configure_detector``).
    Actors take no CPU slot (they mostly wait; FAISS threads are set explicitly), restart forever and
    retry their calls. An actor found running with another bank folder or other settings is an error (a
    restart would bring back its own). ``detached``: the actors outlive the process that starts them (a
    service's: Serve replicas come and go, a submitted job's driver ends); else they go with it.
    Returns {machine: [actor handles, replica 0 first]}.
    """
    import ray

    root, found = saved_banks(bank_root)
    wanted = set(machines) if machines is not None else None
    missing = sorted(wanted - set(found)) if wanted else []
    if missing:
        raise FileNotFoundError(f"no saved bank for {missing} under {root} (banks there: {found})")
    remote = ray.remote(BankActor)

    def start(machine: str, r: int):
        return (remote.options(name=actor_name(machine, r), namespace=namespace, get_if_exists=True, num_cpus=0,
                               max_restarts=-1, max_task_retries=-1, max_concurrency=1,
                               lifetime="detached" if detached else None)
                .remote(machine, str(root / machine), faiss_threads, r == 0, dict(settings or {})))

    banks = {machine: [start(machine, r) for r in range(replicas)]
             for machine in found if wanted is None or machine in wanted}
    stats = _started(banks, start, root, namespace)
    for s in stats:
        if s["bank_dir"] != str(root / s["machine"]) or s["requested"] != dict(settings or {}):
            raise BankError(f"{actor_name(s['machine'])} in namespace {namespace!r} already runs {s['bank_dir']} "
                            f"with settings {s['requested']}; asked for {root / s['machine']} with {settings or {}}: "
                            f"use another fleet.namespace, or stop that fleet first")
    return banks


_OUT_OF_SCOPE = "all references to the actor were removed"  # Ray's words for an actor ended with its last handle
_NAME_FREED_S = 10.0


def _started(banks: dict[str, list], start: Callable, root: Path, namespace: str) -> list[dict]:
    """Each bank actor's ``stats`` once it has loaded, or a ``BankError`` with the reason it cannot.

    ``get_if_exists`` can hand back an actor that is being ended because the process that started it dropped its
    last handle (two fleets started one after the other in one driver): Ray keeps its name until it is dead. Such an
    actor is started again once its name is free. Not covered: an actor whose end begins after its ``stats``
    answered (its later calls fail), and a handle got through ``get_if_exists`` does not keep alive an actor that
    another handle started (Ray ties a non-detached actor's life to its creator's handles); ``detached`` fleets
    have neither problem."""
    import ray

    stats = {}
    for (machine, r), ref in [((m, r), a.stats.remote()) for m, actors in banks.items() for r, a in enumerate(actors)]:
        for attempt in range(3):
            try:
                stats[machine, r] = ray.get(ref)
                break
            except ray.exceptions.RayActorError as err:  # a bank that cannot be loaded or take the settings
                if _OUT_OF_SCOPE not in str(err) or attempt == 2:
                    raise BankError(f"a bank actor under {root} could not start: {err}") from None
            _await_name_freed(actor_name(machine, r), namespace)
            banks[machine][r] = start(machine, r)
            ref = banks[machine][r].stats.remote()
    return list(stats.values())


def _await_name_freed(name: str, namespace: str) -> None:
    import ray

    deadline = time.monotonic() + _NAME_FREED_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:  # no live actor holds the name
            return
        time.sleep(0.05)


class ClipEmbedder:
    """An embedding actor: clips (paths, or a sound file's bytes) -> pre-processed, embedded (the Ray Data
    pipeline's own steps)."""

    def __init__(self, embed: dict, preprocess: dict):
        from asd_ray.distributed.embed import EmbedBatch

        self.embedder = EmbedBatch(**embed)
        self.preprocess = preprocess

    def embed(self, clips: Sequence[str | bytes]) -> tuple[np.ndarray, list[str]]:
        """-> (n x dim float32 embeddings, n reasons: "" where the clip was usable)."""
        from asd_ray.distributed.embed import preprocess_batch

        out = self.embedder(preprocess_batch({"path": _object_array(clips)}, **self.preprocess))
        return out["embedding"], [str(e) for e in out["error"]]


class FrameEmbedder:
    """An embedding actor for detectors that eat frames: clips (paths or bytes) -> pre-processed log-mel matrices."""

    def __init__(self, frames: dict, preprocess: dict):
        from asd_ray.models.frames import LogMelFrames

        self.extractor = LogMelFrames(sample_rate=preprocess["sample_rate"], **frames)
        self.preprocess = preprocess

    def embed(self, clips: Sequence[str | bytes]) -> tuple[list[np.ndarray], list[str]]:
        """-> (n (T x n_mels) float32 matrices, n reasons: "" where the clip was usable)."""
        from asd_ray.distributed.embed import batch_waveforms, preprocess_batch

        out = preprocess_batch({"path": _object_array(clips)}, **self.preprocess)
        mats = [self.extractor.embed([w])[0] if not e else np.zeros((0, 0), np.float32)
                for w, e in zip(batch_waveforms(out), out["error"])]
        return mats, [str(e) for e in out["error"]]


def _object_array(items: Sequence) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # np.array() would make bytes a fixed-width byte string column
    out[:] = list(items)
    return out


def _preprocess_kwargs(preprocess: PreprocessConfig, decode_limit_s: float) -> dict:
    return {**dataclasses.asdict(preprocess), "decode_limit_s": decode_limit_s}


def start_frame_embedders(frames: FramesConfig, preprocess: PreprocessConfig, *, num_actors: int = 1,
                          actor_cpus: float = 0.5, decode_limit_s: float = 0.0) -> list:
    """``decode_limit_s`` > 0: longer sound files are refused while they are decoded (``audio.decode``)."""
    import ray

    return [ray.remote(FrameEmbedder).options(max_restarts=-1, max_task_retries=-1, num_cpus=actor_cpus)
            .remote(dataclasses.asdict(frames), _preprocess_kwargs(preprocess, decode_limit_s))
            for _ in range(num_actors)]


def start_embedders(embed: EmbedConfig, preprocess: PreprocessConfig, *, num_actors: int = 1,
                    actor_cpus: float = 0.5, use_gpu: bool = False, decode_limit_s: float = 0.0) -> list:
    """``decode_limit_s`` > 0: longer sound files are refused while they are decoded (``audio.decode``)."""
    import ray

    from asd_ray.distributed.embed import actor_embed_kwargs

    kwargs = actor_embed_kwargs(embed, use_gpu)
    opts = {"num_gpus": 1} if use_gpu else {"num_cpus": actor_cpus}
    return [ray.remote(ClipEmbedder).options(max_restarts=-1, max_task_retries=-1, **opts)
            .remote(kwargs, _preprocess_kwargs(preprocess, decode_limit_s)) for _ in range(num_actors)]


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
