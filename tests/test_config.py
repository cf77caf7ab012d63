"""Config: one source of defaults, YAML + key=value overrides, strict keys and types."""

import pytest

from asd_ray.config import with_overrides, ConfigError, RunConfig, load_config, save_config


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


@pytest.mark.parametrize("detector, setting, says", [
    ("fusion", "bank.k=5", "bank.k is not read by detector fusion: use pooled.k / local.k"),
    ("fusion", "embed.layer=4", "embed.layer is not read by detector fusion: only knn reads it"),
    ("fusion", "ae.epochs=3", "ae.epochs is not read by detector fusion: only ae-mse, ae-maha read it"),
    ("knn", "frames.n_mels=64", "frames.n_mels is not read by detector knn: use embed.n_mels"),
    ("knn", "local.k=2", "local.k is not read by detector knn: use bank.k"),
    ("knn", "supplemental.noise_profile=true", "supplemental.noise_profile is not read by detector knn: only"),
    ("local", "pooled.k=2", "pooled.k is not read by detector local: use local.k"),
    ("fusion", "ray.embed_actors=2", "ray.embed_actors is not read by detector fusion with backbone logmel: no "
                                     "embedding actor runs"),
    ("knn", "ray.actor_cpus=0.5", "ray.actor_cpus is not read by detector knn with backbone logmel: no embedding"),
])
def test_a_setting_the_detector_does_not_read_is_an_error_naming_what_applies(tmp_path, capsys, detector, setting,
                                                                             says):
    from asd_ray.cli import main

    assert main(["run", "--local", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"),
                 "--detector", detector, "--set", setting]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_settings_every_detector_reads_pass_and_compare_checks_its_whole_list(tmp_path, capsys):
    from asd_ray.cli import main
    from asd_ray.detectors import unread_settings

    config = RunConfig()
    assert unread_settings(config, ["bank.metric", "embed.batch_size", "local.k", "pooled.k", "fusion.combine",
                                    "frames.n_mels", "supplemental.floor_db", "post.minmax", "ray.num_cpus"],
                           ["fusion"]) == []
    hubert = with_overrides(config, {"embed.backbone": "/ckpt/hubert"})  # clip embeddings by actors: read
    assert unread_settings(hubert, ["ray.embed_actors", "ray.actor_cpus"], ["knn"]) == []
    assert unread_settings(hubert, ["ray.embed_actors"], ["fusion", "knn"]) == []  # compare: one of them reads it
    # compare: a setting passes when one of its detectors reads it, and fails when none does
    assert unread_settings(config, ["bank.k"], ["fusion", "knn"]) == []
    assert main(["compare", "--local", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"),
                 "--detectors", "local", "ae-maha", "--set", "bank.k=5"]) == 2
    assert "bank.k is not read by detector local, ae-maha: use local.k" in capsys.readouterr().err


def test_embed_batch_size_sets_the_frame_pipelines_batches_too():
    from asd_ray.distributed.run import pipeline_tasks

    assert pipeline_tasks(load_config(RunConfig, None, ["detector=fusion", "embed.batch_size=4"]))[2] == 4


def test_detector_classes_default_to_the_configs_defaults():
    """The config is the one source of defaults: a class built without a setting behaves as the config's default."""
    import dataclasses
    import inspect

    from asd_ray.bank.local_bank import LocalFeatureBank
    from asd_ray.bank.domain_bank import DomainAwareBank
    from asd_ray.bank.memory_bank import MemoryBank
    from asd_ray.config import BankConfig, FusionConfig, LocalConfig
    from asd_ray.detectors import FusionDetector

    for cls, section in ((LocalFeatureBank, LocalConfig()), (MemoryBank, BankConfig()), (DomainAwareBank, BankConfig()),
                         (FusionDetector, FusionConfig())):
        params = inspect.signature(cls.__init__).parameters
        for f in dataclasses.fields(section):
            if f.name in params and params[f.name].default is not inspect.Parameter.empty:
                assert params[f.name].default == getattr(section, f.name), (cls.__name__, f.name)
