"""Config: one source of defaults, YAML + key=value overrides, strict keys and types."""

import pytest

from asd_ray.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("bank:\n  k: 5\nembed:\n  backbone: /ckpt/hubert\n")
    c = load_config(RunConfig, p, ["bank.metric=cosine", "post.median_window=3", "embed.layer=4"])
    assert c.bank.k == 5 and c.bank.metric == "cosine" and c.post.median_window == 3
    assert c.embed.backbone == "/ckpt/hubert" and c.embed.layer == "4"
    assert c.preprocess.target_lufs == -23.0  # untouched default
    save_config(c, tmp_path / "back.yaml")
    assert load_config(RunConfig, tmp_path / "back.yaml") == c


@pytest.mark.parametrize("override, message", [
    ("bank.kk=3", "unknown key"),
    ("bank.k=three", "expected an int"),
    ("bank.k=3.5", "expected an int"),
    ("preprocess.target_lufs=loud", "expected a float"),
    ("bank.metric=manhattan", "is not one of"),
    ("post.minmax=maybe", "expected a bool"),
    ("nonsense", "not key=value"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunConfig, None, [override])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "none.yaml")


def test_yes_no_choices_survive_yaml_booleans(tmp_path):
    config = load_config(RunConfig, None, ["ray.use_gpu=no", "finetune.use_gpu=yes"])
    assert config.ray.use_gpu == "no" and config.finetune.use_gpu == "yes"
    (tmp_path / "c.yaml").write_text("ray:\n  use_gpu: yes\n")
    assert load_config(RunConfig, tmp_path / "c.yaml").ray.use_gpu == "yes"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(RunConfig, None, ["bank.metric=true"])


def test_laptop_config_loads_as_is():
    from pathlib import Path

    c = load_config(RunConfig, Path(__file__).resolve().parents[1] / "configs" / "laptop.yaml")
    assert c.embed.precision == "fp16" and c.finetune.workers == 1 and c.finetune.precision == "fp32"
