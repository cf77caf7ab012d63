"""Every use of a private API of Ray or transformers, behind one door.

Each function here reaches into a library's internals because its public API has no way to do the job (each says
why). They were written against the releases in ``TESTED``; ``check_versions`` says when an installed release is
another one, and ``tests/test_private_apis.py`` fails loudly when an upgrade moves or renames anything used here,
so that an upgrade is a failing test, not a silent change of behaviour. Nothing is imported at import time.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from importlib.metadata import version
from typing import Any

log = logging.getLogger(__name__)

# package -> the release prefixes the private uses below were written and tested against
TESTED = {"ray": ("2.60.",), "transformers": ("4.", "5.")}


def check_versions() -> list[str]:
    """One line per installed package whose release is not among ``TESTED`` (empty when all are)."""
    lines = []
    for package, prefixes in TESTED.items():
        installed = version(package)
        if not installed.startswith(prefixes):
            lines.append(f"{package} {installed}: asd-ray's private uses of it were tested with {', '.join(prefixes)}"
                         f"x only (asd_ray/private_apis.py); run tests/test_private_apis.py")
    return lines


@functools.lru_cache(maxsize=None)
def _warn_untested(package: str) -> None:
    """Once per process and package: a warning when its release is not among ``TESTED``."""
    for line in check_versions():
        if line.startswith(package + " "):
            log.warning("%s", line)


def worker_stdstream_dispatcher() -> Any:
    """Ray's dispatcher of worker output in the driver (``ray._private.ray_logging``): Ray 2.60 has no public
    switch for where the driver prints its workers' output, so ``session`` wraps its ``ray_print_logs`` handler."""
    _warn_untested("ray")
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def wrap_driver_error_printer(wrap: Any) -> None:
    """Replace the function through which the driver prints what Ray sends it (``ray._private.worker.
    print_to_stdstream``) with ``wrap(original)``. Besides worker output (which ``worker_stdstream_dispatcher``'s
    handler passes to it), the driver's thread ``listen_error_messages`` calls it directly with the GCS's error
    notices, as lines of pid ``raylet`` (e.g. "Task ServeController.graceful_shutdown failed ..." when Serve shuts
    down): no handler or logger of Ray's carries them, so ``session`` wraps the function. Idempotent per process."""
    _warn_untested("ray")
    import ray._private.worker as worker

    if not getattr(worker.print_to_stdstream, "_asd_ray_wrapped", False):
        wrapped = wrap(worker.print_to_stdstream)
        wrapped._asd_ray_wrapped = True
        worker.print_to_stdstream = wrapped


# Ray Data's scheduling constants that have no setting (see ``set_ray_data_constants``): (module, owner, name)
RAY_DATA_CONSTANTS = (
    ("ray.data._internal.execution.streaming_executor_state", None, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"),
    ("ray.data._internal.execution.resource_manager", "ResourceManager", "GLOBAL_LIMITS_UPDATE_INTERVAL_S"),
)


def _constant_owner(module: str, owner: str | None) -> Any:
    import importlib

    mod = importlib.import_module(module)
    return mod if owner is None else getattr(mod, owner)


def set_ray_data_constants(poll_s: float, refresh_s: float) -> bool:
    """Set Ray Data's wait for task completion and its refresh of resource limits in this driver's streaming
    executor to ``poll_s`` and ``refresh_s``, never above Ray's own values (kept from the first call); neither has a
    setting in Ray 2.60 (why it matters: ``distributed.pipeline.prompt_ray_data``). A constant that is gone is
    logged and left. Returns whether both were there."""
    _warn_untested("ray")
    found = True
    for (module, owner_name, name), value in zip(RAY_DATA_CONSTANTS, (poll_s, refresh_s)):
        try:
            owner = _constant_owner(module, owner_name)
        except (ImportError, AttributeError):
            owner = None
        if owner is None or not hasattr(owner, name):
            log.info("Ray Data has no %s: left as it is", name)
            found = False
            continue
        own = _RAY_DATA_DEFAULTS.setdefault(name, getattr(owner, name))
        setattr(owner, name, min(value, own))
    return found


_RAY_DATA_DEFAULTS: dict[str, float] = {}  # each of RAY_DATA_CONSTANTS as Ray set it, before the first change


class _FirstReadyRay:
    """Stands for the ``ray`` module in Ray Data's ``streaming_executor_state`` (``wake_ray_data_on_first_output``);
    every name but ``wait`` is the ``ray`` module's own.

    ``wait(refs, num_returns=len(refs), timeout=t)`` (wait for all, at most ``t``) returns every ref that is ready,
    as soon as one is: each step still takes every ready task, as Ray Data's output budget expects. A ref can stay
    ready while the executor takes nothing from it: its metadata still being fetched (milliseconds), or its op's
    output budget spent (until the consumer catches up). Where no ref has become ready for ``REREADY_SPIN_S``
    (the same ones ready at the end of one call and the start of the next), it waits ``REREADY_WAIT_S`` at most
    for one of the others before it returns them again: such a ref makes the executor step every 5 ms (the poll
    asd-ray used before), never without pause. A ref that became ready during a call's wait is new, though the
    same task's ref was ready at an earlier call: a task's next block, or the end of its stream, is not delayed.
    Where all refs are ready, or the call asks for fewer than all, it is ``ray.wait`` itself."""

    REREADY_SPIN_S = 0.01
    REREADY_WAIT_S = 0.005

    def __init__(self, ray_module: Any, clock: Any = time.monotonic):
        self._ray, self._clock = ray_module, clock
        self._last = threading.local()  # per executor thread: the refs ready at its previous call, and since when

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)

    def wait(self, refs: list, *, num_returns: int = 1, timeout: float | None = None, **kwargs: Any) -> Any:
        refs = list(refs)
        if num_returns != len(refs):
            return self._ray.wait(refs, num_returns=num_returns, timeout=timeout, **kwargs)
        ready, rest = self._ray.wait(refs, num_returns=len(refs), timeout=0, **kwargs)
        ids = {id(r) for r in ready}
        if not ids <= getattr(self._last, "ready", set()):  # a ref is ready that was not at the last call's end
            self._last.since = self._clock()
        if rest and not ready:  # nothing ready: wait for the first, at most the poll
            wait_s = timeout
        elif rest and self._clock() - getattr(self._last, "since", 0.0) > self.REREADY_SPIN_S:
            wait_s = self.REREADY_WAIT_S if timeout is None else min(timeout, self.REREADY_WAIT_S)
        else:
            wait_s = 0
        if wait_s != 0 and self._ray.wait(rest, num_returns=1, timeout=wait_s, **kwargs)[0]:
            ready, rest = self._ray.wait(refs, num_returns=len(refs), timeout=0, **kwargs)
            ids = {id(r) for r in ready}
            self._last.since = self._clock()  # one became ready during this call: new, whoever it is
        self._last.ready = ids
        return ready, rest


def wake_ray_data_on_first_output() -> bool:
    """Make Ray Data's streaming executors (in this process) take their next step as soon as any running task has
    new output. Its ``process_completed_tasks`` waits for ALL of them (``ray.wait(..., num_returns=len(active_tasks))``)
    or for its poll (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``) to run out, so a finished task's CPU stood idle for
    part of a poll, and a short poll made the executor's thread step hundreds of times a second on the cores the
    tasks need. Ray 2.60 has no setting for either. The module's ``ray`` becomes ``_FirstReadyRay`` (a step
    still takes every task that is ready, and a task that stays ready with nothing to take wakes it every 5 ms at
    most once 10 ms have passed). Once per process. Returns False, logged, where the module, its ``ray`` or
    ``process_completed_tasks`` is not there (``tests/test_private_apis.py`` also checks the ``ray.wait`` call
    itself)."""
    _warn_untested("ray")
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError as err:
        log.info("Ray Data's executor still waits for all its tasks: %s", err)
        return False
    if isinstance(getattr(state, "ray", None), _FirstReadyRay):
        return True
    if not hasattr(state, "ray") or not hasattr(state, "process_completed_tasks"):
        log.info("Ray Data's executor still waits for all its tasks: no ray or process_completed_tasks in %s",
                 state.__name__)
        return False
    state.ray = _FirstReadyRay(state.ray)
    return True


def start_ray_data_actors() -> bool:
    """Create Ray Data's stats actor and autoscaling coordinator now (its private factories; creating one that
    exists returns it): Ray Data makes them on a cluster's first execution, and their imports then delay the
    pipeline's first task. Returns False, logged, where this Ray Data has no such factories."""
    _warn_untested("ray")
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as err:
        log.info("Ray Data's actors are not started early: %s", err)
        return False
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()
    return True


def serve_controller() -> Any:
    """Serve's controller actor (``serve.context._get_global_client()._controller``): Serve 2.60 has no public call
    for the addresses its replicas listen on with direct ingress; its own test utilities ask the controller so."""
    _warn_untested("ray")
    from ray import serve

    return serve.context._get_global_client()._controller


def keep_direct_port() -> None:
    """Let a restarted replica bind its predecessor's direct-ingress port again, so that a client's address
    survives the restart. Called in the replica before Serve starts its HTTP server there.

    Serve 2.60 binds that port without SO_REUSEADDR: the connections a killed replica held stay in TIME_WAIT
    on it for a minute, its successor's bind fails, and Serve blocks the port for good and takes the next
    (18801 -> 18802 -> 18803 over restarts; clients of the old address were refused). Serve's own flag for its
    proxies (``enable_so_reuseport``: SO_REUSEADDR and SO_REUSEPORT) is turned on for the replica's server
    too; Serve's port allocator still gives each live replica a port of its own. Serve internals: the test
    that restarts a replica (tests/distributed/test_service.py) and tests/test_private_apis.py fail when an
    upgrade moves them."""
    _warn_untested("ray")
    import inspect

    from ray.serve._private import replica

    original = replica.start_asgi_http_server
    if getattr(original, "keeps_port", False):
        return
    if "enable_so_reuseport" not in inspect.signature(original).parameters:
        log.warning("Serve's start_asgi_http_server has no enable_so_reuseport (Ray %s): a restarted replica "
                    "may answer on another direct port", version("ray"))
        return

    def start(app, options, *, event_loop, enable_so_reuseport=False):
        return original(app, options, event_loop=event_loop, enable_so_reuseport=True)

    start.keeps_port = True
    replica.start_asgi_http_server = start


def hubert_span_mask(shape: tuple[int, int], mask_prob: float, mask_length: int, min_masks: int = 1) -> Any:
    """transformers' ``_compute_mask_indices`` (HuBERT's span masking, a private function of its modeling module):
    a (batch x frames) bool numpy array. It draws from numpy's global generator."""
    _warn_untested("transformers")
    from transformers.models.hubert.modeling_hubert import _compute_mask_indices

    return _compute_mask_indices(shape, mask_prob, mask_length, min_masks=min_masks)
