"""Joining or starting Ray: the same code runs under ``ray job submit``, on a cluster or on one laptop."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray: the running session, the cluster at ``RAY_ADDRESS`` (``ray job submit`` sets it; ``auto``:
    a ``ray start`` cluster on this machine), or a new local one with ``num_cpus``. Returns True when this call
    started a local Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return False
    num_cpus = num_cpus or os.cpu_count()
    # address="local": a Ray of its own even when a `ray start` cluster runs on this machine (plain ray.init()
    # would join that one and refuse num_cpus); RAY_ADDRESS=auto joins it instead.
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)
    log.info("started a local Ray with %s CPUs", num_cpus)
    return True


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
    file too."""
    import ray.data  # its import sets up its loggers, which are adjusted here

    ray.data.DataContext.get_current().enable_progress_bars = False
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.data", "asd_ray"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.INFO if verbose else logging.ERROR)
        logger.addHandler(to_file)
