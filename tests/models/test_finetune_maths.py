"""Masked prediction, augmentation and the schedule on fixed inputs (no ray)."""

import numpy as np
import pytest
import torch

from asd_ray.models.finetune import (MaskedPrediction, augment, crop_or_tile, mix_noise, prepare_student, span_mask,
                                     time_stretch, warmup_cosine)


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
