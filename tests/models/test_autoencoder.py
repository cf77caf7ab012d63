"""The AE baseline: frame stacking, training, and the Mahalanobis score against a direct computation."""

import numpy as np
import pytest
import scipy.spatial.distance

from asd_ray.models.autoencoder import AEDetector, error_precisions, mahalanobis_score, train_autoencoder
from asd_ray.models.frames import LogMelFrames, stack_frames


def test_stack_frames_concatenates_consecutive_frames():
    frames = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # 7 frames of 3 bands
    v = stack_frames(frames, 5)
    assert v.shape == (3, 15)
    assert v[1].tolist() == frames[1:6].ravel().tolist()  # frame t, t+1, ... each with all its bands
    with pytest.raises(ValueError, match="fewer than the 5"):
        stack_frames(frames[:4], 5)


def test_baseline_features_have_the_baseline_shape():
    x = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32)
    (m,) = LogMelFrames().embed([x])
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
    ae = AEDetector(score_kind="maha", context=5, hidden=32, bottleneck=4, layers=2, epochs=15, batch_size=64)
    ae.fit(clips, [f"c{i}" for i in range(10)], domains=["source"] * 8 + ["target"] * 2)
    both = ae.score_both(clips[:3] + odd)
    for kind in ("mse", "maha"):
        assert both[kind][3:].min() > both[kind][:3].max()
    assert ae.loo_scores().shape == (10,) and ae.loo_ids() == [f"c{i}" for i in range(10)]
    assert ae.losses[-1] < ae.losses[0]


def test_training_on_one_flat_buffer_gives_the_weights_of_adam_over_each_tensor():
    """train_autoencoder's Adam updates one buffer holding every parameter (flat_parameters): the weights, running
    statistics and losses are those of torch's Adam over the model's separate tensors, bit for bit, on one thread
    as the AE trains everywhere; and the trained model's parameters own their storage again."""
    import torch

    from asd_ray.models.autoencoder import DenseAE
    from asd_ray.threads import one_thread

    x = np.random.default_rng(3).standard_normal((700, 40)).astype(np.float32)

    def per_tensor_adam():  # train_autoencoder as it was: torch's Adam over model.parameters()
        torch.manual_seed(0)
        xt, model = torch.from_numpy(x), DenseAE(40, 32, 4, 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen, losses = torch.Generator().manual_seed(0), []
        for _ in range(6):
            model.train()
            order, total, seen = torch.randperm(len(xt), generator=gen), 0.0, 0
            for b in range(0, len(xt), 64):
                idx = order[b:b + 64]
                if len(idx) < 2:
                    continue
                loss = torch.nn.functional.mse_loss(model(xt[idx]), xt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
            losses.append(total / seen)
        return model.eval(), losses

    with one_thread():
        want, want_losses = per_tensor_adam()
        got, got_losses = train_autoencoder(x, hidden=32, bottleneck=4, layers=2, epochs=6, batch_size=64, seed=0)
    assert got_losses == want_losses
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    storages = {p.untyped_storage().data_ptr() for p in got.parameters()}
    assert len(storages) == len(list(got.parameters())) and all(p.grad is None for p in got.parameters())


def test_ae_detector_save_load_scores_the_same(tmp_path):
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((20, 8)).astype(np.float32) for _ in range(6)]
    ae = AEDetector(score_kind="mse", context=3, hidden=16, bottleneck=2, layers=1, epochs=2, batch_size=16)
    ae.fit(clips, domains=["source"] * 4 + ["target"] * 2)
    from asd_ray.detectors import load_detector

    loaded = load_detector(ae.save(tmp_path / "ae"))
    assert isinstance(loaded, AEDetector) and loaded.score_kind == "mse" and loaded.dim == 8
    np.testing.assert_allclose(loaded.score(clips[:2]), ae.score(clips[:2]), rtol=1e-6)
    np.testing.assert_array_equal(loaded.loo_scores(), ae.loo_scores())


def test_ae_weights_do_not_depend_on_the_callers_thread_count():
    """A Ray task runs torch with 1 thread, the driver with every core: the AE trains and scores on one thread
    (``threads.one_thread``), so the same clips and seed give the same weights and scores bit for bit, and the
    caller's count is restored."""
    import torch

    rng = np.random.default_rng(2)
    clips = [rng.standard_normal((60, 128)).astype(np.float32) for _ in range(12)]  # 12 x 56 windows of 640-d

    def fitted(callers_threads):
        before = torch.get_num_threads()
        torch.set_num_threads(callers_threads)
        try:
            ae = AEDetector(score_kind="maha", epochs=3, batch_size=64).fit(clips, domains=["source"] * 12)
            assert torch.get_num_threads() == callers_threads
            return ae, {k: v.clone() for k, v in ae.model.state_dict().items()}, ae.score(clips[:4])
        finally:
            torch.set_num_threads(before)

    (ae1, w1, s1), (ae4, w4, s4) = fitted(1), fitted(4)
    assert ae1.losses == ae4.losses
    assert all(torch.equal(w1[k], w4[k]) for k in w1)
    np.testing.assert_array_equal(s1, s4)
