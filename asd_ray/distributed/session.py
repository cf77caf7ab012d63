"""Joining or starting Ray: the same code runs under ``ray job submit``, on a cluster or on one laptop."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray: the running session, the cluster at ``RAY_ADDRESS`` (``ray job submit`` sets it),
    or a new local one with ``num_cpus``. Returns True when this call started a local Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return False
    num_cpus = num_cpus or os.cpu_count()
    ray.init(include_dashboard=False, num_cpus=num_cpus)
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
