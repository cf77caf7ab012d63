"""The supplemental noise profile: hand-computed profile, offset and subtraction; the wrapper detector."""

import numpy as np
import pytest

from asd_ray.bank.noise import noise_offset, noise_profile, subtract_noise
from asd_ray.bank.pooling import PooledBank
from asd_ray.config import RunConfig, load_config
from asd_ray.data.layout import ClipRecord
from asd_ray.detect import machine_splits, plan_records, uses_noise
from asd_ray.detectors import NoiseRemovedDetector, load_detector, make_detector


def test_profile_is_the_mean_power_over_every_frame_in_db():
    a = np.array([[0.0, 10.0]])
    b = np.array([[10.0, 10.0], [0.0, 10.0]])
    # band 0: powers 1, 10, 1 -> mean 4; band 1: 10, 10, 10
    np.testing.assert_allclose(noise_profile([a, b]), [10 * np.log10(4.0), 10.0])
    with pytest.raises(ValueError):
        noise_profile([])


def test_offset_is_a_quantile_over_bands_of_each_bands_floor_minus_the_profile():
    x = np.array([[3.0, 9.0, 1.0], [4.0, 5.0, 2.0], [8.0, 7.0, 6.0]])
    profile = np.array([1.0, 0.0, -1.0])
    # per band minimum over time: 3, 5, 1; minus the profile: 2, 5, 2
    assert noise_offset(x, profile, time_quantile=0.0, band_quantile=0.0) == 2.0
    assert noise_offset(x, profile, time_quantile=0.0, band_quantile=1.0) == 5.0
    # per band maximum: 8, 9, 6 -> 7, 9, 7; the median over bands
    assert noise_offset(x, profile, time_quantile=1.0, band_quantile=0.5) == 7.0


def test_subtraction_in_power_with_a_floor_by_hand():
    x = np.array([[10.0, 3.0]])
    out = subtract_noise(x, np.zeros(2), floor_db=-10.0, time_quantile=0.0, band_quantile=0.0)
    # offset 3 dB: noise power 10^0.3 in both bands; band 0: 10 - 10^0.3; band 1 would be 0, floored at 0.1 x power
    np.testing.assert_allclose(out, [[10 * np.log10(10 - 10 ** 0.3), -7.0]], rtol=1e-6)
    assert out.dtype == np.float32


def _clips(rng, n, level=0.0):
    return [(level + rng.normal(0, 3, (30, 8))).astype(np.float32) for _ in range(n)]


def test_wrapper_without_noise_clips_is_its_inner_detector_and_with_them_sees_cleaned_frames(tmp_path):
    rng = np.random.default_rng(0)
    train, test, noise = _clips(rng, 6), _clips(rng, 3, 2.0), _clips(rng, 2, -3.0)
    kw = {"strategy": "seed", "k": 1}
    plain = PooledBank(**kw).fit(train).score(test)
    none = NoiseRemovedDetector(PooledBank(**kw)).fit(train, noise=[])
    assert none.profile is None
    np.testing.assert_allclose(none.score(test), plain)
    wrapped = NoiseRemovedDetector(PooledBank(**kw), floor_db=-6.0).fit(train, noise=noise)
    profile = noise_profile(noise)
    np.testing.assert_allclose(wrapped.profile, profile)
    clean = [subtract_noise(c, profile, floor_db=-6.0) for c in train]
    np.testing.assert_allclose(wrapped.score(test), PooledBank(**kw).fit(clean).score(
        [subtract_noise(c, profile, floor_db=-6.0) for c in test]))
    wrapped.save(tmp_path / "b")
    loaded = load_detector(tmp_path / "b")
    assert isinstance(loaded, NoiseRemovedDetector) and loaded.params == wrapped.params
    np.testing.assert_allclose(loaded.score(test), wrapped.score(test))
    np.testing.assert_allclose(loaded.loo_scores(), wrapped.loo_scores())


def test_the_config_key_wraps_frame_detectors_and_the_run_embeds_noise_clips():
    on = load_config(RunConfig, None, ["supplemental.noise_profile=true"])
    assert isinstance(make_detector(on), NoiseRemovedDetector) and uses_noise(on)
    assert not uses_noise(RunConfig())
    knn = load_config(RunConfig, None, ["supplemental.noise_profile=true", "detector=knn"])
    assert not uses_noise(knn)  # clip embeddings: the key applies to frame detectors only

    def rec(split, label="normal", kind=""):
        return ClipRecord(path=f"/x/{split}_{kind or label}.wav", machine="fan", section="00", domain="source",
                          split=split, label=label, index=0, kind=kind)

    records = [rec("train"), rec("train"), rec("test", "anomaly"), rec("supplemental", "noise", "noise"),
               rec("supplemental", "clean", "clean")]
    used, unused = plan_records(records)
    assert len(used) == 3 and len(unused) == 2
    used, unused = plan_records(records, noise=True)
    assert [r.kind for r in used] == ["", "", "", "noise"] and [u.path for u in unused] == ["/x/supplemental_clean.wav"]
    (split,) = machine_splits(used)
    assert split.train == [0, 1] and split.test == [2] and split.noise == [3]
