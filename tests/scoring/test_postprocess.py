"""Post-processing on fixed arrays and the gamma threshold on a known distribution."""

import numpy as np
import pytest
import scipy.stats

from asd_ray.scoring.postprocess import (StreamPostprocessor, calibrate, decide, gamma_threshold, median_filter,
                                         minmax_scale, postprocess)


def test_minmax():
    assert minmax_scale(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert minmax_scale(np.array([5.0, 5.0])).tolist() == [0.0, 0.0]
    assert minmax_scale(np.array([1.0, 3.0]), lo=0.0, hi=2.0).tolist() == [0.5, 1.5]


def test_median_filter_window_3():
    x = np.array([1.0, 9.0, 2.0, 3.0, 8.0, 4.0])
    assert median_filter(x, 3).tolist() == [1.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    assert median_filter(x, 1).tolist() == x.tolist()
    with pytest.raises(ValueError):
        median_filter(x, 2)


def test_gamma_threshold_recovers_the_90th_percentile():
    true = scipy.stats.gamma(a=4.0, loc=0.0, scale=0.5)
    samples = true.rvs(size=20_000, random_state=np.random.default_rng(1))
    assert gamma_threshold(samples, 0.9) == pytest.approx(true.ppf(0.9), rel=0.02)
    with pytest.raises(ValueError):
        gamma_threshold(np.ones(10))


def test_batch_postprocess_is_the_streams_on_the_banks_calibration():
    """The batch run's scores and decisions are what a stream (window 1) gives each clip, to the last bit."""
    train = scipy.stats.gamma(a=3.0, scale=1.0).rvs(size=500, random_state=np.random.default_rng(2))
    raw = np.array([0.5, 1.0, 12.0, 1.5, 20.0, 2.0])
    cal = calibrate(train)
    scores, decisions, thr = postprocess(raw, cal, minmax=True)
    assert decisions.tolist() == decide(raw, gamma_threshold(train)).tolist() == [0, 0, 1, 0, 1, 0]
    assert ((scores > thr) == decisions.astype(bool)).all()
    assert scores.tolist() == ((raw - train.min()) / (train.max() - train.min())).tolist()  # the train range
    stream = StreamPostprocessor(cal, minmax=True)
    assert [stream.push(r) for r in raw] == list(zip(scores.tolist(), decisions.tolist()))
    assert thr == stream.threshold
    raw_scores, _, raw_thr = postprocess(raw, cal, minmax=False)
    assert raw_scores.tolist() == raw.tolist() and raw_thr == cal.threshold


def test_stream_postprocessor_is_a_causal_median_on_the_calibration_scale():
    from asd_ray.scoring.postprocess import Calibration, StreamPostprocessor, calibrate

    cal = Calibration(lo=1.0, hi=3.0, threshold=2.5)
    stream = StreamPostprocessor(cal, median_window=3)
    out = [stream.push(r) for r in (1.0, 5.0, 2.0, 9.0, 9.0)]
    # medians of [1], [1,5], [1,5,2], [5,2,9], [2,9,9]: no look-ahead
    assert [s for s, _ in out] == [0.0, 1.0, 0.5, 2.0, 4.0]
    assert [d for _, d in out] == [0, 1, 0, 1, 1]
    raw = StreamPostprocessor(cal, minmax=False)
    assert raw.push(7.0) == (7.0, 1)
    train = np.random.default_rng(0).gamma(4.0, 1.0, 500)
    c = calibrate(train, 0.9)
    assert (c.lo, c.hi) == (train.min(), train.max()) and np.mean(train > c.threshold) == pytest.approx(0.1, abs=0.03)
