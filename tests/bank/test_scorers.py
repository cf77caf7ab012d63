"""Scorers and normalisers against hand-computed values: density-normalised k-NN, SMOTE, pooling, fusion."""

import numpy as np
import pytest

from asd_ray.bank.domain_bank import DomainAwareBank
from asd_ray.bank.memory_bank import BankError, MemoryBank, smote
from asd_ray.bank.pooling import PooledBank, pool_clip
from asd_ray.detectors import FusionDetector, combine, configure_detector, load_detector, znormalise


def _line(*xs):
    return np.array([[x, 0.0] for x in xs], np.float32)


def test_density_normalised_knn_by_hand():
    bank = MemoryBank(k=1, density=True).fit(_line(0, 1, 10))
    # radii (1-NN distance of each member to the others): 1, 1, 9
    np.testing.assert_allclose(bank.radii(), [1, 1, 9])
    # query 5: distances 5, 4, 5 -> ratios 5, 4, 0.556: the lonely member at 10 is the nearest in its own units
    assert bank.score(_line(5)) == pytest.approx([5 / 9])
    assert MemoryBank(k=1).fit(_line(0, 1, 10)).score(_line(5)) == pytest.approx([4.0])
    # leave-one-out: 0 -> min(1/1, 10/9); 1 -> min(1/1, 9/9); 10 -> min(10/1, 9/1)
    np.testing.assert_allclose(bank.loo_scores(), [1.0, 1.0, 9.0])


def test_density_k2_averages_the_two_smallest_ratios():
    bank = MemoryBank(k=2, density=True).fit(_line(0, 1, 3))
    # radii with k=2: 0 -> (1+3)/2 = 2; 1 -> (1+2)/2 = 1.5; 3 -> (2+3)/2 = 2.5
    np.testing.assert_allclose(bank.radii(), [2, 1.5, 2.5])
    # query 2: distances 2, 1, 1 -> ratios 1, 0.667, 0.4 -> mean of the two smallest
    assert bank.score(_line(2)) == pytest.approx([(0.4 + 1 / 1.5) / 2])


def test_domain_aware_scales_by_hand():
    x = _line(0, 2, 10, 11)
    bank = DomainAwareBank(k=1).fit(x, domains=["source", "source", "target", "target"])
    assert bank.scales == {"source": 2.0, "target": 1.0}  # median leave-one-out 1-NN distance per domain
    assert bank.score(_line(13)) == pytest.approx([min(11 / 2, 2 / 1)])


def test_smote_keeps_the_originals_and_interpolates_between_neighbours():
    t = np.array([[0, 0], [2, 0], [2, 2]], np.float32)
    out = smote(t, 20, neighbours=1, seed=0)
    assert out.shape == (20, 2) and np.array_equal(out[:3], t)
    # with 1 neighbour: 0 <-> (2,0) and (2,2) <-> (2,0): every new point lies on one of those two segments
    new = out[3:]
    on_bottom = (np.abs(new[:, 1]) < 1e-6) & (new[:, 0] >= 0) & (new[:, 0] <= 2)
    on_right = (np.abs(new[:, 0] - 2) < 1e-6) & (new[:, 1] >= 0) & (new[:, 1] <= 2)
    assert (on_bottom | on_right).all()
    assert smote(t, 2).shape == (3, 2)  # never fewer than given


def test_oversampled_bank_grows_its_target_members():
    x = np.concatenate([_line(0, 1, 2, 3), _line(10, 12)])
    domains = ["source"] * 4 + ["target"] * 2
    bank = DomainAwareBank(k=1, oversample_target=6).fit(x, [f"c{i}" for i in range(6)], domains=domains)
    assert bank.banks["target"].size == 6 and bank.banks["source"].size == 4
    assert sum(i.startswith("smote-") for i in bank.loo_ids()) == 4


def test_pooling_by_hand():
    frames = np.array([[0.0, 20.0], [10.0, 20.0]])  # two frames, two bands (dB)
    np.testing.assert_allclose(pool_clip(frames, "mean"), [5, 20])
    np.testing.assert_allclose(pool_clip(frames, "mean_std"), [5, 20, 5, 0])
    # p = 1: the mean power in dB, 10 log10((1 + 10) / 2); a constant band stays itself
    np.testing.assert_allclose(pool_clip(frames, "gem", p=1.0), [10 * np.log10(5.5), 20], rtol=1e-6)
    # large p tends to the maximum
    assert pool_clip(frames, "gem", p=200.0)[0] == pytest.approx(10.0, abs=0.02)
    # relative deviation of the power: std(1, 10) / mean(1, 10) = 4.5 / 5.5; a constant band: 0
    np.testing.assert_allclose(pool_clip(frames, "reldev"), [5, 20, 4.5 / 5.5, 0], rtol=1e-6)


def test_pooled_bank_save_load(tmp_path):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((20, 5)).astype(np.float32) for _ in range(8)]
    bank = PooledBank(pooling="gem", gem_p=2.0, strategy="domain_aware", k=2).fit(
        clips, domains=["source"] * 6 + ["target"] * 2)
    loaded = load_detector(bank.save(tmp_path / "pooled"))
    assert loaded.dim == 5 and loaded.pooling == "gem"
    np.testing.assert_array_equal(loaded.score(clips[:3]), bank.score(clips[:3]))


def _beats(onsets, frames=160, bands=8, level=20.0):
    """dB frames of a machine whose events (one frame each, every band) come at ``onsets``, over a floor of 0 dB."""
    x = np.zeros((frames, bands))
    x[np.asarray(onsets)] = level
    return x


def test_rhythm_pooling_sees_when_events_come_not_what_they_sound_like():
    from asd_ray.bank.pooling import RHYTHM_GROUPS, RHYTHM_LAGS, rhythm_features

    regular = rhythm_features(_beats(np.arange(0, 160, 16)))
    assert regular.shape == (2 * RHYTHM_GROUPS * RHYTHM_LAGS,)
    onset = regular[:RHYTHM_LAGS]  # the first band group's onset autocorrelation: peaks at the period and its multiples
    assert {15, 31, 47} <= set(np.argsort(onset)[-3:]) and onset[15] > 0.8
    # the same events at irregular times: the same spectrum (mean and std of every band), another rhythm
    irregular = _beats(np.sort(np.random.default_rng(0).choice(160, 10, replace=False)))
    np.testing.assert_allclose(pool_clip(irregular, "mean_std"), pool_clip(_beats(np.arange(0, 160, 16)), "mean_std"))
    assert rhythm_features(irregular)[15] < 0.5
    # a pattern of four events with gaps 2, 4, 6, 12 against 2, 6, 4, 12 (not the first reversed, which an
    # autocorrelation cannot tell): the same spectrum, another autocorrelation
    a = _beats(np.concatenate([[c, c + 2, c + 6, c + 12] for c in range(0, 140, 24)]))
    b = _beats(np.concatenate([[c, c + 2, c + 8, c + 12] for c in range(0, 140, 24)]))
    np.testing.assert_allclose(pool_clip(a, "mean_std"), pool_clip(b, "mean_std"))
    assert np.abs(rhythm_features(a) - rhythm_features(b)).max() > 0.2  # lag 6 (two gaps of 6 in a) against 8
    # any band count, one length; a constant clip and a clip shorter than the lags give zeros where undefined
    assert rhythm_features(np.zeros((5, 64))).tolist() == [0.0] * len(regular)
    with pytest.raises(ValueError, match="too few"):
        rhythm_features(np.zeros((20, 3)))


def test_rhythm_bank_scores_an_irregular_machine_above_regular_ones_and_saves(tmp_path):
    from asd_ray.config import RunConfig
    from asd_ray.detectors import make_detector

    rng = np.random.default_rng(1)

    def regular():  # a beat every 16 frames from a random start, each a frame early or late at times
        onsets = np.arange(rng.integers(0, 16), 160, 16)
        return _beats(np.clip(onsets + rng.integers(-1, 2, len(onsets)), 0, 159))

    train = [regular() + rng.normal(0, 0.5, (160, 8)) for _ in range(12)]
    bank = make_detector(RunConfig(), "rhythm").fit(train, domains=["source"] * 12)
    odd = _beats(np.sort(rng.choice(160, 10, replace=False))) + rng.normal(0, 0.5, (160, 8))
    scores = bank.score([regular() + rng.normal(0, 0.5, (160, 8)), odd])
    assert scores[1] > scores[0] and bank.dim is None and "any band count" in bank.eats()
    loaded = load_detector(bank.save(tmp_path / "rhythm"))
    assert loaded.pooling == "rhythm"
    np.testing.assert_array_equal(loaded.score(train[:3]), bank.score(train[:3]))


def test_znormalise_and_combine_by_hand():
    np.testing.assert_allclose(znormalise([3.0, 5.0], [1.0, 3.0]), [1.0, 3.0])  # mean 2, std 1
    np.testing.assert_allclose(znormalise([3.0], [2.0, 2.0]), [1.0])  # zero spread counts as 1
    z = np.array([[1.0, -1.0], [3.0, 0.0]])
    assert combine(z, "min").tolist() == [1.0, -1.0]
    assert combine(z, "mean").tolist() == [2.0, -0.5]
    assert combine(z, "max").tolist() == [3.0, 0.0]


def test_fusion_of_two_banks_by_hand(tmp_path):
    x = _line(0, 1, 3)
    a, b = MemoryBank(k=1), MemoryBank(k=1, density=True)
    fusion = FusionDetector([a, b], combine="mean").fit(x, ["p", "q", "r"])
    # a's loo: 1, 1, 2. b's radii 1, 1, 2 and loo: 0 -> min(1/1, 3/2); 1 -> min(1/1, 2/2); 3 -> min(3/1, 2/1)
    np.testing.assert_allclose(b.loo_scores(), [1, 1, 2])
    q = _line(5)
    za = (2.0 - 4 / 3) / np.std([1, 1, 2])  # a: nearest member 3, distance 2
    zb = (1.0 - 4 / 3) / np.std([1, 1, 2])  # b: ratios 5/1, 4/1, 2/2 -> 1
    assert fusion.score(q) == pytest.approx([(za + zb) / 2])
    assert fusion.loo_ids() == ["p", "q", "r"] and fusion.loo_scores().shape == (3,)
    loaded = load_detector(fusion.save(tmp_path / "fusion"))
    np.testing.assert_array_equal(loaded.score(q), fusion.score(q))


def test_fusion_refuses_members_of_different_features():
    from asd_ray.bank.local_bank import LocalFeatureBank
    from asd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="same features"):
        FusionDetector([MemoryBank(), LocalFeatureBank()])


def test_configure_equals_fitting_with_the_setting(tmp_path):
    """A saved bank given another k or metric at score time scores exactly as one fitted with them."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    domains = ["source"] * 50 + ["target"] * 10
    q = rng.standard_normal((7, 8)).astype(np.float32)
    for cls, kw in ((MemoryBank, {}), (MemoryBank, {"density": True}), (DomainAwareBank, {"density": True})):
        saved = load_detector(cls(k=3, **kw).fit(x, domains=domains).save(tmp_path / cls.kind))
        for setting in ({"k": 5}, {"metric": "cosine"}, {"k": 2, "metric": "cosine"}):
            fitted = cls(**{"k": 3, **kw, **setting}).fit(x, domains=domains)
            configured = load_detector(tmp_path / cls.kind).configure(**setting)
            np.testing.assert_allclose(configured.score(q), fitted.score(q), rtol=1e-6)
            np.testing.assert_allclose(configured.loo_scores(), fitted.loo_scores(), rtol=1e-6)
        assert saved.score_settings() == {"k": 3, "metric": "euclidean"}
    with pytest.raises(BankError, match="cannot score euclidean"):
        MemoryBank(metric="cosine").fit(x).configure(metric="euclidean")


def test_configure_detector_reports_where_each_setting_came_from(tmp_path):
    rng = np.random.default_rng(4)
    clips = [rng.standard_normal((20, 5)).astype(np.float32) for _ in range(12)]
    fusion = FusionDetector([PooledBank(k=1), PooledBank(pooling="mean", k=1)], combine="max").fit(clips)
    loaded = load_detector(fusion.save(tmp_path / "fusion"))
    used = configure_detector(loaded, {"pooled.k": 3, "bank.k": 7})
    assert used == {"member_0.pooled.k": (3, "config"), "member_0.bank.metric": ("euclidean", "saved bank"),
                    "member_1.pooled.k": (3, "config"), "member_1.bank.metric": ("euclidean", "saved bank"),
                    "fusion.combine": ("max", "saved bank")}  # bank.k is the knn bank's: no member takes it
    refit = FusionDetector([PooledBank(k=3), PooledBank(pooling="mean", k=3)], combine="max").fit(clips)
    np.testing.assert_allclose(loaded.score(clips[:4]), refit.score(clips[:4]), rtol=1e-6)


def test_the_default_fusion_saves_and_loads_with_its_rhythm_member_and_refuses_a_member_of_other_bands(tmp_path):
    """The rhythm member takes any band count (its dim is None): a saved default fusion loads beside members of
    128 bands and scores the same; a member fitted on other bands is refused, naming it."""
    from asd_ray.config import RunConfig, load_config
    from asd_ray.detectors import make_detector
    from asd_ray.errors import BankFolderError

    rng = np.random.default_rng(4)
    clips = [_beats(np.arange(rng.integers(0, 16), 160, 16), bands=128) + rng.normal(0, 0.5, (160, 128))
             for _ in range(10)]
    fusion = make_detector(RunConfig()).fit(clips[:8], [f"c{i}" for i in range(8)], domains=["source"] * 8)
    assert [m.dim for m in fusion.members] == [128, 128, None] and fusion.dim == 128
    loaded = load_detector(fusion.save(tmp_path / "fusion"))
    assert loaded.dim == 128
    np.testing.assert_array_equal(loaded.score(clips[8:]), fusion.score(clips[8:]))
    other = make_detector(RunConfig(), "pooled").fit([c[:, :64] for c in clips[:8]], domains=["source"] * 8)
    other.save(tmp_path / "fusion" / "member_1")
    with pytest.raises(BankFolderError, match="member_1/bank.json.*64-band log-mel frames but member_0 eats 128"):
        load_detector(tmp_path / "fusion")
    # the rhythm bank first: the others are still checked against each other
    first = make_detector(load_config(RunConfig, None, ["fusion.members=[rhythm, pooled, local]"]))
    first.fit(clips[:8], [f"c{i}" for i in range(8)], domains=["source"] * 8).save(tmp_path / "first")
    assert load_detector(tmp_path / "first").dim == 128
    other.save(tmp_path / "first" / "member_1")
    with pytest.raises(BankFolderError, match="member_2/bank.json.*128-band log-mel frames but member_1 eats 64"):
        load_detector(tmp_path / "first")
