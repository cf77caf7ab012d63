"""Joining or starting Ray: the same code runs under ``ray job submit``, on a cluster or on one laptop."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Set by ``route_logs``: the run.log handler and whether the console shows everything; ``ensure_ray`` then sends
# the output of Ray's worker processes (actors, tasks, Ray Train's controller and workers) the same way.
_routing: dict = {}
# A batch of worker output reaches the console (without -v) when a line of it reads as an error: a traceback,
# an ERROR or CRITICAL log line, a C++ log line of level E or F.
_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\b(ERROR|CRITICAL)\b|^\[[^\]]* [EF] \d+ \d+\]")
# Lines Ray logs at level E that report no failure (https://github.com/ray-project/ray/issues/53727: a notice
# that an actor's restart would need its constructor arguments): run.log only.
_NOT_ERRORS = ("has constructor arguments in the object store and max_restarts > 0",)


NEW_LOCAL_RAY = "local"  # RAY_ADDRESS=local: Ray starts a new local instance (ray.init's address="local")


def joins_a_cluster() -> bool:
    """Whether Ray is reached at ``RAY_ADDRESS`` (a cluster, ``auto``, a submitted job's) rather than started here:
    no ``RAY_ADDRESS``, or ``RAY_ADDRESS=local`` (Ray's own word for a new local Ray), starts one."""
    return os.environ.get("RAY_ADDRESS", NEW_LOCAL_RAY) != NEW_LOCAL_RAY


def ensure_ray(num_cpus: int | None = None, *, data_logs_now: bool = True) -> bool:
    """Connect to Ray: the running session, the cluster at ``RAY_ADDRESS`` (``ray job submit`` sets it; ``auto``:
    a ``ray start`` cluster on this machine), or a new local one with ``num_cpus`` (no ``RAY_ADDRESS``, or
    ``RAY_ADDRESS=local``, Ray's own word for one). Returns True when this call started a local Ray.

    Ray Data's log lines are routed too (``route_ray_data``, which imports Ray Data), unless ``data_logs_now`` is
    False: a caller with something to start first (``ray_run``'s embedding actors) then calls it itself."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if joins_a_cluster():
            ray.init(log_to_driver=True)
            _route_worker_output()
            log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        else:
            num_cpus = num_cpus or os.cpu_count()
            # The run's work runs in Ray's worker processes, which Ray starts 15 nice levels below their raylet:
            # on a machine busy with other work they got about 1/30 of a CPU each, and a run crawled where
            # --local gets a fair share. A run's own Ray keeps its workers at the run's priority (a user's own
            # RAY_worker_niceness wins; a cluster joined above keeps its setting).
            os.environ.setdefault("RAY_worker_niceness", "0")
            # address="local": a Ray of its own even when a `ray start` cluster runs on this machine (plain
            # ray.init() would join that one and refuse num_cpus); RAY_ADDRESS=auto joins it instead.
            ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)
            _route_worker_output()
            log.info("started a local Ray with %s CPUs", num_cpus)
            started = True
    if data_logs_now:
        route_ray_data()
    return started


def gpu_wanted(setting: str = "auto", device: str = "auto") -> bool:
    """``use_gpu`` settings (auto / yes / no) -> whether to ask Ray for GPUs: auto means the cluster has one
    and the device is not pinned to the CPU."""
    import ray

    if setting not in ("auto", "yes", "no"):
        raise ValueError(f"use_gpu {setting!r}: use auto, yes or no")
    if setting == "auto":
        return device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    return setting == "yes"


def route_logs(path: Path, verbose: bool = False) -> None:
    """The log lines of Ray, Ray Data and asd-ray of this process into ``path`` (a file of the run folder),
    and on the console only their errors (everything with ``verbose``). Ray Data's own progress lines and bars
    are off: the command draws one bar per stage. Call before Ray starts, so that its start-up lines go to the
    file too. Ray Data's loggers are set up by its import, which takes seconds of a driver's start: they are
    routed by ``route_ray_data`` (``ensure_ray`` calls it), after Ray has started."""
    import ray  # noqa: F401 - its import adds the console handler of Ray's logger, turned down here

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "asd_ray"):
        _route_logger(name, to_file, verbose)
    workers = logging.getLogger("asd_ray.worker_output")  # run.log only: the console gets Ray's own printing
    workers.propagate = False
    workers.setLevel(logging.INFO)
    workers.addHandler(to_file)
    _routing.update(logger=workers, verbose=verbose, to_file=to_file, ray_data=False)


def route_serve_logs() -> None:
    """Serve's log lines as ``route_logs`` routes Ray's (a no-op without it): Serve's import gives its logger a
    console handler of its own that does not propagate to Ray's, so it is routed after that import."""
    if not _routing:
        return
    import ray.serve  # noqa: F401 - its import sets up the "ray.serve" logger

    _route_logger("ray.serve", _routing["to_file"], _routing["verbose"])


def route_ray_data() -> None:
    """Ray Data's log lines as ``route_logs`` routes Ray's (a no-op without it, or once done): imports Ray Data,
    whose import sets up its loggers, and turns its progress bars off."""
    if not _routing or _routing["ray_data"]:
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    _route_logger("ray.data", _routing["to_file"], _routing["verbose"])
    _routing["ray_data"] = True


def _route_logger(name: str, to_file: logging.Handler, verbose: bool) -> None:
    logger = logging.getLogger(name)
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.addHandler(to_file)


def mute_worker_output() -> None:
    """From now on the output of Ray's worker processes goes to run.log only, errors included: a command being
    stopped (Ctrl-C) shuts Ray down, and the actors that die with it (Ray Train's, Ray Data's) say so in tracebacks
    that report no failure of the run."""
    _routing["muted"] = True


def worker_output_is_error(lines: list[str]) -> bool:
    """Whether a batch of a worker's output lines reports a failure (see ``_ERROR_LINE``, ``_NOT_ERRORS``)."""
    return any(_ERROR_LINE.search(line) and not any(n in line for n in _NOT_ERRORS) for line in lines)


def _route_worker_output() -> None:
    """After ``ray.init`` in a process whose logs ``route_logs`` routed: the output of Ray's worker processes,
    which the driver prints as it arrives, goes into run.log; on the console only batches that report an error
    (everything with ``verbose``)."""
    if not _routing:
        return
    # Ray 2.60 has no public switch for the driver's printing of worker output: its handler is wrapped here.
    from asd_ray.private_apis import worker_stdstream_dispatcher

    dispatcher = worker_stdstream_dispatcher()

    printers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:  # log_to_driver off: nothing reaches this process
        return
    to_console, to_file, verbose = printers[0], _routing["logger"], _routing["verbose"]

    def handle(data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or "worker"
        for line in data.get("lines", []):
            to_file.info("(%s pid=%s) %s", source, data.get("pid"), line)
        if not _routing.get("muted") and (verbose or worker_output_is_error(data.get("lines", []))):
            to_console({**data, "routed": True})

    def wrap(print_to_stdstream):
        def routed(data: dict, ignore_prefix: bool) -> None:
            if data.get("routed"):  # worker output that ``handle`` chose for the console
                print_to_stdstream({k: v for k, v in data.items() if k != "routed"}, ignore_prefix)
                return
            # the GCS's error notices (a worker killed, a task failed), which reach no handler: in run.log, and
            # on the console as before unless the command is stopping (Serve's shutdown kills its controller)
            for line in data.get("lines", []):
                to_file.info("(%s) %s", data.get("pid"), line)
            if not _routing.get("muted"):
                print_to_stdstream(data, ignore_prefix)

        return routed

    from asd_ray.private_apis import wrap_driver_error_printer

    wrap_driver_error_printer(wrap)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)  # the name Ray removes it by at shutdown
