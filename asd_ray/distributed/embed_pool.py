"""The embedding actors: a pool that the Ray Data pipeline feeds (``EmbeddingPool``, its scheduler), and the
fleet's, which take clips from the router (``start_embedders``). Both embed with ``batches.batch_embedder``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np

from asd_ray.config import EmbedConfig, PreprocessConfig
from asd_ray.distributed.batches import actor_embed_kwargs, batch_embedder, joined, object_array, preprocess_batch

def _block_batch(block, start: int | None, end: int | None) -> dict[str, np.ndarray]:
    """A Ray Data block (rows ``start``:``end``, or all) as a numpy batch, without copying its tensor columns."""
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    if start is not None:
        acc = BlockAccessor.for_block(acc.slice(start, end, copy=False))
    return acc.to_batch_format("numpy")


class EmbeddingActor:
    """A Ray actor around one ``EmbedBatch``: embeds the pre-processed blocks of a Ray Data pipeline that the
    driver hands it by reference (``EmbeddingPool``), ``batch_size`` clips per forward pass.

    Its constructor also runs one small forward pass: the first one sets up the device's kernels and libraries
    (2.3 s for HuBERT-Base on an H100), which is then done while the pipeline starts, not on its first batch."""

    def __init__(self, **embed: object):
        self.embedder = batch_embedder("clip", **embed)
        self.batch_size = int(embed.get("batch_size") or 16)
        self.embedder.warm()

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


class StreamEmbedder:
    """A fleet's embedding actor: clips (paths, or a sound file's bytes) -> pre-processed (the Ray Data
    pipeline's own steps) and embedded by ``batch_embedder(features, **settings)``."""

    def __init__(self, features: str, settings: dict, preprocess: dict):
        self.embedder = batch_embedder(features, **settings)
        self.preprocess = preprocess

    def embed(self, clips: Sequence[str | bytes]) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
        """-> (n x dim float32 clip embeddings, or n (T x n_mels) float32 log-mel matrices; n reasons: "" where
        the clip was usable)."""
        out = preprocess_batch({"path": object_array(clips)}, **self.preprocess)
        return self.embedder.features(out), [str(e) for e in out["error"]]


def start_embedders(features: str, settings: dict, preprocess: PreprocessConfig, *, num_actors: int = 1,
                    actor_cpus: float = 0.5, use_gpu: bool = False, decode_limit_s: float = 0.0) -> list:
    """``num_actors`` fleet embedding actors (``StreamEmbedder``) of ``features`` ("clip": ``settings`` from
    ``actor_embed_kwargs``; "frames": ``FramesConfig``'s + sample_rate). They restart and retry their calls.
    ``decode_limit_s`` > 0: longer sound files are refused while they are decoded (``audio.decode``)."""
    import ray

    opts = {"num_gpus": 1} if use_gpu else {"num_cpus": actor_cpus}
    preprocess_kwargs = {**dataclasses.asdict(preprocess), "decode_limit_s": decode_limit_s}
    return [ray.remote(StreamEmbedder).options(max_restarts=-1, max_task_retries=-1, **opts)
            .remote(features, settings, preprocess_kwargs) for _ in range(num_actors)]
