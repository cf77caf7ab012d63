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
    assert [n for n in state.__dict__ if n == "ray"] and "ray.get(" not in inspect.getsource(state)
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


def test_the_stand_in_for_ray_in_ray_datas_executor_waits_for_one_ref_and_is_ray_otherwise():
    calls = []

    class FakeRay:
        ObjectRef = object

        def wait(self, refs, *, num_returns=1, **kwargs):
            calls.append((list(refs), num_returns, kwargs))
            return refs[:num_returns], refs[num_returns:]

    stand_in = private_apis._FirstReadyRay(FakeRay())
    assert stand_in.wait(["a", "b", "c"], num_returns=3, timeout=0.1, fetch_local=False) == (["a"], ["b", "c"])
    assert calls == [(["a", "b", "c"], 1, {"timeout": 0.1, "fetch_local": False})]
    assert stand_in.ObjectRef is object


def test_hubert_span_mask_is_a_boolean_mask_of_about_the_asked_share():
    np.random.seed(0)
    mask = private_apis.hubert_span_mask((8, 200), 0.3, 10)
    assert mask.shape == (8, 200) and mask.dtype == bool and 0.15 < mask.mean() < 0.45
