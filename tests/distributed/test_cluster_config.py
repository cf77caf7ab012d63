"""cluster.yaml passes Ray's own cluster-launcher validation (offline: no cloud call)."""

from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["node_config"]["InstanceType"].startswith("g4dn") for t in gpu)
    assert any("pip install" in c and "asd-ray" in c for c in config["setup_commands"])


def test_the_dashboard_listens_on_loopback_and_every_node_uses_token_auth():
    """The dashboard's job API runs code: bound to the head's 127.0.0.1 (reached through `ray dashboard`'s SSH
    forward), never 0.0.0.0; each node starts Ray with RAY_AUTH_MODE=token and gets the token file."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0] and "0.0.0.0" not in CLUSTER_YAML.read_text()
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in head + workers) and workers
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "disabled" not in CLUSTER_YAML.read_text()


def test_validation_rejects_a_misspelt_key():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config({**raw, "max_wrokers": 3}))
