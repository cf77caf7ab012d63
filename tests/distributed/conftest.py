"""One local Ray for the whole test session, with few CPUs; leftover placement groups are removed after each test."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # address="local": a new Ray even when a `ray start` head (test_job_submit's) is or was running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The session's Ray; a test that leaves a placement group behind (a failed Train set-up) would hang the next."""
    yield ray_session
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    for pg_id, info in placement_group_table().items():
        if info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(ray_session.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.fixture(scope="session")
def two_channel_corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus' valve as DCASE 2026 records it: every clip two channels, the clip at the near microphone and
    a far one that hears it faintly beside noise of its own (the other machines' folders left out)."""
    import shutil

    import numpy as np
    import soundfile as sf

    root = tmp_path_factory.mktemp("two_channel") / "data"
    shutil.copytree(tiny_corpus / "dev_data" / "raw" / "valve", root / "dev_data" / "raw" / "valve")
    for table in ("ground_truth_data", "ground_truth_domain", "ground_truth_attributes"):
        for f in (tiny_corpus / "dev_data" / table).glob("*valve*"):
            (root / "dev_data" / table).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "dev_data" / table / f.name)
    rng = np.random.default_rng(0)
    for wav in sorted((root / "dev_data" / "raw" / "valve").glob("*/*.wav")):
        near, rate = sf.read(str(wav))
        far = 0.1 * np.roll(near, 7) + 0.02 * rng.standard_normal(len(near))
        sf.write(str(wav), np.stack([near, far], axis=1), rate, subtype="FLOAT")
    return root
