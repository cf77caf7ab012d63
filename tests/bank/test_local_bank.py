"""The local-feature bank and its coresets: hand-computed scores, the size bound, save/load."""

import numpy as np
import pytest

from asd_ray.bank.coreset import kcenter_coreset, kmeans_centroids, random_subset
from asd_ray.bank.local_bank import LocalFeatureBank, clip_score
from asd_ray.bank.memory_bank import BankError
from asd_ray.detectors import load_detector

PLAIN = {"context": 1, "standardise": False, "pca_dim": 0, "k": 1, "clip_score": "max", "calibration_clips": 0}


def test_clip_score_by_hand():
    d = np.array([1, 5, 2, 8, 3, 4, 6, 7, 9, 10], dtype=float)
    assert clip_score(d, "max") == 10
    assert clip_score(d, "mean") == 5.5
    assert clip_score(d, "topq", 0.2) == 9.5  # the 2 largest of 10
    assert clip_score(d, "topq", 0.01) == 10  # at least one window
    with pytest.raises(BankError):
        clip_score(np.zeros(0), "max")


def test_kcenter_picks_the_farthest_point_each_time_and_keeps_every_cluster():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [50.0]], dtype=np.float32)
    for seed in range(6):
        picks = kcenter_coreset(x, 3, projection_dim=0, seed=seed)
        assert len(set(picks.tolist())) == 3
        hit = {0 if x[p, 0] < 5 else 1 if x[p, 0] < 20 else 2 for p in picks}
        assert hit == {0, 1, 2}  # a random draw of 3 would often miss the lone point at 50


@pytest.mark.parametrize("size", [1, 7, 64, 500])
def test_every_coreset_respects_its_size_bound(size):
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    assert len(kcenter_coreset(x, size, projection_dim=8)) == min(size, 300)
    assert len(random_subset(x, size)) == min(size, 300)
    assert len(kmeans_centroids(x, size)) == min(size, 300)


def test_bank_sizes_stay_within_bank_size():
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((40, 8)).astype(np.float32) for _ in range(12)]
    for coreset in ("kcenter", "kmeans", "random"):
        bank = LocalFeatureBank(context=3, bank_size=50, coreset=coreset, pca_dim=0, calibration_clips=0)
        bank.fit(clips, domains=["source"] * 10 + ["target"] * 2)
        assert {g: b.size for g, b in bank.banks.items()} == {"source": 50, "target": 50}
        assert bank.memory_bytes == 2 * 100 * 24 * 4  # the members, and their centred copies (fit has scored)


def test_local_scores_by_hand():
    a = np.array([[0, 0], [1, 0]], np.float32)
    b = np.array([[0, 1], [1, 1]], np.float32)
    bank = LocalFeatureBank(domain_norm=False, **PLAIN).fit([a, b], ["a", "b"])
    # windows (0,0) and (3,0): nearest members at 0 and 2; the clip's score is the max
    assert bank.score([np.array([[0, 0], [3, 0]], np.float32)]).tolist() == [2.0]
    # leave-one-out: clip a's frames only see clip b's members, 1 away each
    assert bank.loo_scores().tolist() == [1.0, 1.0] and bank.loo_ids() == ["a", "b"]


def test_domain_banks_divide_by_their_own_scale_by_hand():
    clips = [np.array([[0, 0]], np.float32), np.array([[0, 2]], np.float32),  # source: LOO 2 and 2 -> scale 2
             np.array([[10, 0]], np.float32), np.array([[10, 1]], np.float32)]  # target: LOO 1 and 1 -> scale 1
    bank = LocalFeatureBank(domain_norm=True, **PLAIN).fit(clips, domains=["source", "source", "target", "target"])
    assert bank.scales == {"source": 2.0, "target": 1.0}
    # (10, 3): source sqrt(101) / 2 = 5.02, target 2 / 1 = 2; the smaller
    assert bank.score([np.array([[10, 3]], np.float32)]) == pytest.approx([2.0])


def test_local_bank_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    clips = [rng.standard_normal((30, 6)).astype(np.float32) + (i >= 8) for i in range(10)]
    bank = LocalFeatureBank(context=3, bank_size=40, pca_dim=4, whiten=True, clip_score="topq", top_q=0.2,
                            calibration_clips=6).fit(clips, [f"c{i}" for i in range(10)], domains=["source"] * 8 + ["target"] * 2)
    loaded = load_detector(bank.save(tmp_path / "local"))
    assert isinstance(loaded, LocalFeatureBank) and loaded.params == bank.params and loaded.dim == 6
    queries = [rng.standard_normal((25, 6)).astype(np.float32) * 2 for _ in range(4)]
    np.testing.assert_array_equal(loaded.score(queries), bank.score(queries))
    np.testing.assert_array_equal(loaded.loo_scores(), bank.loo_scores())
    assert loaded.loo_ids() == bank.loo_ids() and len(bank.loo_ids()) == 6


def test_local_bank_refuses_bad_input():
    with pytest.raises(BankError, match="before scoring"):
        LocalFeatureBank().score([np.zeros((10, 4), np.float32)])
    bank = LocalFeatureBank(**PLAIN, domain_norm=False).fit([np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32)])
    with pytest.raises(BankError, match="matrix"):
        bank.score([np.zeros((3, 5), np.float32)])


def test_leave_one_out_scores_equal_a_brute_force_search_over_the_other_clips_members():
    rng = np.random.default_rng(5)
    clips = [rng.standard_normal((30, 6)).astype(np.float32) + i % 3 for i in range(10)]
    bank = LocalFeatureBank(context=2, bank_size=120, pca_dim=0, k=2, clip_score="topq", top_q=0.2,
                            calibration_clips=0, domain_norm=True).fit(clips, domains=["source"] * 7 + ["target"] * 3)
    expected = []
    for i, clip in enumerate(clips):
        w = bank.windows(clip)
        per_bank = []
        for g, b in bank.banks.items():
            others = b.members()[bank.owners[g] != i]
            d = np.sqrt(((w[:, None, :] - others[None, :, :]) ** 2).sum(-1))
            per_bank.append(clip_score(np.sort(d, axis=1)[:, :2].mean(axis=1), "topq", 0.2) / bank.scales[g])
        expected.append(min(per_bank))
    np.testing.assert_allclose(bank.loo_scores(), expected, rtol=1e-5)


def test_scores_stay_exact_for_windows_far_from_the_origin():
    """The window search is one BLAS product (|x|^2 + |y|^2 - 2xy): on windows centred on the members' mean, not
    on raw ones whose norms dwarf their distances (here: offset 1,000, spread 0.1, no standardising or PCA)."""
    rng = np.random.default_rng(7)
    clips = [(1000 + 0.1 * rng.standard_normal((20, 6))).astype(np.float32) for _ in range(6)]
    bank = LocalFeatureBank(context=1, standardise=False, pca_dim=0, k=1, clip_score="mean", bank_size=500,
                            calibration_clips=0, domain_norm=False).fit(clips)
    query = (1000 + 0.1 * rng.standard_normal((15, 6))).astype(np.float32)
    members = bank.banks["all"].members().astype(np.float64)
    d = np.sqrt(((query.astype(np.float64)[:, None, :] - members[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(bank.score([query]), [d.mean() / bank.scales["all"]], rtol=1e-4)
