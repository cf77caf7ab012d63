"""Every private Ray / transformers API that asd-ray uses lives in asd_ray/private_apis.py, and each still exists
in the installed releases: an upgrade that moves one fails here, loudly, instead of changing behaviour."""

import importlib
import inspect
import re
from pathlib import Path

import numpy as np

from asd_ray import private_apis

PACKAGE = Path(private_apis.__file__).parent
PRIVATE = re.compile(r"\b(ray|transformers)\.[\w.]*\._?(_private|_internal)\b|_get_global_client|_compute_mask_indices"
                     r"|from ray\._private|from ray\.data\._internal")


def test_no_module_but_private_apis_reaches_into_ray_or_transformers_internals():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(PACKAGE.rglob("*.py")) if p.name != "private_apis.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if PRIVATE.search(line.split("#")[0]) and not line.lstrip().startswith(('"""', "``"))]
    assert offenders == []


def test_the_installed_releases_are_the_tested_ones():
    assert private_apis.check_versions() == []


def test_every_private_name_used_still_exists():
    dispatcher = private_apis.worker_stdstream_dispatcher()
    assert hasattr(dispatcher, "handlers") and callable(dispatcher.add_handler) and callable(dispatcher.remove_handler)
    for module, owner, name in private_apis.RAY_DATA_CONSTANTS:
        holder = importlib.import_module(module)
        holder = holder if owner is None else getattr(holder, owner)
        assert isinstance(getattr(holder, name), (int, float)), (module, name)
    from ray.data._internal.execution import streaming_executor_state as state  # wake_ray_data_on_first_output

    waits = inspect.getsource(state.process_completed_tasks)
    assert "ray.wait(" in waits and "num_returns=len(active_tasks)" in waits
    calls = [line for line in inspect.getsource(state).splitlines() if "ray.wait(" in line and "#" not in line]
    assert "ray" in state.__dict__ and len(calls) == 1, calls  # the one call the stand-in changes
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: F401
        get_or_create_autoscaling_coordinator)
    from ray.data._internal.stats import get_or_create_stats_actor  # noqa: F401
    import ray._private.worker as worker

    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages)  # the GCS's error notices
    assert list(inspect.signature(worker.print_to_stdstream).parameters)[:2] == ["data", "ignore_prefix"]
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient

    assert callable(context._get_global_client)
    assert "self._controller" in inspect.getsource(ServeControllerClient.__init__)
    assert "get_target_groups" in inspect.getsource(importlib.import_module("ray.serve._private.controller"))
    from ray.serve._private import replica  # keep_direct_port

    assert "enable_so_reuseport" in inspect.signature(replica.start_asgi_http_server).parameters


def test_the_stand_in_for_ray_in_ray_datas_executor_returns_all_ready_refs_as_soon_as_one_is():
    """Its ``wait`` for all refs returns every ready ref at once. When the same refs have stayed ready for 10 ms (a
    task whose output the executor cannot take yet), it first waits 5 ms at most for another, so that such a ref
    cannot make the executor step without pause. Nothing ready: it waits for the first, at most the poll. Fewer
    than all asked: ``ray.wait`` itself."""

    class FakeRay:
        ObjectRef = object

        def __init__(self):
            self.ready, self.calls, self.becomes_ready, self.now = set(), [], set(), 0.0

        def wait(self, refs, *, num_returns=1, timeout=None, fetch_local=True):
            self.calls.append((num_returns, timeout))
            if timeout and not any(r in self.ready for r in refs):  # a blocking wait: the next output may come
                self.ready |= self.becomes_ready
            ready = [r for r in refs if r in self.ready][:num_returns]
            return ready, [r for r in refs if r not in ready]

    fake = FakeRay()
    stand_in = private_apis._FirstReadyRay(fake, clock=lambda: fake.now)
    assert stand_in.ObjectRef is object and (stand_in.REREADY_SPIN_S, stand_in.REREADY_WAIT_S) == (0.01, 0.005)

    def step(now, expected, calls, *, timeout=0.1):
        fake.now = now
        fake.calls.clear()
        assert stand_in.wait(["a", "b", "c"], num_returns=3, timeout=timeout, fetch_local=False) == expected
        assert fake.calls == calls

    fake.ready = {"a"}
    step(0.0, (["a"], ["b", "c"]), [(3, 0)])  # "a" is new: at once
    step(0.005, (["a"], ["b", "c"]), [(3, 0)])  # still ready, for 5 ms only: at once again
    fake.becomes_ready = {"c"}  # ready for 20 ms: 5 ms at most for another, then both
    step(0.02, (["a", "c"], ["b"]), [(3, 0), (1, 0.005), (3, 0)])
    step(0.025, (["a", "c"], ["b"]), [(3, 0)])  # "c" came 5 ms ago: at once
    fake.becomes_ready = set()  # the same two for 30 ms, nothing new within 5 ms: the two once more
    step(0.05, (["a", "c"], ["b"]), [(3, 0), (1, 0.005)])
    fake.ready, fake.becomes_ready = set(), {"b"}  # nothing ready: the whole poll at most for the first
    step(0.06, (["b"], ["a", "c"]), [(3, 0), (1, 0.1), (3, 0)])
    fake.ready = {"a", "b", "c"}  # all ready: at once, as ray.wait
    step(0.5, (["a", "b", "c"], []), [(3, 0)])
    fake.ready, fake.becomes_ready = set(), {"a"}  # "a", ready at an earlier call, has its next output: new
    step(0.6, (["a"], ["b", "c"]), [(3, 0), (1, 0.1), (3, 0)])
    step(0.605, (["a"], ["b", "c"]), [(3, 0)])  # "a" again (the end of its stream): at once, not after 5 ms
    fake.calls.clear()
    assert stand_in.wait(["a", "b", "c"], num_returns=1, timeout=0.5) == (["a"], ["b", "c"])
    assert fake.calls == [(1, 0.5)]


def test_hubert_span_mask_is_a_boolean_mask_of_about_the_asked_share():
    np.random.seed(0)
    mask = private_apis.hubert_span_mask((8, 200), 0.3, 10)
    assert mask.shape == (8, 200) and mask.dtype == bool and 0.15 < mask.mean() < 0.45
