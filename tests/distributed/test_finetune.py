"""Ray Train DDP fine-tuning on 2 CPU workers: the loss falls, no collapse, the final checkpoint is a backbone,
every entry of the corpus (bad clips, a directory named like a clip, a dangling link) is counted with its reason, and
a checkpoint that would run code is refused. A run that loses a worker (with its node) and resumes: test_node_loss."""

import json

import numpy as np
import pytest

from asd_ray.config import FinetuneConfig, RunConfig, load_config
from asd_ray.distributed.finetune_feed import rank_rows
from asd_ray.models.backbones import load_backbone
from tiny import NOT_FILES, WritesAMarker, entries_named_like_clips, fault_run_settings


def test_rank_rows_are_fixed_by_the_seed_and_give_each_rank_its_own_clips():
    rows = rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=5)
    assert rows == rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=5)
    assert rows != rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=6)
    assert [len(r) for r in rows] == [3 * 2 * 4] * 2
    for epoch in range(3):
        mine = [[r["index"] for r in rank if r["epoch"] == epoch] for rank in rows]
        assert len(set(mine[0]) | set(mine[1])) == 16  # no clip on both ranks in one epoch
    assert [r["epoch"] for r in rows[0]] == sorted(r["epoch"] for r in rows[0])  # epoch after epoch, in order


@pytest.mark.slow
def test_finetune_learns_and_gives_a_backbone_and_counts_every_entry(unbroken_finetune, corpus_with_bad_clips):
    """The unbroken fault-test run (``asd-ray finetune``, 2 workers, default resources). That a run survives a
    worker's loss, resuming from a checkpoint and ending with these weights, is shown by test_node_loss: a node
    removed under a training worker kills that worker's process with it, and Ray Train restarts the group."""
    result = unbroken_finetune
    steps = [s["step"] for s in result.steps]
    total = 2 * ((result.clips // 2) // 4)  # 2 epochs of 2 workers x batches of 4
    assert steps == list(range(1, total + 1)) and {s["start_step"] for s in result.steps} == {0}
    losses = [s["loss"] for s in result.steps]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    assert min(s["collapse_std"] for s in result.steps) > 1e-3
    lrs = [s["lr"] for s in result.steps]
    assert max(lrs) == 1e-3 and lrs[-1] == 0.0  # warm-up to the configured lr, cosine down to 0 at the last step
    assert (result.checkpoint / "model.safetensors").is_file() and (result.checkpoint / "training_state.pt").is_file()
    backbone = load_backbone(str(result.checkpoint), device="cpu")
    emb = backbone.embed([np.random.default_rng(0).standard_normal(16000).astype(np.float32)])
    assert emb.shape == (1, 32) and np.isfinite(emb).all()
    summary = json.loads((result.run_dir / "finetune.json").read_text())
    counts = summary["counts"]
    assert counts["entries"] == entries_named_like_clips(corpus_with_bad_clips)
    assert counts["entries"] == sum(v for k, v in counts.items() if k != "entries")
    assert counts["trained_on"] == result.clips and counts["rejected"] == 1
    assert "cannot decode" in summary["rejected"][0]["reason"]  # the corrupt train clip
    unused = {u["path"].rsplit("/", 1)[1]: u["reason"] for u in summary["unused"]}
    for name, reason in NOT_FILES.items():  # in the train folder and in the test folder: listed, not lost
        assert reason in unused[name]
    assert "matches no DCASE naming form" in unused["clip recorded tuesday.wav"]


def test_a_checkpoint_that_would_run_code_is_refused_before_ray_starts(tiny_hubert, tmp_path, monkeypatch, capsys):
    """A run folder holding a checkpoint whose training_state.pt would unpickle code (a folder from elsewhere, or
    tampered with): resuming it is refused in one line naming the file, the code does not run, Ray is not started."""
    import torch

    from asd_ray.cli import main
    from asd_ray.distributed import finetune as finetune_module

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(finetune_module, "ensure_ray", no_ray)
    marker, name = tmp_path / "code-ran", "ft-from-elsewhere"
    state = tmp_path / "store" / name / "checkpoint_2026-01-01_00-00-00.000000" / "training_state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"teacher": {}, "optimizer": {}, "scheduler": {"hook": WritesAMarker(marker)}, "step": 3, "epoch": 0,
                "batches_in_epoch": 3}, state)
    code = main(["finetune", "--data", str(tmp_path), "--init", str(tiny_hubert), "--set",
                 f"finetune.storage_path={tmp_path / 'store'}", "--set", f"finetune.name={name}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"asd-ray finetune: error: {state}: refused: it holds pickled objects other than tensors")
    assert not marker.exists()


def test_finetune_with_its_default_resources_runs_on_2_cpus(tiny_hubert, unbroken_finetune, tmp_path):
    """With its old default of 1 CPU per worker, the 2 workers held both CPUs and the feed waited: the unbroken
    run (no resource setting, ``ray.num_cpus=2``) ran on its Ray's 2 CPUs."""
    config = load_config(RunConfig, None, fault_run_settings(tiny_hubert, tmp_path, "x"))
    assert (config.finetune.workers, config.finetune.worker_cpus, config.finetune.feed_cpus) == (
        2, FinetuneConfig().worker_cpus, FinetuneConfig().feed_cpus)  # the defaults
    assert unbroken_finetune.steps and (unbroken_finetune.checkpoint / "model.safetensors").is_file()
    plan = json.loads((unbroken_finetune.run_dir / "finetune.json").read_text())["resources"]
    assert plan["workers"] == 2 and plan["workers"] * plan["worker_cpus"] + plan["feed_cpus"] <= 2
