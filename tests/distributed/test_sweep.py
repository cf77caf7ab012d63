"""Ray Tune sweep on a local Ray: 4 trials over k and distance embed once, and the best trial's metrics
equal those of the main job run with the best config; every space in configs/ completes on 2 CPUs, its trials'
features (clip embeddings, or a frame detector's log-mel frames) made once, up front."""

import dataclasses
import uuid
from pathlib import Path

import pytest

from asd_ray.config import ConfigError, RunConfig, load_config, with_overrides
from asd_ray.distributed.run import ray_run
from asd_ray.distributed.sweep import (EMBEDDING_SECTIONS, SweepSpace, embedding_variants, load_space, sweep,
                                      trial_count)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.slow
def test_sweep_embeds_once_and_its_best_config_reproduces(ray_local, tiny_corpus, tmp_path):
    """configs/sweep_knn.yaml cut small (4 trials over k and distance; the test of every other space is below)."""
    space = _tiny_space("sweep_knn.yaml", [])
    assert space.grid["bank.k"] == [1, 3] and space.grid["bank.metric"] == ["euclidean", "cosine"]
    config = load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}"])
    result = sweep([tiny_corpus], space, config, tmp_path / "sweep", name=f"s-{uuid.uuid4().hex[:6]}")
    assert len(result.table) == 4 and len(result.embedded) == 1 and not result.cached
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 1  # no trial embedded again
    scores = [r["official_score"] for r in result.table]
    assert scores == sorted(scores, reverse=True) and len({(r["param:bank.k"], r["param:bank.metric"])
                                                           for r in result.table}) == 4
    best = load_config(RunConfig, result.best_config_path)
    assert (best.bank.k, best.bank.metric) == (result.table[0]["param:bank.k"], result.table[0]["param:bank.metric"])
    report = ray_run([tiny_corpus], best, tmp_path / "run")
    # the objective is the dev_data score; the eval_data score is shown beside it, never mixed in
    assert report.metrics["splits"]["dev_data"]["official_score"] == result.table[0]["official_score"]
    assert report.metrics["splits"]["eval_data"]["official_score"] == result.table[0]["eval_official_score"]
    assert "| bank.k | bank.metric | bank.strategy | official_score" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_a_space_ranges_over_backbones_and_layers(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("grid:\n  embed.backbone: [/ckpt/a, /ckpt/b]\n  embed.layer: [last, 6, \"4,8,12\"]\n")
    variants = embedding_variants(load_space(space_file), RunConfig())
    assert [(v.embed.backbone, v.embed.layer) for v in variants] == [
        (b, layer) for b in ("/ckpt/a", "/ckpt/b") for layer in ("last", "6", "4,8,12")]


def test_space_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  bank.kk: [1]\n")
    with pytest.raises(ConfigError, match="bank.kk"):
        load_space(bad)
    bad.write_text("sample:\n  embed.layer: {choice: [last, average]}\n")
    with pytest.raises(ConfigError, match="embedding choices go under grid"):
        load_space(bad)
    for name in ("sweep_knn.yaml", "sweep_hubert_layers.yaml", "sweep_finetune.yaml", "sweep_backbones.yaml"):
        load_space(Path(__file__).resolve().parents[2] / "configs" / name)


def test_a_space_setting_that_no_trial_reads_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    from asd_ray.cli import main
    from asd_ray.distributed import sweep as sweep_module
    from asd_ray.distributed.sweep import check_space_settings

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(sweep_module, "ensure_ray", no_ray)
    space = tmp_path / "space.yaml"
    space.write_text("grid:\n  bank.k: [1, 3]\n")  # the default detector (fusion) reads local.k and pooled.k
    code = main(["sweep", "--data", str(tmp_path), "--space", str(space), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "bank.k is not read by detector fusion: use pooled.k / local.k" in err
    config = load_config(RunConfig, None, [])
    # read by one trial's detector of a grid over detectors: fine; given on the command line and read by none: refused
    check_space_settings(load_space_text(tmp_path, "grid:\n  detector: [knn, fusion]\n  bank.k: [1, 3]\n"), config)
    with pytest.raises(ConfigError, match="ae.epochs is not read by detector knn"):
        check_space_settings(load_space_text(tmp_path, "base:\n  detector: knn\ngrid:\n  bank.k: [1, 3]\n"), config,
                             ["ae.epochs"])
    with pytest.raises(ConfigError, match="ray.embed_actors"):  # no embedding actor runs for log-mel frames
        check_space_settings(load_space_text(tmp_path, "grid:\n  local.k: [1, 3]\n"), config, ["ray.embed_actors"])
    for name in sorted(p.name for p in CONFIGS.glob("sweep_*.yaml")):  # every shipped space reads what it sets
        check_space_settings(load_space(CONFIGS / name), config)


def load_space_text(folder: Path, text: str) -> SweepSpace:
    path = folder / f"space-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    return load_space(path)


TINY_FINETUNE = ["finetune.batch_size=4", "finetune.crop_seconds=1.0", "finetune.heldout_clips=4",
                 "finetune.warmup_steps=2"]


def _tiny_space(name: str, backbones: list[Path]) -> SweepSpace:
    """A space of configs/ cut to a few trials: the tiny ``backbones`` for its backbones, one value of each other
    embedding choice (each is a pipeline run up front), two values of the first scoring choices (four trials: as many
    as 0.5-CPU trials fill 2 CPUs), one fine-tuning epoch, one sample. A fine-tuning space keeps one trial: its trial
    and its Train worker and feed fill the 2 CPUs alone (the resource plan): a second trial waited for the first (117
    s for two here, 89 s for one beside other work)."""
    space = load_space(CONFIGS / name)
    grid, trials = {}, 1
    most = 1 if space.finetunes else 4
    for key, values in space.grid.items():
        if key == "embed.backbone":
            grid[key], trials = [str(b) for b in backbones], trials * len(backbones)
            continue
        keep = 2 if not key.startswith(EMBEDDING_SECTIONS) and trials * 2 <= most and len(values) > 1 else 1
        grid[key], trials = values[:keep], trials * keep
    sample = {k: ({"choice": [1]} if k == "finetune.epochs" else v) for k, v in space.sample.items()}
    return dataclasses.replace(space, grid=grid, sample=sample, num_samples=1)


@pytest.mark.slow
@pytest.mark.timeout(420)  # on the code before the resource plan, the frame detectors' sweeps hung here
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("sweep_*.yaml") if p.name != "sweep_knn.yaml"))
def test_every_sweep_space_in_configs_completes_on_2_cpus(ray_local, tiny_corpus, tiny_encoder, tiny_hubert, tmp_path,
                                                         name):
    """Each space cut small (``_tiny_space``); the backbones' space over two families, each embedded once, up front."""
    assert ray_local.cluster_resources()["CPU"] == 2
    space = _tiny_space(name, [tiny_hubert, tiny_encoder("audio-spectrogram-transformer")])
    config = load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}", "embed.device=cpu",
                                           f"finetune.init={tiny_hubert}", f"finetune.storage_path={tmp_path / 'ft'}",
                                           *TINY_FINETUNE,
                                           *([f"embed.backbone={tiny_hubert}"] if "hubert" in name else [])])
    result = sweep([tiny_corpus], space, config, tmp_path / "sweep", machines=["valve"],
                   name=f"c-{uuid.uuid4().hex[:6]}")
    assert len(result.table) == trial_count(space)
    if "embed.backbone" in space.grid:  # each (backbone, layer) embedded once, up front, and each one scored
        assert len(result.embedded) == 2 and not result.cached
        assert {r["param:embed.backbone"] for r in result.table} == set(space.grid["embed.backbone"])
    if not space.finetunes:  # the features the trials read (a frame detector's frames too), made once, up front:
        # no trial made its own (two frame-detector trials side by side each made the frames, beside clip
        # embeddings made up front for nobody)
        assert len(result.embedded) == len(embedding_variants(space, with_overrides(config, space.base))) >= 1
        assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == len(result.embedded)
    assert all(0 <= r["official_score"] <= 1 for r in result.table), [r.get("error") for r in result.table]
    # the trials' resource settings (the plan's) are not the best config's: it keeps what was asked
    best = load_config(RunConfig, result.best_config_path)
    assert best.ray == config.ray and best.finetune.worker_cpus == config.finetune.worker_cpus
    if space.finetunes:  # each trial fine-tunes with the same trainer as asd-ray finetune, then scores with its checkpoint
        for row in result.table:
            assert row["final_loss"] > 0 and (Path(row["checkpoint"]) / "model.safetensors").is_file()
        assert best.embed.backbone == result.table[0]["checkpoint"]
