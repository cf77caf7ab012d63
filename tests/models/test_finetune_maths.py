"""Masked prediction, augmentation and the schedule on fixed inputs (no ray)."""

import numpy as np
import pytest
import torch

from asd_ray.errors import CheckpointError
from tiny import WritesAMarker
from asd_ray.models.finetune import (MaskedPrediction, augment, crop_or_tile, load_training_state, mix_noise,
                                     prepare_student, span_mask, time_stretch, warmup_cosine)


def test_span_mask_covers_about_the_asked_share():
    mask = span_mask(64, 250, 0.3, 10, np.random.default_rng(0)).numpy()
    assert mask.dtype == bool and mask.shape == (64, 250)
    assert 0.2 < mask.mean() <= 0.3  # HuBERT's spans overlap, so a little under the nominal share
    assert mask.any(axis=1).all()


def test_augmentations():
    rng = np.random.default_rng(0)
    x = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    assert len(time_stretch(x, 1.25)) == 12800 and len(time_stretch(x, 0.8)) == 20000
    noise = rng.standard_normal(5000).astype(np.float32)
    mixed = mix_noise(x, noise, 5.0)
    added = mixed - x
    assert 10 * np.log10(np.sum(x ** 2) / np.sum(added ** 2)) == pytest.approx(5.0, abs=1e-3)
    assert np.array_equal(mix_noise(x, np.zeros(100, np.float32), 0.0), x)
    assert np.array_equal(augment(x, rng, noise, noise_prob=0.0, stretch_prob=0.0), x)
    crop = crop_or_tile(x[:3000], 8000, rng)
    assert crop.shape == (8000,) and crop.dtype == np.float32


def test_warmup_then_cosine():
    assert warmup_cosine(0, 4, 20) == 0.25 and warmup_cosine(3, 4, 20) == 1.0
    assert warmup_cosine(4, 4, 20) == 1.0 and warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0) and warmup_cosine(30, 4, 20) == pytest.approx(0.0)


@pytest.mark.parametrize("teacher", ["ema", "frozen"])
def test_masked_prediction_starts_with_a_loss_and_moves_the_teacher_only_with_ema(tiny_hubert, teacher):
    from transformers import AutoModel

    torch.manual_seed(0)
    student = prepare_student(AutoModel.from_pretrained(tiny_hubert)).train()
    mp = MaskedPrediction(student, teacher=teacher, ema_decay=0.5, seed=0)
    x = torch.randn(3, 16000)
    loss = mp.loss(x)
    assert loss.item() > 0  # student equal to teacher, but its input is masked: not a zero loss
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss.backward()
    opt.step()
    before = [t.clone() for t in mp.teacher.parameters()]
    mp.update_teacher()
    moved = any(not torch.equal(a, b) for a, b in zip(before, mp.teacher.parameters()))
    assert moved == (teacher == "ema")
    assert mp.collapse_monitor(x) > 0 and student.training


def test_a_student_saved_at_a_checkpoint_resumes_with_its_mask_embedding_and_teacher(tiny_hubert, tmp_path):
    """As the loop saves a checkpoint (student by save_pretrained, teacher state_dict) and a resumed worker loads it:
    the student comes back with its mask embedding and the teacher's state loads into the resumed pair. Before the
    fix the saved config said mask_time_prob=0, the reloaded student had no masked_spec_embed, and resuming failed."""
    from transformers import AutoModel

    torch.manual_seed(0)
    mp = MaskedPrediction(prepare_student(AutoModel.from_pretrained(tiny_hubert)).train(), seed=0)
    x = torch.randn(2, 16000)
    mp.loss(x).backward()
    mp.module.save_pretrained(tmp_path)
    teacher_state = mp.teacher.state_dict()
    resumed = MaskedPrediction(prepare_student(AutoModel.from_pretrained(tmp_path)).train(), seed=0)
    assert torch.equal(resumed.module.masked_spec_embed, mp.module.masked_spec_embed)
    resumed.teacher.load_state_dict(teacher_state)  # strict: the same keys
    assert torch.isfinite(resumed.loss(x))


def test_a_student_built_without_a_mask_embedding_gets_one(tiny_hubert, tmp_path):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(tiny_hubert)
    config.mask_time_prob = 0.0
    model = AutoModel.from_pretrained(tiny_hubert, config=config)
    assert getattr(model, "masked_spec_embed", None) is None
    mp = MaskedPrediction(prepare_student(model).train(), seed=0)
    assert torch.isfinite(mp.loss(torch.randn(2, 16000)))
    mp.module.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).masked_spec_embed.shape == model.masked_spec_embed.shape


def _training_state(steps: int = 3) -> tuple[dict, torch.nn.Module]:
    """The training state as the fine-tuning loop saves it, of a small model after a few AdamW steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 2, 10))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": steps, "epoch": 1,
            "batches_in_epoch": 2, "teacher": model.state_dict()}, model


def test_a_saved_training_state_resumes_with_weights_only(tmp_path):
    state, model = _training_state()
    torch.save(state, tmp_path / "training_state.pt")
    loaded = load_training_state(tmp_path / "training_state.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 2, 10))
    opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])
    assert sched.last_epoch == 3 and sched.get_last_lr() == state["scheduler"]["_last_lr"]
    for a, b in zip(opt.state_dict()["state"].values(), state["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert (loaded["step"], loaded["epoch"], loaded["batches_in_epoch"]) == (3, 1, 2)
    assert torch.equal(load_training_state(tmp_path / "training_state.pt", mmap=True)["teacher"]["weight"],
                       model.weight.detach())


def test_a_training_state_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    state, _ = _training_state(1)
    path = tmp_path / "checkpoint_0" / "training_state.pt"
    path.parent.mkdir()
    torch.save({**state, "scheduler": {**state["scheduler"], "hook": WritesAMarker(marker)}}, path)
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=f"{path}: refused: it holds pickled objects other than tensors "
                                                  f"and plain data, which could run code when loaded \\(it calls "
                                                  f"[a-z.]*open\\)"):
            load_training_state(path, mmap=mmap)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the loader did before: the file's code runs
    assert marker.exists()


def test_a_truncated_or_foreign_training_state_is_named(tmp_path):
    state, _ = _training_state(1)
    torch.save(state, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: cannot be read as a training state"):
        load_training_state(tmp_path / "cut.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a fine-tuning training state \\(no teacher, optimizer"):
        load_training_state(tmp_path / "other.pt")
