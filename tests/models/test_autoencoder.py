"""The AE baseline: frame stacking, training, and the Mahalanobis score against a direct computation."""

import numpy as np
import pytest
import scipy.spatial.distance

from asd_ray.models.autoencoder import (AEFeatures, ae_machine, error_precisions, mahalanobis_score, stack_frames,
                                        train_autoencoder)


def test_stack_frames_concatenates_consecutive_frames():
    frames = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # 7 frames of 3 bands
    v = stack_frames(frames, 5)
    assert v.shape == (3, 15)
    assert v[1].tolist() == frames[1:6].ravel().tolist()  # frame t, t+1, ... each with all its bands
    with pytest.raises(ValueError, match="fewer than the 5"):
        stack_frames(frames[:4], 5)


def test_baseline_features_have_the_baseline_shape():
    x = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32)
    (m,) = AEFeatures().embed([x])
    assert m.shape == (1 + 32000 // 512, 128) and stack_frames(m).shape[1] == 640


def test_mahalanobis_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    errors = rng.standard_normal((400, 6)) @ a + 0.3
    domains = np.array(["source"] * 300 + ["target"] * 100)
    precisions = error_precisions(errors, domains)
    for d in ("source", "target"):
        e = errors[domains == d]
        np.testing.assert_allclose(precisions[d], np.linalg.inv(np.cov(e.T, bias=True)), rtol=1e-8, atol=1e-10)
    clip = rng.standard_normal((9, 6))
    direct = min(np.mean([scipy.spatial.distance.mahalanobis(e, np.zeros(6), precisions[d]) ** 2 for e in clip])
                 for d in ("source", "target"))
    assert mahalanobis_score(clip, precisions) == pytest.approx(direct, rel=1e-10)


def test_autoencoder_loss_decreases_and_anomalies_score_higher():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((4, 40))
    normal = (rng.standard_normal((600, 4)) @ basis).astype(np.float32)  # 4-dimensional structure in 40-d
    model, losses = train_autoencoder(normal, hidden=32, bottleneck=4, layers=2, epochs=15, batch_size=64)
    assert losses[-1] < 0.5 * losses[0]
    clips = [normal[i:i + 30].reshape(-1, 8) for i in range(0, 300, 30)]  # 30 x 40 -> (150 x 8) "log-mel frames"
    odd = [c + rng.standard_normal(c.shape).astype(np.float32) * 2 for c in clips[:3]]
    out = ae_machine(clips, ["source"] * 8 + ["target"] * 2, clips[:3] + odd, context=5, hidden=32, bottleneck=4,
                     layers=2, epochs=15, batch_size=64)
    for kind in ("mse", "maha"):
        assert out.test[kind][3:].min() > out.test[kind][:3].max()
        assert out.train[kind].shape == (10,)
    assert out.losses[-1] < out.losses[0]
