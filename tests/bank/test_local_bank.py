"""The local-feature bank and its coresets: hand-computed scores, the size bound, save/load."""

import json

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
    bank = LocalFeatureBank(domain_norm=True, domain_pick="min", **PLAIN).fit(
        clips, domains=["source", "source", "target", "target"])
    assert bank.scales == {"source": 2.0, "target": 1.0}
    # (10, 3): source sqrt(101) / 2 = 5.02, target 2 / 1 = 2; the smaller
    assert bank.score([np.array([[10, 3]], np.float32)]) == pytest.approx([2.0])


@pytest.mark.parametrize("pick, expected, target_clip", [("nearest", 3.0 - 1, np.sqrt(2) / 8 - 1),
                                                          ("min", np.hypot(1, 5) / 8, np.sqrt(2) / 8)])
def test_a_clip_is_scored_by_the_bank_nearest_its_bulk_not_by_a_bank_whose_own_clips_are_noisy(pick, expected,
                                                                                               target_clip):
    """The target room has clanks of its own (a far window in each target clip), so the target bank's scale is
    large (8) and any clip scores low against it: with ``min`` a source anomaly hides there; ``nearest`` scores
    it against the source bank, which the bulk of its windows is next to (median distance 0 against 5), in
    units of that bank's clips (scaled score less 1, over their spread: 1 here, every scaled LOO score is 1)."""
    source = [np.array([[0, 0], [0, 0]], np.float32), np.array([[0, 1], [0, 1]], np.float32)]  # LOO 1, 1: scale 1
    target = [np.array([[5, 0], [5, 0], [9, 9]], np.float32), np.array([[5, 1], [5, 1], [1, 9]], np.float32)]  # 8, 8
    bank = LocalFeatureBank(domain_norm=True, domain_pick=pick, **PLAIN).fit(
        source + target, domains=["source", "source", "target", "target"])
    assert bank.scales == {"source": 1.0, "target": 8.0} and bank.spreads == {"source": 1.0, "target": 1.0}
    anomaly = np.array([[0, 0], [0, 0], [0, 4]], np.float32)  # against source: 3 / 1; against target: sqrt(26) / 8
    # float32 distances from |x|^2 + |y|^2 - 2xy (faiss.pairwise_distances): ~1e-6 from the exact values, more or
    # less with FAISS's version (1.15.1: 1.9e-6 for the target clip)
    assert bank.score([anomaly]) == pytest.approx([expected], rel=1e-5)
    # a target clip with a clank elsewhere: the target bank in both (1.41 / 8 against 7.28 / 1)
    assert bank.score([np.array([[5, 0], [5, 1], [2, 8]], np.float32)]) == pytest.approx([target_clip], rel=1e-5)


def test_nearest_scores_are_in_units_of_the_spread_of_their_banks_own_clips():
    """A target room whose clips each carry a clank at a random place: its clips' scores vary far more than
    the source's; ``nearest`` gives each bank's clips in units of their own spread (IQR / 1.349 of the bank's
    clips' scaled leave-one-out scores)."""
    rng = np.random.default_rng(4)
    source = [rng.standard_normal((40, 3)).astype(np.float32) for _ in range(40)]
    target = []
    for _ in range(12):
        c = 20 + rng.standard_normal((40, 3))
        v = rng.standard_normal(3)
        c[:4] = 20 + rng.uniform(3, 12) * v / np.linalg.norm(v)  # the clank: 4 frames off the cluster
        target.append(c.astype(np.float32))
    train = source + target
    bank = LocalFeatureBank(context=1, pca_dim=0, standardise=False, clip_score="mean", bank_size=4096,
                            calibration_clips=0).fit(train, domains=["source"] * 40 + ["target"] * 12)
    assert bank.spreads["target"] > 2 * bank.spreads["source"]
    ratios = {g: np.array([bank._bank_score(g, bank.windows(c), leave_out=i)[0] / bank.scales[g]
                           for i, c in enumerate(train) if (i >= 40) == (g == "target")]) for g in bank.banks}
    for g, r in ratios.items():  # the spread is the IQR of the bank's own clips' scaled LOO scores / 1.349
        q1, q3 = np.percentile(r, [25, 75])
        assert bank.spreads[g] == pytest.approx((q3 - q1) / 1.349)
    loo = bank.loo_scores()
    np.testing.assert_allclose(loo[:40], (ratios["source"] - 1) / bank.spreads["source"], rtol=1e-6)
    np.testing.assert_allclose(loo[40:], (ratios["target"] - 1) / bank.spreads["target"], rtol=1e-6)


def test_a_bank_saved_before_domain_pick_existed_loads_and_scores_by_min(tmp_path):
    rng = np.random.default_rng(3)
    clips = [rng.standard_normal((20, 4)).astype(np.float32) + 3 * (i >= 6) for i in range(8)]
    bank = LocalFeatureBank(context=2, pca_dim=0, domain_pick="min").fit(clips, domains=["source"] * 6 + ["target"] * 2)
    folder = bank.save(tmp_path / "local")
    meta = json.loads((folder / "bank.json").read_text())
    del meta["domain_pick"], meta["spreads"]  # neither was saved then
    (folder / "bank.json").write_text(json.dumps(meta))
    loaded = load_detector(folder)
    assert loaded.params["domain_pick"] == "min"
    queries = [rng.standard_normal((20, 4)).astype(np.float32) for _ in range(3)]
    np.testing.assert_array_equal(loaded.score(queries), bank.score(queries))


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


@pytest.mark.parametrize("pick", ["nearest", "min"])
def test_leave_one_out_scores_equal_a_brute_force_search_over_the_other_clips_members(pick):
    rng = np.random.default_rng(5)
    clips = [rng.standard_normal((30, 6)).astype(np.float32) + i % 3 for i in range(10)]
    bank = LocalFeatureBank(context=2, bank_size=120, pca_dim=0, k=2, clip_score="topq", top_q=0.2,
                            calibration_clips=0, domain_norm=True, domain_pick=pick
                            ).fit(clips, domains=["source"] * 7 + ["target"] * 3)
    expected = []
    for i, clip in enumerate(clips):
        w = bank.windows(clip)
        per_bank = []
        for g, b in bank.banks.items():
            others = b.members()[bank.owners[g] != i]
            d = np.sort(np.sqrt(((w[:, None, :] - others[None, :, :]) ** 2).sum(-1)), axis=1)[:, :2].mean(axis=1)
            scaled = clip_score(d, "topq", 0.2) / bank.scales[g]
            per_bank.append((np.median(d), (scaled - 1) / bank.spreads[g], scaled))
        expected.append(min(per_bank)[1] if pick == "nearest" else min(s for _, _, s in per_bank))
    # float32 distances (FAISS's and numpy's, summed in other orders: 1e-7 relative); `nearest` subtracts 1 from
    # the scaled score, so near 0 the error is absolute (9e-7 at 0.087 with numpy 2.4.6)
    np.testing.assert_allclose(bank.loo_scores(), expected, rtol=1e-5, atol=1e-5)


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
