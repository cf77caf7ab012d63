"""Ray Train DDP fine-tuning on 2 CPU workers: the loss falls, no collapse, a worker killed mid-run is
survived by resuming from the last checkpoint and ends with the weights of an unbroken run, the final checkpoint
is a backbone, and every entry of the corpus (bad clips, a directory named like a clip, a dangling link) is
counted with its reason."""

import json
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest

from asd_ray.config import FinetuneConfig, RunConfig, load_config
from asd_ray.distributed.finetune import finetune
from asd_ray.distributed.finetune_feed import rank_rows
from asd_ray.models.backbones import load_backbone
from node_loss import fault_run_settings, registered_checkpoints
from tiny import NOT_FILES, WritesAMarker, entries_named_like_clips


def _train_worker_pids():
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in open(f"/proc/{entry.name}/cmdline", "rb").read():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _kill_a_worker_after_first_checkpoint(run_dir, killed: list, stop: threading.Event):
    while not stop.is_set():
        if registered_checkpoints(run_dir):  # one a restart resumes from
            for pid in _train_worker_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.02)


def _weights(checkpoint) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:  # bit for bit: the same draws, rows and CPU kernels (one torch thread per worker) in both runs
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_rank_rows_are_fixed_by_the_seed_and_give_each_rank_its_own_clips():
    rows = rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=5)
    assert rows == rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=5)
    assert rows != rank_rows(clips=21, workers=2, steps_per_epoch=2, batch_size=4, epochs=3, seed=6)
    assert [len(r) for r in rows] == [3 * 2 * 4] * 2
    for epoch in range(3):
        mine = [[r["index"] for r in rank if r["epoch"] == epoch] for rank in rows]
        assert len(set(mine[0]) | set(mine[1])) == 16  # no clip on both ranks in one epoch
    assert [r["epoch"] for r in rows[0]] == sorted(r["epoch"] for r in rows[0])  # epoch after epoch, in order


def test_finetune_learns_survives_a_killed_worker_and_gives_a_backbone(ray_local, corpus_with_bad_clips, tiny_hubert,
                                                                       unbroken_finetune, tmp_path):
    name = f"ft-{uuid.uuid4().hex[:8]}"
    config = load_config(RunConfig, None, [*fault_run_settings(tiny_hubert, tmp_path / "store", name),
                                           "finetune.worker_cpus=0.5"])
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "store" / name, killed, stop), daemon=True)
    killer.start()
    try:
        result = finetune([corpus_with_bad_clips], config)
    finally:
        stop.set()
    assert killed, "no training worker was killed: the fault was not injected"
    steps = [s["step"] for s in result.steps]
    total = 4 * ((result.clips // 2) // 4)
    assert steps[-1] == total and sorted(set(steps)) == list(range(1, total + 1))
    # Rank 0's steps since its last write die with it when it is the one killed: the restart shows in start_step.
    starts = sorted({s["start_step"] for s in result.steps})
    # resumed from a checkpoint (every 3 steps and at the end of each epoch), not from scratch
    assert len(starts) == 2 and starts[0] == 0 and (starts[1] % 3 == 0 or starts[1] % (total // 4) == 0)
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
    # The same run without the fault (the session's, on other CPU shares) ends with the same weights: the resumed
    # run drew every crop, mask and dropout the unbroken one drew, on the same rows in the same order.
    assert [s["step"] for s in unbroken_finetune.steps] == list(range(1, total + 1))
    _assert_same_weights(_weights(result.checkpoint), _weights(unbroken_finetune.checkpoint))


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


def test_finetune_with_its_default_resources_runs_on_2_cpus(ray_local, tiny_hubert, unbroken_finetune, tmp_path):
    """With its old default of 1 CPU per worker, the 2 workers held both CPUs and the feed waited: the session's
    unbroken run (no resource setting) ran on the session's 2 CPUs."""
    assert ray_local.cluster_resources()["CPU"] == 2
    config = load_config(RunConfig, None, fault_run_settings(tiny_hubert, tmp_path, "x"))
    assert (config.finetune.workers, config.finetune.worker_cpus, config.finetune.feed_cpus) == (
        2, FinetuneConfig().worker_cpus, FinetuneConfig().feed_cpus)  # the defaults
    assert unbroken_finetune.steps and (unbroken_finetune.checkpoint / "model.safetensors").is_file()
    plan = json.loads((unbroken_finetune.run_dir / "finetune.json").read_text())["resources"]
    assert plan["workers"] == 2 and plan["workers"] * plan["worker_cpus"] + plan["feed_cpus"] <= 2
