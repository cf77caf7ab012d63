"""Per-band memory banks (detector=bands): band groups, a narrow-band anomaly the whole-spectrum bank dilutes,
storage, score-time settings, bad input."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from asd_ray.bank.pooling import PooledBank
from asd_ray.config import RunConfig, load_config
from asd_ray.detectors import REGISTRY, configure_detector, load_detector
from asd_ray.detectors.sub_bands import BandSlice, SubBandDetector, band_groups
from asd_ray.errors import BankError, BankFolderError


def test_band_groups_cover_the_bands_in_equal_contiguous_ranges():
    assert band_groups(128, 4) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert band_groups(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert band_groups(5, 1) == [(0, 5)]
    with pytest.raises(BankError, match="6 band groups of 5 bands"):
        band_groups(5, 6)


def _clips(rng, n, anomalous=False):
    """(T x 64) dB clips: the low 48 bands swing widely from clip to clip (a machine's changing load), the high 16
    hold still; an anomaly is +4 dB in 4 of the high bands (a narrow whine), as in the top band group only."""
    out = []
    for _ in range(n):
        level = np.concatenate([rng.normal(0, 6, 48), rng.normal(0, 0.5, 16)])
        clip = level + rng.normal(0, 1.0, (40, 64))
        if anomalous:
            clip[:, 54:58] += 4.0
        out.append(clip.astype(np.float32))
    return out


def test_a_narrow_band_anomaly_stands_out_in_its_band_group_not_in_the_whole_spectrum():
    rng = np.random.default_rng(0)
    train, normal, anomalous = _clips(rng, 60), _clips(rng, 30), _clips(rng, 30, anomalous=True)
    labels = [0] * 30 + [1] * 30
    auc = {}
    for name, det in (("pooled", PooledBank(k=1)),
                      ("bands", SubBandDetector([BandSlice(PooledBank(k=1), group=i, groups=4) for i in range(4)]))):
        det.fit(train, [f"t{i}" for i in range(60)])
        auc[name] = roc_auc_score(labels, det.score(normal + anomalous))
    assert auc["bands"] >= 0.95 and auc["bands"] >= auc["pooled"] + 0.15, auc  # measured: 1.0 against 0.63


def test_a_bands_detector_from_the_config_saves_loads_and_takes_its_combine_at_score_time(tmp_path):
    rng = np.random.default_rng(1)
    train, test = _clips(rng, 20), _clips(rng, 6) + _clips(rng, 4, anomalous=True)
    config = load_config(RunConfig, None, ["detector=bands", "bands.groups=3", "pooled.k=2"])
    det = REGISTRY.make(config).fit(train, [f"t{i}" for i in range(20)])
    assert [m.bands for m in det.members] == [(0, 21), (21, 43), (43, 64)] and det.dim == 64
    assert [m.inner.score_settings()["k"] for m in det.members] == [2, 2, 2]  # each group's bank: the pooled settings
    assert REGISTRY.needs_log_mel(config) and "pooled" in REGISTRY.reads(config, "bands")
    saved = load_detector(det.save(tmp_path / "b"))
    np.testing.assert_allclose(saved.score(test), det.score(test), rtol=1e-6)
    np.testing.assert_allclose(saved.loo_scores(), det.loo_scores(), rtol=1e-6)
    used = configure_detector(saved, {"bands.combine": "mean"})
    assert used["bands.combine"] == ("mean", "config") and used["band_0.pooled.k"] == (2, "saved bank")
    assert not np.allclose(saved.score(test), det.score(test))
    with pytest.raises(BankError, match=r"clips of \[32\] bands for a bank of 64-band clips"):
        det.score([c[:, :32] for c in test])
    meta = tmp_path / "b" / "member_1" / "bank.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "group": 3}))
    with pytest.raises(BankFolderError, match="member_1.*band group 3 of 3"):
        load_detector(tmp_path / "b")


def test_memory_bytes_is_every_stored_vector_of_a_detector_and_its_parts():
    """What a bank actor holds (benchmarks/detector_cost.py reads it): a clip bank its members, a pooled bank its
    bank's, a fusion or a bands detector the sum over their parts; unfitted, nothing."""
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((40, 16)).astype(np.float32) for _ in range(12)]
    config = load_config(RunConfig, None, ["local.bank_size=50", "local.pca_dim=8", "bands.groups=2"])
    pooled = REGISTRY.make(config, "pooled")
    assert pooled.memory_bytes == 0
    pooled.fit(clips)
    assert pooled.memory_bytes == pooled.bank.members().nbytes == 12 * 32 * 4  # mean and std of 16 bands
    fusion = REGISTRY.make(config, "fusion").fit(clips)
    assert fusion.memory_bytes == sum(m.memory_bytes for m in fusion.members) > pooled.memory_bytes
    bands = REGISTRY.make(config, "bands").fit(clips)
    assert bands.memory_bytes == sum(p.memory_bytes for _, p in bands.parts()) > 0
