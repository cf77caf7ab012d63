"""The main job on Ray: the reference run's flow with the Ray Data embedding pipeline as its embedder.

With a detector that eats log-mel frames (the default fusion, the local-feature bank, pooled k-NN, the AE
baseline), Ray Data computes the log-mel matrices (cached like clip embeddings) and each machine's detector is
fitted in its own Ray task (an AE on a GPU each when there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from asd_ray.config import RunConfig
from asd_ray.data.layout import ClipRecord
from asd_ray.detectors import REGISTRY, detector_features, features_key
from asd_ray.distributed.batches import frames_batch
from asd_ray.distributed.cache import COMPLETE, cache_folder
from asd_ray.distributed.embed import EmbeddingTable, embed_corpus, frames_corpus
from asd_ray.distributed.embed_pool import EmbeddingPool
from asd_ray.distributed.pipeline import Stage, await_warm, clip_tasks, needs_actors, task_cpus, warm_workers
from asd_ray.distributed.session import ensure_ray, gpu_wanted, route_ray_data
from asd_ray.progress import advance
from asd_ray.results import Reject, RunReport

if TYPE_CHECKING:
    from asd_ray.detect import Embedder, MachineMap

# ``asd_ray.detect`` (scoring, the report: scikit-learn, pandas) and Ray Data are imported only once Ray and the
# embedding actors have started: on a GPU node the driver's imports took 5.4 s before Ray began, and the actors'
# start (their own imports, 11 s) could only follow.


def embed_table(records, config: RunConfig, pool: EmbeddingPool | None = None) -> EmbeddingTable:
    """The Ray Data pipeline over ``records`` with ``config``'s embedding, pre-processing and Ray knobs
    (read back from the Parquet cache when it holds them already), its actors ``pool``'s when given."""
    return embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=config.ray.cache_dir,
                        num_actors=config.ray.embed_actors, actor_cpus=config.ray.actor_cpus,
                        use_gpu=gpu_wanted(config.ray.use_gpu, config.embed.device),
                        preprocess_cpus=config.ray.preprocess_cpus, pool=pool)


def is_cached(records: Sequence[ClipRecord], config: RunConfig) -> bool:
    """Whether the Parquet cache has published the clip embeddings of ``records`` under ``config`` (whether they
    check out against the clips is seen when they are read: ``embed_corpus`` embeds them again if not)."""
    return (cache_folder(records, config.embed, config.preprocess, config.ray.cache_dir) / COMPLETE).is_file()


def frames_table(records, config: RunConfig) -> EmbeddingTable:
    """The log-mel matrices of ``records`` with ``config``'s frame, pre-processing and Ray knobs, through Ray Data
    (read back from the Parquet cache when it holds them already)."""
    then, cpus, batch_size = pipeline_tasks(config)
    (_, features), = then
    return frames_corpus(records, features=features, preprocess=config.preprocess, cache_dir=config.ray.cache_dir,
                         batch_size=batch_size, num_cpus=cpus)


def features_table(records, config: RunConfig) -> EmbeddingTable:
    """The cached Ray table of the features ``config.detector`` eats: clip embeddings or log-mel matrices."""
    return (embed_table if detector_features(config) == "clip" else frames_table)(records, config)


def ray_embedder(config: RunConfig, pools: list | None = None) -> Embedder:
    """The Ray embedder of clip embeddings; the first of ``pools`` (started by the run's warm-up), when there is
    one, holds its actors."""
    def embedder(records):
        try:
            table = embed_table(records, config, pools[0] if pools else None)
        finally:  # the actors' CPUs or GPUs back for what follows (banks, the plots' tasks) as soon as embedding ends
            while pools:
                pools.pop().close()
        return table.embeddings, table.records, [Reject.of(r) for r in table.rejects], table.flags

    return embedder


def ray_frames_embedder(config: RunConfig) -> Embedder:
    """Ray Data pre-processing + log-mel matrices of every clip, cached like clip embeddings (``frames_table``)."""
    def embedder(records: Sequence[ClipRecord]):
        table = frames_table(records, config)
        return table.embeddings, table.records, [Reject.of(r) for r in table.rejects], table.flags

    return embedder


def _apply(fn: Callable, *args):
    return fn(*args)


def ray_task_map(num_cpus: float, num_gpus: float = 0, progress: bool = True) -> MachineMap:
    """``map`` over Ray tasks: one task per job, all in flight at once (``fn`` may be a partial); each finished
    job advances the stage's bar when ``progress``."""
    import ray

    def machine_map(fn: Callable, jobs: list[tuple]) -> list:
        task = ray.remote(_apply).options(num_cpus=num_cpus, num_gpus=num_gpus)
        refs = [task.remote(fn, *args) for args in jobs]
        pending = refs
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            advance(len(done) if progress else 0)
        return ray.get(refs)

    return machine_map


def check_resources(config: RunConfig, *, strict: bool = True, clip: bool | None = None) -> None:
    """``resources.check_run_resources`` on the connected Ray: a run that could never be scheduled is refused."""
    import ray

    from asd_ray.distributed.resources import check_run_resources

    check_run_resources(config, ray.cluster_resources().get("CPU", 0.0),
                        gpu_wanted(config.ray.use_gpu, config.embed.device), strict=strict, clip=clip)


def embedder_for(config: RunConfig, pools: list | None = None) -> Embedder:
    """The Ray embedder of the features ``config.detector`` eats (clip embeddings: by ``pools``' actors)."""
    return ray_embedder(config, pools) if detector_features(config) == "clip" else ray_frames_embedder(config)


def pipeline_tasks(config: RunConfig) -> tuple[list[Stage], float, int]:
    """What the pre-processing tasks of ``config``'s Ray embedder run after ``preprocess_batch``, their CPUs and
    their clips per batch."""
    if detector_features(config) == "clip":
        then, cpus = clip_tasks(config.embed, use_gpu=gpu_wanted(config.ray.use_gpu, config.embed.device),
                                preprocess_cpus=config.ray.preprocess_cpus)
        return then, cpus, config.embed.batch_size
    from asd_ray.detect import frame_feature_kwargs

    return ([(frames_batch, frame_feature_kwargs(config))],
            task_cpus(config.ray.preprocess_cpus, beside_cpu_actor=False), config.embed.batch_size)


def warm_pipeline(config: RunConfig) -> list:
    """``warm_workers`` for ``config``'s embedding pipeline: the tasks' refs, which ``ray_run`` awaits before
    the pipeline starts."""
    then, cpus, batch_size = pipeline_tasks(config)
    return warm_workers(config.preprocess, then, batch_size=batch_size, num_cpus=cpus)


def ray_run(roots: Sequence[str | Path], config: RunConfig, out_dir: str | Path | None = None,
            machines: Iterable[str] | None = None, feature_cache: dict | None = None,
            fits: dict | None = None) -> RunReport:
    """Embed the corpus with Ray Data (clip embeddings: cached Parquet), then fit, score, decide, evaluate, write.

    Joins the Ray at ``RAY_ADDRESS`` or the running session, else starts a local one. The embedding actors
    start right after (their imports, checkpoint and first forward pass overlap discovery, the workers' warm-up
    and the pipeline's start) and are ended once embedding is done, or after discovery when the cache holds
    every clip. Clip-embedding detectors are fitted in the driver (light); frame detectors in one Ray task per
    machine. With ``feature_cache`` (a dict kept by the caller), runs of several detectors share their features;
    with ``fits``, the fits they share (``detect``).
    """
    started = ensure_ray(num_cpus=config.ray.num_cpus or None, data_logs_now=False)
    check_resources(config, strict=started)
    kind = detector_features(config)
    pools: list[EmbeddingPool] = []
    if (kind == "clip" and needs_actors(config.embed)
            and not (feature_cache is not None and features_key(config) in feature_cache)):
        # Started before discovery, on the chance that the cache misses (ended after it if it does not), and
        # before the warm-up tasks: an actor then takes one of the idle worker processes Ray starts with the
        # driver, saving its process start (Ray never gives an actor a worker that has run a task).
        pools.append(EmbeddingPool(config.embed, use_gpu=gpu_wanted(config.ray.use_gpu, config.embed.device),
                                   num_actors=config.ray.embed_actors, actor_cpus=config.ray.actor_cpus))
    try:  # the pool ends with the run, whatever fails
        route_ray_data()
        from asd_ray.detect import run_detection, shared

        warm = warm_pipeline(config)  # worker imports overlap discovery; a cached run wastes a second of idle CPUs

        def warm_up(records: Sequence[ClipRecord]) -> None:
            if pools and is_cached(records, config):
                pools.pop().close()
            await_warm(warm)

        embedder = shared(embedder_for(config, pools), feature_cache, features_key(config))
        fitting = {}  # clip-embedding detectors: fitted in the driver (light)
        if kind == "frames":
            gpu = gpu_wanted(config.ray.use_gpu) and REGISTRY.trains_a_model(config)  # an AE, alone or in a fusion
            fitting = {"machine_map": ray_task_map(config.ray.detector_cpus, 1 if gpu else 0),
                       "device": "cuda" if gpu else "cpu"}
        # the driver's own work in parallel tasks: the report's plots (a few tenths of a second a machine; 15 machines
        # took 5 s) and the metrics' jackknife (sklearn on each clip left out: 16.6 s of a DCASE-sized run on an H200
        # node, in one process)
        light = ray_task_map(1, progress=False)
        return run_detection(roots, config, embedder, out_dir, machines, warm_up=warm_up, task_map=light, fits=fits,
                             **fitting)
    finally:
        for pool in pools:
            pool.close()
