"""Embedding pipeline: Ray Data's CPU tasks pre-process, embedding actors started ahead of it embed (or the
tasks themselves, for the weight-free log-mel backbone), Parquet holds the result.

The Parquet folder is keyed by the content that decides an embedding (``asd_ray.distributed.cache``): a
second run over the same corpus with the same backbone reads it back instead of embedding again, which is what
sweeps over k, distance or post-processing rely on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from asd_ray.config import EmbedConfig, PreprocessConfig
from asd_ray.data.audio import pad_waveforms, try_preprocess
from asd_ray.data.layout import ClipRecord
from asd_ray.distributed.cache import (IDENTITY_COLUMNS, CacheWriter, cache_folder, clip_identities, read_cached,
                                       repeated_clips, table_parts)
from asd_ray.distributed.session import gpu_wanted
from asd_ray.progress import advance

log = logging.getLogger(__name__)


def limit_threads() -> None:
    """One torch/BLAS thread in this worker process: a Ray task holds a share of one CPU, and a thread pool
    per library per process would oversubscribe the cores that the other tasks are using. Cheap enough to
    call per batch, which also catches libraries loaded since the last call."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch = sys.modules.get("torch")  # not imported for this: a worker that never resamples never needs it
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def preprocess_batch(batch: dict[str, np.ndarray], **preprocess: object) -> dict[str, np.ndarray]:
    """Ray Data map: record columns -> the same columns plus ``samples`` (B x T float32, each clip
    zero-padded to the batch's longest: a fixed-shape tensor column, not pickled objects), ``length``
    (B valid sample counts, 0 for a rejected clip), ``flags`` and ``error`` (the ClipError reason, empty
    when the clip is usable)."""
    limit_threads()
    waves, flags, errors = [], [], []
    for path in batch["path"]:  # a path, or (fleet requests over HTTP) a sound file's bytes
        clip, reason = try_preprocess(path if isinstance(path, bytes) else str(path), **preprocess)
        waves.append(clip.waveform if clip else np.zeros(0, dtype=np.float32))
        flags.append(";".join(clip.flags) if clip else "")
        errors.append(reason)
    out = dict(batch)
    out["samples"], out["length"] = pad_waveforms(waves)
    out["flags"] = np.array(flags, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    return out


def padded_samples(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A batch after ``preprocess_batch`` -> (B x T float32 zero-padded samples, B lengths). Ray Data hands
    over one 2-D array, or an object array of rows when blocks padded to different widths were joined."""
    samples, lengths = batch["samples"], np.asarray(batch["length"], dtype=np.int64)
    if samples.dtype == object or samples.ndim != 2:
        return pad_waveforms([np.asarray(row, dtype=np.float32)[:n] for row, n in zip(samples, lengths)])
    return samples, lengths


def batch_waveforms(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A batch after ``preprocess_batch`` -> each row's waveform (a view without the padding)."""
    samples, lengths = padded_samples(batch)
    return [row[:n] for row, n in zip(samples, lengths)]


def object_array(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (per-row arrays of different lengths in a Ray Data batch)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def task_memory(batch_size: int, preprocess: PreprocessConfig) -> int:
    """Bytes one pre-processing task may hold at its peak: its worker process (512 MiB: Python, numpy, scipy,
    torch, and the log-mel matrices of a frame stage fused with it; Ray Data measured up to 443 MiB) plus
    decoded, normalised and padded float32 copies of ``batch_size`` clips of ``max_seconds`` (20 s when
    uncapped; DCASE clips are 6-18 s).

    Ray schedules with it: no node takes more tasks than its memory holds."""
    seconds = preprocess.max_seconds or 20.0
    return 512 * 2**20 + int(3 * 4 * batch_size * seconds * preprocess.sample_rate)


class EmbedBatch:
    """Ray Data callable class: loads the backbone once, maps a batch of padded waveforms to embeddings.

    Thread-safe: with two calls at once per actor, one batch's host work (block to array, copy to pinned
    memory) overlaps the other's forward pass on the GPU."""

    def __init__(self, **embed: object):
        import torch

        from asd_ray.models.backbones import load_backbone

        torch.set_num_threads(max(1, int(os.environ.get("ASD_RAY_TORCH_THREADS", "1"))))
        self.backbone = load_backbone(**embed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples, lengths = padded_samples(batch)
        ok = np.array([e == "" for e in batch["error"]], dtype=bool) & (lengths > 0)
        emb = np.zeros((len(ok), self.backbone.dim), dtype=np.float32)
        if ok.all():
            emb[:] = self.backbone.embed_padded(samples, lengths)
        elif ok.any():
            emb[ok] = self.backbone.embed_padded(samples[ok], lengths[ok])
        out = {k: v for k, v in batch.items() if k not in ("samples", "length")}
        out["embedding"] = emb
        return out


def _block_batch(block, start: int | None, end: int | None) -> dict[str, np.ndarray]:
    """A Ray Data block (rows ``start``:``end``, or all) as a numpy batch, without copying its tensor columns."""
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    if start is not None:
        acc = BlockAccessor.for_block(acc.slice(start, end, copy=False))
    return acc.to_batch_format("numpy")


def joined(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches after ``preprocess_batch`` (padded to different widths) -> one batch padded to its longest clip."""
    if len(batches) == 1:
        return batches[0]
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k not in ("samples", "length")}
    out["samples"], out["length"] = pad_waveforms([w for b in batches for w in batch_waveforms(b)])
    return out


class EmbeddingActor:
    """A Ray actor around one ``EmbedBatch``: embeds the pre-processed blocks of a Ray Data pipeline that the
    driver hands it by reference (``EmbeddingPool``), ``batch_size`` clips per forward pass.

    Its constructor also runs one small forward pass: the first one sets up the device's kernels and libraries
    (2.3 s for HuBERT-Base on an H100), which is then done while the pipeline starts, not on its first batch."""

    def __init__(self, **embed: object):
        self.embedder = EmbedBatch(**embed)
        self.batch_size = int(embed.get("batch_size") or 16)
        noise = 0.01 * np.random.default_rng(0).standard_normal((2, 16_000)).astype(np.float32)
        self.embedder.backbone.embed_padded(noise, np.array([16_000, 12_000]))

    def ready(self) -> int:
        """The actor's process id, once its backbone is loaded and warm."""
        return os.getpid()

    def embed_blocks(self, slices: Sequence[tuple[int, int] | None], *blocks) -> "pyarrow.Table":
        """Blocks after ``preprocess_batch`` (Ray resolves the driver's references; ``slices[i]``: the rows of
        block i this bundle holds, None for all) -> one Arrow table of their rows with ``embedding``
        (n x dim float32) in place of ``samples`` and ``length``."""
        from ray.data.block import BlockAccessor

        batch = joined([_block_batch(b, *(s or (None, None))) for b, s in zip(blocks, slices)])
        n = len(batch["path"])
        parts = [self.embedder({k: v[i:i + self.batch_size] for k, v in batch.items()})
                 for i in range(0, n, self.batch_size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return BlockAccessor.batch_to_block(out)


class EmbeddingPool:
    """Embedding actors started ahead of the pipeline that feeds them, fed the pre-processed blocks of a Ray Data
    dataset by reference (the driver never touches a waveform), ``calls_per_actor`` calls in flight per actor.

    Why not Ray Data's own actor pool: it starts its actors when the dataset executes and cannot be handed
    started ones, so an actor's start (torch, transformers, the checkpoint, CUDA, a first forward pass: 17 s on
    the H100 node) ran after Ray's start, the discovery and the planning, on the run's critical path, and again
    for every pipeline of the same driver. Started as soon as a run knows it must embed, it overlaps them and
    the pre-processing; kept open, it serves every pipeline of its driver. With two calls running at once per
    actor (threads), one batch's host work overlaps the other's forward pass; a third waits queued.

    Actors that die are restarted and their calls re-sent (twice); ``close`` ends them."""

    def __init__(self, embed: EmbedConfig, *, use_gpu: bool, num_actors: int = 1, actor_cpus: float = 0.5,
                 calls_per_actor: int = 3):
        import ray

        self.config = embed
        self.calls_per_actor = max(1, calls_per_actor)
        opts = {"num_gpus": 1} if use_gpu else {"num_cpus": actor_cpus}
        # Scheduled as Ray Data schedules its own actors: never inside the placement group of the task that starts
        # them (a Ray Tune trial's bundle holds a fraction of a CPU, for its driver only). Ray Data's setting when
        # it is loaded; else its default, SPREAD (importing Ray Data here would put seconds before the actors'
        # start: ``ray_run`` starts them first).
        data = sys.modules.get("ray.data")
        opts["scheduling_strategy"] = data.DataContext.get_current().scheduling_strategy if data else "SPREAD"
        actor = ray.remote(EmbeddingActor).options(max_concurrency=2, max_restarts=2, max_task_retries=2, **opts)
        self.actors = [actor.remote(**actor_embed_kwargs(embed, use_gpu)) for _ in range(max(1, num_actors))]
        # each actor's start, awaited by ``embed`` before it gets work: one that cannot be scheduled (a second
        # actor on a one-GPU node) must not hold bundles while the others could embed them
        self.starts = [a.ready.remote() for a in self.actors]

    def ready(self) -> list[int]:
        """Wait until every actor has loaded its backbone: their process ids (a failed start raises here)."""
        return self._get(self.starts)

    def _get(self, refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            from asd_ray.errors import BackboneError

            # the creation task's traceback is in the message: its last line says why
            why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise BackboneError(f"an embedding actor for {self.config.backbone} could not start or died: {why}"
                                ) from None

    def serves(self, embed: EmbedConfig) -> bool:
        """Whether the actors embed as ``embed`` asks (the batch size is the pipeline's: it may differ)."""
        return dataclasses.replace(self.config, batch_size=embed.batch_size) == embed

    def embed(self, bundles: Iterable) -> Iterator["pyarrow.Table"]:
        """Ray Data ref bundles (``Dataset.iter_internal_ref_bundles`` after ``preprocess_batch``) -> their rows
        embedded, one Arrow table per bundle, in the order they finish. Pulls a bundle only while a started actor
        has room, so Ray Data's back-pressure holds the pre-processing back when the actors are the slower stage."""
        import ray

        pending: dict = {}  # call's ref -> actor index
        load = [0] * len(self.actors)
        starting = dict(zip(self.starts, range(len(self.actors))))  # start's ref -> actor index, until it is done
        ready: set[int] = set()

        def collect(wait: bool) -> list:
            refs = list(pending) + list(starting)
            done, _ = ray.wait(refs, num_returns=1 if wait else len(refs), timeout=None if wait else 0)
            for ref in done:
                if ref in starting:
                    self._get([ref])  # raises if the actor could not start
                    ready.add(starting.pop(ref))
            results = [ref for ref in done if ref in pending]
            for ref in results:
                load[pending.pop(ref)] -= 1
            return self._get(results) if results else []

        try:
            for bundle in bundles:
                while not ready or len(pending) >= self.calls_per_actor * len(ready):
                    yield from collect(wait=True)
                refs = list(bundle.block_refs)
                slices = [None if s is None else (s.start_offset, s.end_offset)
                          for s in (bundle.slices or [None] * len(refs))]
                i = min(ready, key=lambda j: load[j])
                pending[self.actors[i].embed_blocks.remote(slices, *refs)] = i
                load[i] += 1
                yield from collect(wait=False)
            while pending:
                yield from collect(wait=True)
        finally:
            del bundles  # an abandoned iterator shuts Ray Data's executor down

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.starts = [], []


def actor_embed_kwargs(embed: EmbedConfig, use_gpu: bool) -> dict:
    """``EmbedConfig`` as keyword arguments for an embedding actor: "auto" becomes "cpu" on an actor without
    a GPU (Ray hides the node's GPUs from it, but torch could still see them)."""
    kwargs = dataclasses.asdict(embed)
    if not use_gpu and kwargs["device"] == "auto":
        kwargs["device"] = "cpu"
    return kwargs


@dataclass
class EmbeddingTable:
    """Embeddings of the usable clips (rows match ``records``), rejects with reasons, pre-processing flags."""

    embeddings: np.ndarray
    records: list[ClipRecord]
    rejects: list[dict]
    flags: list[list[str]]
    path: Path
    from_cache: bool


Stage = tuple[Callable[..., dict], dict]  # a Ray Data batch map and its keyword arguments


def task_cpus(setting: float, *, beside_cpu_actor: bool) -> float:
    """CPUs per pre-processing task: ``setting``, or for 0 half a CPU beside embedding actors that run on the
    CPUs (the actor and the tasks share the cores), else a whole one: one worker process per core, each paying
    its imports and first-call set-up once (a 0.5-CPU task doubles the processes, and that cost, for nothing)."""
    return setting or (0.5 if beside_cpu_actor else 1.0)


def clip_tasks(embed: EmbedConfig, *, use_gpu: bool, preprocess_cpus: float = 0.0) -> tuple[list[Stage], float]:
    """What the pre-processing tasks of the clip-embedding pipeline run after ``preprocess_batch``, and their
    CPUs: the weight-free ``logmel`` backbone embeds inside them (no waveform crosses the object store, no
    actor); any other backbone embeds in the actor pool that follows them."""
    then = [(embed_in_task, actor_embed_kwargs(embed, False))] if embed.backbone == "logmel" else []
    return then, task_cpus(preprocess_cpus, beside_cpu_actor=not then and not use_gpu)


def task_stages(preprocess: PreprocessConfig, then: Sequence[Stage] = ()) -> list[Stage]:
    return [(preprocess_batch, dataclasses.asdict(preprocess)), *then]


COMPLETION_POLL_S = 0.005  # how long Ray Data's executor waits for its running tasks per scheduling step
LIMITS_REFRESH_S = 0.2  # how often it re-reads the cluster resources it may use


def prompt_ray_data(poll_s: float = COMPLETION_POLL_S, refresh_s: float = LIMITS_REFRESH_S) -> bool:
    """Make Ray Data's streaming executor (in this driver) notice a finished task within ``poll_s`` and the
    CPUs it may use within ``refresh_s``. Neither has a setting in Ray 2.60; both are module constants:

    - each scheduling step waits until ALL running tasks are done or 0.1 s has passed
      (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``) before it submits new tasks. With two tasks of 0.13 s on
      2 cores, the next task always went to the worker that had just finished: every task ran on ONE worker,
      one after the other (``ray.timeline()``), 130 clips/s where plain Ray tasks did 251;
    - the resources an execution may use come from its autoscaling coordinator's reservation, read back at
      most once a second (``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S``); until then it runs one task.

    Lowers each constant that exists (never raises one) and logs any it cannot find (``private_apis``). Returns
    whether both were there."""
    from asd_ray.private_apis import lower_ray_data_constants

    return lower_ray_data_constants(poll_s, refresh_s)


def preprocessed(rows: list[dict], preprocess: PreprocessConfig, *, batch_size: int, num_cpus: float,
                 then: Sequence[Stage] = (), blocks: int | None = None):
    """Ray Data dataset of ``rows`` (dicts with at least ``path``) after ``preprocess_batch`` and the stages
    ``then``, fused in CPU tasks of ``num_cpus`` each that are never fused into a following actor stage.
    ``blocks``: that many input blocks (Ray Data's choice when None; ``len(rows) / batch_size`` makes every batch the
    same rows whatever the cluster's size)."""
    import ray

    prompt_ray_data()
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for fn, kwargs in task_stages(preprocess, then):
        ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=batch_size, num_cpus=num_cpus,
                            memory=task_memory(batch_size, preprocess))
    return ds


def warm_batch(stages: Sequence[Stage], sample_rate: int) -> str:
    """One 2 s noise clip through ``stages`` in this worker process, so that its imports (torch, the audio
    stack) and first-call set-up (filters, mel banks, backbones cached per process) are done before a real
    batch arrives. Returns "" or why the warm-up failed: it only saves time, the real batches report errors."""
    import tempfile

    import ray.data  # noqa: F401 - a worker unpickling its first Ray Data task imports it (0.6 s)
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="asd-warm-") as tmp:
        path = os.path.join(tmp, "warm.wav")
        sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(2 * sample_rate).astype(np.float32),
                 sample_rate)
        batch = {"path": np.array([path], dtype=object)}
        try:
            for fn, kwargs in stages:
                batch = fn(batch, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported to the caller, never raised in a fire-and-forget task
            return f"{type(err).__name__}: {err}"
    return ""


def start_ray_data_actors() -> None:
    """Create the two detached actors Ray Data makes on a cluster's first execution (its stats actor and its
    autoscaling coordinator) now, without waiting: their processes import Ray Data (about a second each) while
    the warm-up runs, instead of after the pipeline has started (its first task waited 1.1 s for them on 2
    cores). Creating an actor that exists already returns it; a Ray Data without these functions is left alone."""
    from asd_ray.private_apis import start_ray_data_actors as start

    start()


def warm_workers(preprocess: PreprocessConfig, then: Sequence[Stage] = (), *, batch_size: int,
                 num_cpus: float) -> list:
    """Start as many pre-processing workers as the cluster's CPUs hold at once and run ``warm_batch`` in each,
    without waiting, and start Ray Data's own actors: called as soon as Ray is up, their imports overlap the
    driver's discovery and planning, and Ray hands the warm idle workers the pipeline's first tasks. Returns the
    tasks' refs (each "" or a reason)."""
    import ray

    start_ray_data_actors()
    count = max(1, int(ray.cluster_resources().get("CPU", 1.0) // num_cpus))
    task = ray.remote(warm_batch).options(num_cpus=num_cpus, memory=task_memory(batch_size, preprocess))
    stages = task_stages(preprocess, then)
    return [task.remote(stages, preprocess.sample_rate) for _ in range(count)]


def embedded_tables(rows: list[dict], *, embed: EmbedConfig, preprocess: PreprocessConfig,
                    pool: EmbeddingPool | None, use_gpu: bool, preprocess_cpus: float = 0.0) -> Iterator:
    """The embedding pipeline over ``rows`` (dicts with at least ``path``): Arrow tables of the rows with
    ``embedding`` (and ``flags``, ``error``) instead of samples, as they come.

    Ray Data's pre-processing tasks feed ``pool``'s actors. The weight-free ``logmel`` backbone has nothing to
    load and runs on the CPU: it embeds inside the pre-processing tasks (fused with them), so no waveform
    crosses the object store and no actor is needed (``pool`` may be None)."""
    then, cpus = clip_tasks(embed, use_gpu=use_gpu, preprocess_cpus=preprocess_cpus)
    ds = preprocessed(rows, preprocess, batch_size=embed.batch_size, num_cpus=cpus, then=then)
    if then:
        return ds.iter_batches(batch_size=None, batch_format="pyarrow")
    if pool is None:
        raise ValueError(f"embedding with {embed.backbone} needs an EmbeddingPool")
    return pool.embed(ds.iter_internal_ref_bundles())


def await_warm(refs: Sequence) -> None:
    """Wait for the ``warm_workers`` tasks before a pipeline starts. Started while they still hold the CPUs, a
    pipeline runs ONE task until its autoscaling coordinator has reserved the cluster's CPUs for it (see
    ``prompt_ray_data``), and that task may land on a new, cold worker: on 2 loaded cores the stage then ran one
    task for its first 10 s. A failed warm-up is logged; the pipeline reports real errors."""
    import ray

    for reason in ray.get(list(refs)):
        if reason:
            log.warning("warming a pre-processing worker failed: %s", reason)


def frames_batch(batch: dict[str, np.ndarray], **features: object) -> dict[str, np.ndarray]:
    """Ray Data map after ``preprocess_batch``: waveforms -> flattened log-mel matrices and their frame counts.

    It lives here, not beside the frame embedder in ``distributed.run``: a worker imports a task function's
    module to unpickle it, and that one pulls in the detectors, the report and scikit-learn (about a second
    per worker process)."""
    from asd_ray.models.frames import LogMelFrames

    extractor = LogMelFrames(**features)
    mats = [extractor.embed([w])[0] if not e else np.zeros((0, 0), np.float32)
            for w, e in zip(batch_waveforms(batch), batch["error"])]
    out = {k: v for k, v in batch.items() if k not in ("samples", "length")}
    out["frames"] = np.array([m.shape[0] for m in mats], dtype=np.int64)
    out["logmel"] = object_array([m.ravel() for m in mats])
    return out


@functools.lru_cache(maxsize=4)
def _task_embedder(embed: tuple) -> EmbedBatch:
    return EmbedBatch(**dict(embed))


def embed_in_task(batch: dict[str, np.ndarray], **embed: object) -> dict[str, np.ndarray]:
    """Ray Data task map after ``preprocess_batch`` for a weight-free backbone: what ``EmbedBatch`` does, with
    the backbone built once per worker process."""
    return _task_embedder(tuple(sorted(embed.items())))(batch)


def needs_actors(embed: EmbedConfig) -> bool:
    """Whether ``embed``'s backbone embeds in actors (every backbone with weights; ``logmel`` runs in the tasks)."""
    return not clip_tasks(embed, use_gpu=False)[0]


def embed_corpus(records: Sequence[ClipRecord], *, embed: EmbedConfig, preprocess: PreprocessConfig,
                 cache_dir: str | Path, num_actors: int = 1, actor_cpus: float = 0.5,
                 use_gpu: bool | None = None, preprocess_cpus: float = 0.0,
                 pool: EmbeddingPool | None = None) -> EmbeddingTable:
    """Pre-process and embed ``records`` with Ray Data on the connected Ray cluster.

    CPU tasks of ``preprocess_cpus`` each (0: half a CPU beside CPU embedding actors, one otherwise) decode and
    pre-process; the actors of ``pool`` embed whole padded batches (without a pool, ``num_actors`` actors are
    started for this call and ended after it: ``num_gpus=1`` each when ``use_gpu``, else ``actor_cpus`` CPUs so
    that the tasks keep running); the result lands as Parquet under ``cache_dir/<content key>`` and is reused
    by the next call with the same key when it checks out against the clips (``asd_ray.distributed.cache``).
    """
    identities, repeats = clip_identities(records), repeated_clips(records)
    out = cache_folder(records, embed, preprocess, cache_dir, identities)
    cached = read_cached(out, identities, repeats)
    if cached is not None:
        log.info("embeddings cached at %s: not embedding again", out)
        advance(len(records))
        return EmbeddingTable(*table_parts(cached), path=out, from_cache=True)
    if use_gpu is None:
        use_gpu = gpu_wanted("auto", embed.device)
    # Similar lengths together (file size stands in for length): a padded batch wastes little on padding. Each
    # row carries its file's size and mtime as the key saw them: a cache read back is checked against them.
    rows = sorted(({**r.to_row(), **dict(zip(IDENTITY_COLUMNS, identities[r.path]))} for r in records),
                  key=lambda r: (r["size"], r["path"]))
    if not rows:
        raise ValueError("embed_corpus: no clips to embed")
    if pool is not None and needs_actors(embed) and not pool.serves(embed):
        # its actors would embed with another backbone or settings, under this config's cache key
        raise ValueError(f"embed_corpus: the embedding pool was started for {pool.config}, not for {embed}")
    own = pool is None and needs_actors(embed)
    if own:
        pool = EmbeddingPool(embed, use_gpu=use_gpu, num_actors=num_actors, actor_cpus=actor_cpus)
    writer = CacheWriter(out)
    try:
        tables = embedded_tables(rows, embed=embed, preprocess=preprocess, pool=pool, use_gpu=use_gpu,
                                 preprocess_cpus=preprocess_cpus)
        # Written here, block by block as they arrive (embeddings are small): the driver sees the progress.
        for i, block in enumerate(tables):
            writer.write(i, block)
            advance(block.num_rows)
    except BaseException:
        writer.discard()
        raise
    finally:
        if own:
            pool.close()
    columns = writer.publish({"clips": len(rows), "backbone": embed.backbone}, identities, repeats)
    return EmbeddingTable(*table_parts(columns), path=out, from_cache=False)
