"""The Ray Data embedding pipeline: CPU tasks pre-process the clips (and, for the weight-free log-mel backbone and
for log-mel frames, compute the features in the same tasks); the embedding actors of ``embed_pool`` embed the
rest. Also the warm-up of the pipeline's workers and the two Ray Data scheduling knobs it lowers.

What a task does to one batch is in ``batches``; the cache around the pipeline is ``embed`` and ``cache``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from asd_ray.config import EmbedConfig, PreprocessConfig
from asd_ray.distributed.batches import actor_embed_kwargs, embed_in_task, preprocess_batch

if TYPE_CHECKING:
    from asd_ray.distributed.embed_pool import EmbeddingPool

log = logging.getLogger(__name__)


def task_memory(batch_size: int, preprocess: PreprocessConfig) -> int:
    """Bytes one pre-processing task may hold at its peak: its worker process (512 MiB: Python, numpy, scipy,
    torch, and the log-mel matrices of a frame stage fused with it; Ray Data measured up to 443 MiB) plus
    decoded, normalised and padded float32 copies of ``batch_size`` clips of ``max_seconds`` (20 s when
    uncapped; DCASE clips are 6-18 s).

    Ray schedules with it: no node takes more tasks than its memory holds."""
    seconds = preprocess.max_seconds or 20.0
    return 512 * 2**20 + int(3 * 4 * batch_size * seconds * preprocess.sample_rate)


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


COMPLETION_POLL_S = 0.005  # how long Ray Data's executor waits for its running tasks per step (one batch per task)
TASKS_POLL_S = 0.1  # the same where a task holds several batches: output wakes the executor (Ray's own value)
LIMITS_REFRESH_S = 0.2  # how often it re-reads the cluster resources it may use


def prompt_ray_data(poll_s: float = COMPLETION_POLL_S, refresh_s: float = LIMITS_REFRESH_S) -> bool:
    """Make Ray Data's streaming executor (in this process) step as soon as a running task has new output, at the
    latest every ``poll_s``, and re-read the CPUs it may use every ``refresh_s``. None of the three has a setting in
    Ray 2.60 (``private_apis``):

    - each scheduling step waits until ALL running tasks have output or 0.1 s has passed
      (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``) before it submits new tasks. With two tasks of 0.13 s on
      2 cores, the next task always went to the worker that had just finished: every task ran on ONE worker,
      one after the other (``ray.timeline()``), 130 clips/s where plain Ray tasks did 251. A short poll mended
      that, at a cost: the executor's thread stepped once per poll, and at 5 ms took 1.6-2.7 s of the driver's CPU
      over a 1,610-clip frames stage on 2 cores (the cores the tasks need). Waking on the first new output
      (``wake_ray_data_on_first_output``) mends it without stepping more often, and the poll can stay long where
      the tasks do all the work (``preprocessed``);
    - the resources an execution may use come from its autoscaling coordinator's reservation, read back at
      most once a second (``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S``); until then it runs one task.

    Sets each constant that exists (never above Ray's own value) and logs any it cannot find. Returns whether all
    three were there."""
    from asd_ray.private_apis import set_ray_data_constants, wake_ray_data_on_first_output

    woken = wake_ray_data_on_first_output()
    return set_ray_data_constants(poll_s, refresh_s) and woken


TASK_BATCHES = 4  # batches per pre-processing task where the tasks do all the work (no actor follows them)


def task_blocks(rows: int, batch_size: int, cpus: float, task_batches: int = TASK_BATCHES) -> int:
    """Input blocks (one per task) for a pipeline whose tasks do all the work: ``task_batches`` batches of
    ``batch_size`` clips per task, but at least 4 tasks per CPU where there are clips enough (one batch per task
    at least). Each task pays a round trip from its end to the next task's start (60-80 ms on 2 busy cores,
    against 0.16 s for a batch of 16 ten-second clips: the executor notices, submits, the worker unpacks) and
    its output block is written on its own; a few batches per task pay both a few times less often. Ray Data
    still hands the task its clips one batch of ``batch_size`` at a time."""
    per_task = max(1, batch_size * task_batches)
    return max(1, math.ceil(rows / per_task), min(math.ceil(rows / max(1, batch_size)), 4 * max(1, int(cpus))))


def preprocessed(rows: list[dict], preprocess: PreprocessConfig, *, batch_size: int, num_cpus: float,
                 then: Sequence[Stage] = (), blocks: int | None = None, task_batches: int = 1):
    """Ray Data dataset of ``rows`` (dicts with at least ``path``) after ``preprocess_batch`` and the stages
    ``then``, fused in CPU tasks of ``num_cpus`` each that are never fused into a following actor stage.
    ``blocks``: that many input blocks (Ray Data's choice when None; ``len(rows) / batch_size`` makes every batch the
    same rows whatever the cluster's size); or ``task_batches`` > 1: about that many batches per task
    (``task_blocks``, for pipelines whose tasks do all the work)."""
    import ray

    if blocks is None and task_batches > 1:
        blocks = task_blocks(len(rows), batch_size, ray.cluster_resources().get("CPU", 1))
    per_task = max(1, round(len(rows) / blocks / batch_size)) if blocks else 1
    prompt_ray_data(COMPLETION_POLL_S if per_task == 1 else TASKS_POLL_S)
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
    refs = [task.remote(stages, preprocess.sample_rate) for _ in range(count)]
    load_ray_data_executor(preprocess, batch_size=batch_size, num_cpus=num_cpus)
    return refs


def load_ray_data_executor(preprocess: PreprocessConfig, *, batch_size: int, num_cpus: float) -> None:
    """Import Ray Data's planner and streaming executor in this driver now, while the workers warm, rather than
    when the first pipeline starts (0.45 s of its start on 2 cores, the workers idle meanwhile): plan a one-row
    pipeline of the same operators (``Dataset.explain``, its printout dropped) and run one that needs no task
    (``from_items`` materialised). Once per process: imports stay, and a later run (``compare`` runs one per
    detector) has nothing left to load."""
    import contextlib
    import io

    import ray

    global _executor_loaded
    if _executor_loaded:
        return
    ds = ray.data.from_items([{"path": ""}])
    with contextlib.redirect_stdout(io.StringIO()):
        ds.map_batches(preprocess_batch, fn_kwargs=dataclasses.asdict(preprocess), batch_size=batch_size,
                       num_cpus=num_cpus).explain()
    ds.materialize()
    _executor_loaded = True


_executor_loaded = False  # whether load_ray_data_executor has run in this process


def embedded_tables(rows: list[dict], *, embed: EmbedConfig, preprocess: PreprocessConfig,
                    pool: EmbeddingPool | None, use_gpu: bool, preprocess_cpus: float = 0.0) -> Iterator:
    """The embedding pipeline over ``rows`` (dicts with at least ``path``): Arrow tables of the rows with
    ``embedding`` (and ``flags``, ``error``) instead of samples, as they come.

    Ray Data's pre-processing tasks feed ``pool``'s actors. The weight-free ``logmel`` backbone has nothing to
    load and runs on the CPU: it embeds inside the pre-processing tasks (fused with them), so no waveform
    crosses the object store and no actor is needed (``pool`` may be None)."""
    then, cpus = clip_tasks(embed, use_gpu=use_gpu, preprocess_cpus=preprocess_cpus)
    ds = preprocessed(rows, preprocess, batch_size=embed.batch_size, num_cpus=cpus, then=then,
                      task_batches=TASK_BATCHES if then else 1)
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


def needs_actors(embed: EmbedConfig) -> bool:
    """Whether ``embed``'s backbone embeds in actors (every backbone with weights; ``logmel`` runs in the tasks)."""
    return not clip_tasks(embed, use_gpu=False)[0]
