"""MemoryBank and DomainAwareBank: hand-checked distances, options, persistence, errors."""

import numpy as np
import pytest

from asd_ray.bank.domain_bank import DomainAwareBank, build_bank
from asd_ray.bank.memory_bank import BankError, MemoryBank
from asd_ray.detectors import load_detector

TOY = np.array([[0, 0], [3, 0], [0, 4], [10, 10]], dtype=np.float32)


def test_hand_checked_knn_distances_are_true_not_squared():
    bank = MemoryBank(k=2).fit(TOY)
    # query (0,0): distances 0, 3, 4 -> mean of 2 smallest = 1.5
    # query (3,4): distances 5, 4, 3 -> mean(3, 4) = 3.5
    np.testing.assert_allclose(bank.score(np.array([[0, 0], [3, 4]])), [1.5, 3.5], rtol=1e-6)
    np.testing.assert_allclose(MemoryBank(k=1).fit(TOY).score(np.array([[6, 8]])), [np.hypot(4, 2)], rtol=1e-6)


def test_k_larger_than_bank_uses_all_members():
    bank = MemoryBank(k=10).fit(TOY[:2])
    np.testing.assert_allclose(bank.score(np.array([[0, 0]])), [1.5], rtol=1e-6)


def test_cosine_distance():
    bank = MemoryBank(k=1, metric="cosine").fit(np.array([[1, 0], [0, 1]], dtype=np.float32))
    np.testing.assert_allclose(bank.score(np.array([[1, 1], [2, 0], [-1, 0]])),
                               [1 - np.sqrt(0.5), 0.0, 1.0], atol=1e-6)


def test_add_appends_members_and_changes_scores():
    bank = MemoryBank(k=1).fit(TOY[:2])
    q = np.array([[10, 10]])
    before = bank.score(q)[0]
    bank.add(np.array([[10, 9]]), ids=["new"])
    assert bank.size == 3 and bank.ids[-1] == "new"
    after = bank.score(q)[0]
    assert after == pytest.approx(1.0) and after < before


def test_leave_one_out_excludes_self():
    bank = MemoryBank(k=1).fit(TOY)
    np.testing.assert_allclose(bank.loo_scores(), [3, 3, 4, np.hypot(10, 6)], rtol=1e-6)


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((50, 16)), rng.standard_normal((7, 16))
    for metric in ("euclidean", "cosine"):
        bank = MemoryBank(k=3, metric=metric).fit(x, ids=[f"c{i}" for i in range(50)])
        loaded = load_detector(bank.save(tmp_path / metric))
        assert isinstance(loaded, MemoryBank) and loaded.ids == bank.ids and loaded.metric == metric
        assert np.array_equal(loaded.score(q), bank.score(q))
    assert not list(tmp_path.rglob("*.pkl"))


def test_errors_are_clear(tmp_path):
    with pytest.raises(BankError, match="empty"):
        MemoryBank().score(np.zeros((1, 2)))
    with pytest.raises(BankError, match="dimension 3 does not match the bank's 2"):
        MemoryBank().fit(TOY).score(np.zeros((1, 3)))
    with pytest.raises(BankError, match="NaN"):
        MemoryBank().fit(TOY).score(np.array([[np.nan, 0]]))
    with pytest.raises(BankError, match="metric"):
        MemoryBank(metric="manhattan")
    with pytest.raises(BankError, match="bank.json: missing"):
        load_detector(tmp_path)


def test_domain_aware_scales_each_domain_and_takes_the_minimum(tmp_path):
    rng = np.random.default_rng(1)
    source = rng.normal(0, 1.0, (200, 4))
    target = rng.normal(20, 0.1, (10, 4))  # a tight, far-away target cluster
    x = np.vstack([source, target])
    domains = ["source"] * 200 + ["target"] * 10
    seed = build_bank(x, [str(i) for i in range(210)], domains, strategy="seed", k=3)
    aware = build_bank(x, [str(i) for i in range(210)], domains, strategy="domain_aware", k=3)
    assert isinstance(aware, DomainAwareBank) and aware.size == 210
    assert aware.scales["target"] < aware.scales["source"]
    q = np.vstack([rng.normal(0, 1.0, (5, 4)), rng.normal(20, 0.1, (5, 4))])
    expected = np.minimum(aware.banks["source"].score(q) / aware.scales["source"],
                          aware.banks["target"].score(q) / aware.scales["target"])
    np.testing.assert_allclose(aware.score(q), expected)
    # A target-domain anomaly (off the tight cluster by 1.0) stands out more than under the seed bank.
    anomaly, normal = np.full((1, 4), 20.5), rng.normal(20, 0.1, (1, 4))
    ratio_seed = seed.score(anomaly)[0] / seed.score(normal)[0]
    ratio_aware = aware.score(anomaly)[0] / aware.score(normal)[0]
    assert ratio_aware >= ratio_seed
    assert len(aware.loo_scores()) == 210
    loaded = load_detector(aware.save(tmp_path / "aware"))
    assert np.array_equal(loaded.score(q), aware.score(q))
