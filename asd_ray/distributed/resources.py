"""Resource plans that cannot starve themselves, and a watchdog for runs that wait on resources anyway.

On a small machine a Ray job deadlocks silently when what holds CPUs waits for something that needs one more:
Tune trials that reserve every CPU while their own Ray Data tasks wait, two 1-CPU Train workers on 2 CPUs while
their data feed waits for a third. The plans here size trials, workers and feeds from the cluster's CPUs before
anything starts, or refuse with the name of the setting to change. ``Watchdog`` tells the console when a run has
waited on resources for a minute with nothing done meanwhile.

The planning functions are plain arithmetic over the config; only ``ray_probe`` talks to Ray (imported inside).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from asd_ray.config import ConfigError, FinetuneConfig, RunConfig
from asd_ray.detectors import detector_features
from asd_ray.distributed.pipeline import needs_actors, task_cpus

log = logging.getLogger(__name__)

EPS = 1e-9
CHECK_CPUS = 0.5  # the pre-processing tasks of fine-tuning's check of every clip (``finetune.check_clips``)
SWEEP_TASK_CPUS = 0.5  # a sweep trial's frame tasks when ray.preprocess_cpus is 0 (auto): two fit beside two trials


def _tenths(x: float) -> float:
    """``x`` rounded down to a tenth (a CPU share Ray schedules exactly)."""
    return math.floor(x * 10 + EPS) / 10


@dataclass(frozen=True)
class FinetunePlan:
    """What a fine-tuning run reserves: ``workers`` Train workers of ``worker_cpus`` (and ``gpus_per_worker``)
    each, and beside them the Ray Data feed's tasks of ``feed_cpus``."""

    workers: int
    worker_cpus: float
    feed_cpus: float
    gpus_per_worker: int

    @property
    def cpus(self) -> float:
        """CPUs the run needs at once to make progress (workers plus one feed task; the clip check runs before)."""
        return max(CHECK_CPUS, self.workers * self.worker_cpus + self.feed_cpus)


def finetune_resources(ft: FinetuneConfig, cpus: float, gpus: float, use_gpu: bool, *,
                       strict: bool = True) -> FinetunePlan:
    """The plan of a fine-tuning run on ``cpus`` CPUs and ``gpus`` GPUs (what Ray has for it).

    ``finetune.worker_cpus`` 0 (auto) gives each worker an equal share of what the feed leaves, at most one CPU
    (0.5 each for the default 2 workers on 2 CPUs). A plan that cannot run (the feed would wait for a CPU the
    workers hold, a worker for a GPU that is not there) is a ``ConfigError`` naming the settings to change; with
    ``strict`` False (a cluster that may still grow) it is logged and the plan returned as asked."""
    w, feed = ft.workers, ft.feed_cpus
    if w < 1:
        raise ConfigError(f"finetune.workers={w}: at least 1")
    if use_gpu and gpus < 1:
        _refuse(strict, f"finetune.use_gpu={ft.use_gpu}, and Ray has no GPU: set finetune.use_gpu=auto (or no)")
    elif use_gpu and gpus < w:
        _refuse(strict, f"finetune.workers={w} with a GPU each, and Ray has {gpus:g} GPU(s): set "
                        f"finetune.workers={int(gpus)}")
    fitting = _tenths(min(1.0, (cpus - feed) / w))
    if ft.worker_cpus > 0:
        worker_cpus = ft.worker_cpus
        need = w * worker_cpus + feed
        if need > cpus + EPS:
            fix = f"finetune.worker_cpus={fitting:g}" if fitting >= 0.1 else _fewer_workers(w, feed, cpus)
            _refuse(strict, f"fine-tuning needs {w} worker(s) x finetune.worker_cpus={worker_cpus:g} + a data-feed "
                            f"task of finetune.feed_cpus={feed:g} = {need:g} CPUs at once, and Ray has {cpus:g}: the "
                            f"feed would wait for a CPU the workers hold. Set {fix} (or more CPUs: ray.num_cpus)")
    elif fitting >= 0.1:
        worker_cpus = fitting
    else:
        _refuse(strict, f"fine-tuning: {w} worker(s) and a data-feed task of finetune.feed_cpus={feed:g} CPUs do "
                        f"not fit Ray's {cpus:g} CPUs. Set {_fewer_workers(w, feed, cpus)} (or more CPUs: ray.num_cpus)")
        worker_cpus = 0.1
    return FinetunePlan(workers=w, worker_cpus=worker_cpus, feed_cpus=feed, gpus_per_worker=1 if use_gpu else 0)


def _fewer_workers(workers: int, feed: float, cpus: float) -> str:
    if workers > 1 and cpus - feed >= 0.1:
        return f"finetune.workers={max(1, min(workers - 1, round(_tenths(cpus - feed) * 10)))}"
    return f"finetune.feed_cpus={_tenths(max(0.1, cpus / 2)):g}"


def _refuse(strict: bool, message: str) -> None:
    if strict:
        raise ConfigError(message)
    log.warning("%s (going ahead: the Ray cluster may grow)", message)


def check_run_resources(config: RunConfig, cpus: float, use_gpu: bool, *, strict: bool = True,
                        clip: bool | None = None) -> float:
    """Refuse (``ConfigError`` naming the setting) a run whose Ray work cannot be scheduled on ``cpus`` CPUs: CPU
    embedding actors that hold every CPU their pre-processing tasks need (``ray.embed_actors`` x ``ray.actor_cpus``),
    a task that asks for more CPUs than Ray has (``ray.preprocess_cpus``, ``ray.detector_cpus``). Returns the CPUs the
    embedding pipeline needs at once (of clip embeddings with ``clip``; default: the features ``config.detector``
    eats). ``strict`` False (a cluster that may grow): logged, not refused."""
    clip = detector_features(config) == "clip" if clip is None else clip
    actors = config.ray.embed_actors * config.ray.actor_cpus if clip and needs_actors(config.embed) and not use_gpu else 0.0
    task = task_cpus(config.ray.preprocess_cpus, beside_cpu_actor=actors > 0)
    if actors + task > cpus + EPS:
        fit = max(0, int((cpus - task + EPS) // config.ray.actor_cpus)) if config.ray.actor_cpus > 0 else 0
        fix = (f"ray.embed_actors={fit}" if fit >= 1 else f"ray.actor_cpus={_tenths(max(0.1, (cpus - task) / 2)):g}"
               if cpus - task >= 0.1 else f"ray.preprocess_cpus={_tenths(cpus / 2):g}")
        _refuse(strict, f"embedding holds ray.embed_actors={config.ray.embed_actors} x ray.actor_cpus="
                        f"{config.ray.actor_cpus:g} CPUs and its pre-processing tasks need {task:g} more, and Ray has "
                        f"{cpus:g}: the tasks would wait for the actors forever. Set {fix} (or more CPUs: ray.num_cpus)")
    if not clip and config.ray.detector_cpus > cpus + EPS:
        _refuse(strict, f"ray.detector_cpus={config.ray.detector_cpus:g}: a machine's detector task would wait for "
                        f"more CPUs than Ray has ({cpus:g}); set ray.detector_cpus={min(1.0, cpus):g}")
    return actors + task


@dataclass(frozen=True)
class SweepPlan:
    """How a sweep runs on the cluster: each trial holds ``trial_cpus`` for its own process, and its tasks, actors
    and Train workers need ``inner_cpus`` more at once (``inner_gpus`` GPUs); ``concurrent`` trials run at a time,
    so that what they hold together always leaves each of them room for its inner work. ``overrides`` are the
    resource settings (never a result's) the trials run with."""

    trial_cpus: float
    inner_cpus: float
    inner_gpus: int
    concurrent: int
    overrides: dict

    def describe(self) -> str:
        return (f"{self.concurrent} trial(s) at a time, each {self.trial_cpus:g} CPU for itself + "
                f"{self.inner_cpus:g} for its tasks and workers" + (f" + {self.inner_gpus} GPU(s)" if self.inner_gpus else ""))


def trial_inner_needs(config: RunConfig, finetunes: bool, cpus: float, gpus: float, *, strict: bool = True
                      ) -> tuple[float, int, dict]:
    """What one trial of ``config`` needs beside its own process, with ``cpus`` and ``gpus`` left for it:
    (CPUs, GPUs, resource overrides). Clip embeddings come from the cache the driver filled (nothing); frame
    detectors run one Ray Data task at least; a fine-tuning trial trains (workers + feed), then embeds with its
    checkpoint (actors + a task)."""
    overrides: dict = {}
    if finetunes:
        use_gpu = config.finetune.use_gpu == "yes" or (config.finetune.use_gpu == "auto" and gpus >= 1)
        plan = finetune_resources(config.finetune, cpus, gpus, use_gpu, strict=strict)
        if config.finetune.worker_cpus <= 0:
            overrides["finetune.worker_cpus"] = plan.worker_cpus
        embed_gpu = config.ray.use_gpu == "yes" or (config.ray.use_gpu == "auto" and gpus >= 1
                                                    and config.embed.device != "cpu")
        actors = 0.0 if embed_gpu else config.ray.embed_actors * config.ray.actor_cpus
        embed = actors + task_cpus(config.ray.preprocess_cpus, beside_cpu_actor=not embed_gpu)
        return max(plan.cpus, embed), max(plan.workers * plan.gpus_per_worker, config.ray.embed_actors if embed_gpu
                                          else 0), overrides
    if detector_features(config) == "frames":
        if config.ray.preprocess_cpus <= 0:
            overrides["ray.preprocess_cpus"] = SWEEP_TASK_CPUS
        return task_cpus(config.ray.preprocess_cpus or SWEEP_TASK_CPUS, beside_cpu_actor=False), 0, overrides
    return 0.0, 0, overrides


def sweep_resources(trial_configs: Iterable[RunConfig], trial_cpus: float, finetunes: bool, cpus: float,
                    gpus: float, *, strict: bool = True) -> SweepPlan:
    """The plan of a sweep whose trials run ``trial_configs`` (every distinct one the space can give), each trial
    holding ``trial_cpus``, on ``cpus`` CPUs and ``gpus`` GPUs.

    ``concurrent`` = how many (trial + its inner needs) fit at once: then whatever the trials hold, one trial's
    tasks can always be scheduled, and trials never wait on each other forever. A trial that does not fit alone
    is a ``ConfigError`` naming the settings to change."""
    if trial_cpus < 0.1 - EPS:
        raise ConfigError(f"trial_cpus={trial_cpus:g}: Ray Tune needs at least 0.1 CPU per trial")
    left = cpus - trial_cpus
    if left < -EPS:
        raise ConfigError(f"a trial holds trial_cpus={trial_cpus:g} CPUs (the space file's trial_cpus), and Ray has "
                          f"{cpus:g}: lower trial_cpus in the space file")
    inner, inner_gpus, overrides = 0.0, 0, {}
    for config in trial_configs:
        c, g, o = trial_inner_needs(config, finetunes, left, gpus, strict=strict)
        inner, inner_gpus = max(inner, c), max(inner_gpus, g)
        overrides.update(o)
    per_trial = trial_cpus + inner
    if per_trial > cpus + EPS:
        _refuse(strict, f"a sweep trial needs {per_trial:g} CPUs at once (trial_cpus={trial_cpus:g} in the space file "
                        f"+ {inner:g} for its tasks and workers), and Ray has {cpus:g}: lower trial_cpus, "
                        f"ray.preprocess_cpus or the finetune.* CPUs, or give Ray more (ray.num_cpus)")
    concurrent = max(1, int((cpus + EPS) // per_trial)) if per_trial > 0 else 1
    if inner_gpus:
        concurrent = max(1, min(concurrent, int(gpus // inner_gpus))) if gpus >= inner_gpus else 1
    return SweepPlan(trial_cpus=trial_cpus, inner_cpus=inner, inner_gpus=inner_gpus, concurrent=concurrent,
                     overrides=overrides)


# ---- the watchdog ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceWait:
    """What waits for resources on the cluster right now: pending placement groups (each a list of bundles) and
    task/actor demands (a bundle and how many ask for it), beside the CPUs free and in all."""

    placement_groups: tuple = ()
    demands: tuple = ()  # ((bundle dict, count), ...)
    free_cpus: float = 0.0
    total_cpus: float = 0.0

    @property
    def waiting(self) -> bool:
        return bool(self.placement_groups or self.demands)

    def describe(self) -> str:
        parts = []
        if self.placement_groups:
            shapes = "; ".join(" + ".join(_bundle(b) for b in pg) for pg in self.placement_groups[:3])
            parts.append(f"{len(self.placement_groups)} pending placement group(s) ({shapes}"
                         f"{' ...' if len(self.placement_groups) > 3 else ''})")
        if self.demands:
            n = sum(c for _, c in self.demands)
            parts.append(f"{n} task(s)/actor(s) waiting for " + ", ".join(f"{_bundle(b)} x{c}" for b, c in self.demands[:3]))
        return "; ".join(parts) + f"; {self.free_cpus:g} of {self.total_cpus:g} CPUs free"


def _bundle(b: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items()) if k in ("CPU", "GPU") or not k.islower()) + "}"


def ray_probe() -> ResourceWait | None:
    """The connected Ray's waits, from the autoscaler's view of the cluster (what ``ray status`` shows: it needs
    no dashboard); None when Ray is not running. Without that view, pending placement groups only."""
    import ray

    if not ray.is_initialized():
        return None
    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
        pgs = tuple(tuple(b.bundle for b in d.bundles_by_count for _ in range(b.count))
                    for d in demands.placement_group_demand)
        tasks = tuple((b.bundle, b.count) for d in demands.ray_task_actor_demand for b in d.bundles_by_count)
    except Exception as err:  # noqa: BLE001 - the view moved in an upgrade: fall back on the public table
        log.debug("no cluster status (%s): pending placement groups only", err)
        table = ray.util.placement_group_table()
        pgs = tuple(tuple(info.get("bundles", {}).values()) for info in table.values() if info.get("state") == "PENDING")
        tasks = ()
    return ResourceWait(placement_groups=pgs, demands=tasks, free_cpus=free, total_cpus=total)


class BusyMeter:
    """How busy the CPUs this process's Ray runs on are with this run's work: the CPU time of this process and its
    descendants (a local Ray's raylet and workers; read from /proc) over the time between two looks, as a share
    of ``cpus``; None at the first look or where /proc cannot be read (a Ray joined at an address runs its
    workers elsewhere: there a wait is reported as a possible stall, as before)."""

    def __init__(self, root: int | None = None):
        import os

        self.root = root if root is not None else os.getpid()
        self._last: tuple[float, float] | None = None

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of ``root`` and its living descendants; None without /proc."""
        import os

        parent, ticks = {}, {}
        try:
            hz = os.sysconf("SC_CLK_TCK")
            entries = [e for e in os.listdir("/proc") if e.isdigit()]
        except (OSError, ValueError, AttributeError):
            return None
        for entry in entries:
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            parent[int(entry)] = int(fields[1])
            ticks[int(entry)] = int(fields[11]) + int(fields[12])  # utime, stime
        if self.root not in ticks:
            return None
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0, [self.root]
        while todo:
            pid = todo.pop()
            total += ticks.get(pid, 0)
            todo.extend(children.get(pid, ()))
        return total / hz

    def __call__(self, cpus: float) -> float | None:
        used, now = self.cpu_seconds(), time.monotonic()
        if used is None:
            return None
        last, self._last = self._last, (now, used)
        if last is None or now - last[0] <= 0 or cpus <= 0:
            return None
        return max(0.0, used - last[1]) / (now - last[0]) / cpus


class Watchdog:
    """Says so (``say``) when a run has waited on resources for ``after_s`` seconds with no progress meanwhile,
    then every ``repeat_s`` while it lasts. ``probe()`` gives the cluster's ``ResourceWait`` (None: nothing to
    watch); ``progressed()`` the clock time of the last progress (``asd_ray.progress.last_progress``); ``hint``
    names the settings to change. ``busy(cpus)`` is the share of the CPUs this run's own processes used since the
    last look (``BusyMeter``; None: unknown): when it is at least ``busy_share``, the waiting tasks queue behind
    long ones of the same run (an AE fitted per machine on a busy machine), which is no stall, and the line says
    that instead of advising settings. ``check`` is one look (tests drive it with a fake clock); ``start`` runs it
    every ``poll_s`` in a daemon thread until ``stop``."""

    def __init__(self, probe: Callable[[], ResourceWait | None] = ray_probe, *, hint: str = "",
                 say: Callable[[str], None] | None = None, progressed: Callable[[], float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, after_s: float = 60.0, repeat_s: float = 300.0,
                 poll_s: float = 5.0, busy: Callable[[float], float | None] | None = None, busy_share: float = 0.5):
        from asd_ray.progress import last_progress

        self.busy, self.busy_share = busy or BusyMeter(), busy_share
        self.probe, self.hint, self.clock = probe, hint, clock
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.progressed = progressed or last_progress
        self.after_s, self.repeat_s, self.poll_s = after_s, repeat_s, poll_s
        self.since: float | None = None  # when the current wait began
        self.said: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """One look at the cluster: the message to show now, if any (also passed to ``say``)."""
        now, wait = self.clock(), self.probe()
        if wait is None or not wait.waiting:
            self.since = self.said = None
            return None
        busy = self.busy(wait.total_cpus)  # read only while something waits: no /proc walk every poll otherwise
        if self.since is None:
            self.since = now
        last = self.progressed()
        stalled = now - max(self.since, last if last is not None else self.since)
        if stalled < self.after_s or (self.said is not None and now - self.said < self.repeat_s):
            return None
        self.said = now
        if busy is not None and busy >= self.busy_share:
            n = sum(c for _, c in wait.demands) + len(wait.placement_groups)
            text = (f"asd-ray: {n} task(s) queued for {stalled:.0f} s behind this run's work in progress (its "
                    f"processes use {100 * busy:.0f} % of {wait.total_cpus:g} CPUs): long tasks, not a stall.")
            self.say(text)
            return text
        text = f"asd-ray: waiting for resources for {stalled:.0f} s with nothing done: {wait.describe()}."
        if self.hint:
            text += f" If this does not end, {self.hint}"
        self.say(text)
        return text

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as err:  # noqa: BLE001 - a watchdog never ends the run it watches
                log.debug("resource watchdog: %s", err)

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._loop, name="asd-ray-resource-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread (after the look it may be taking)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


HINTS = {
    "sweep": "lower trial_cpus in the space file or ray.preprocess_cpus, or give Ray more CPUs (ray.num_cpus).",
    "finetune": "set finetune.worker_cpus lower (e.g. 0.5), finetune.workers or finetune.feed_cpus, or give Ray "
                "more CPUs (ray.num_cpus).",
}
DEFAULT_HINT = ("lower ray.detector_cpus, ray.preprocess_cpus or ray.actor_cpus, or give Ray more CPUs "
                "(ray.num_cpus).")
