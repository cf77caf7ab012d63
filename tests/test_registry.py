"""The detector registry and the base-class API that replaced callers' isinstance / getattr / name checks."""

from __future__ import annotations

import numpy as np
import pytest

from asd_ray.bank.domain_bank import DomainAwareBank
from asd_ray.bank.memory_bank import BankError, MemoryBank
from asd_ray.bank.pooling import PooledBank
from asd_ray.config import ConfigError, RunConfig, load_config
from asd_ray.detect import fit_machine, frame_feature_kwargs, machine_result
from asd_ray.detectors import REGISTRY, FusionDetector, NoiseRemovedDetector, configure_detector, make_detector


def config(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, list(overrides))


@pytest.mark.parametrize("overrides, eats, frames, trains", [
    (["detector=knn"], "clip", 1, False),
    (["detector=pooled"], "frames", 1, False),
    (["detector=local", "local.context=7"], "frames", 7, False),
    (["detector=ae-mse", "ae.frames=3"], "frames", 3, True),
    (["detector=fusion"], "frames", 5, False),  # local (context 5) + pooled: no model, so no GPU asked
    (["detector=fusion", "fusion.members=[pooled,ae-maha]", "ae.frames=9"], "frames", 9, True),
])
def test_the_registry_answers_from_the_classes_without_building(overrides, eats, frames, trains):
    c = config(*overrides)
    assert (REGISTRY.features(c), REGISTRY.frames_needed(c), REGISTRY.trains_a_model(c)) == (eats, frames, trains)
    assert make_detector(c).features == eats


def test_a_fusion_of_mixed_features_or_of_itself_is_a_config_error():
    with pytest.raises(ConfigError, match="same features"):
        REGISTRY.features(config("detector=fusion", "fusion.members=[knn,local]"))
    with pytest.raises(ConfigError, match="cannot name fusion itself"):
        REGISTRY.reads(config("detector=fusion", "fusion.members=[fusion]"), "fusion")
    with pytest.raises(ConfigError, match="unknown detector"):
        make_detector(RunConfig(), "nope")


def test_the_frame_window_check_reads_the_stacking_of_every_fusion_member():
    ok = config("detector=fusion", "fusion.members=[pooled,ae-mse]", "ae.frames=5", "preprocess.min_seconds=0.2")
    frame_feature_kwargs(ok)
    with pytest.raises(ConfigError, match="stacks 40 frames"):
        frame_feature_kwargs(config("detector=fusion", "fusion.members=[pooled,ae-mse]", "ae.frames=40",
                                    "preprocess.min_seconds=0.2"))


def _clips(rng, n):
    return [rng.normal(0, 3, (30, 8)).astype(np.float32) for _ in range(n)]


def test_a_noise_removed_ae_reports_its_inner_training_curve():
    """The wrapper answers through the base API: the run's metrics get the AE's losses (getattr on the wrapper
    found none)."""
    c = config("detector=ae-mse", "ae.epochs=3", "ae.frames=2", "supplemental.noise_profile=true")
    detector = make_detector(c)
    assert type(detector) is NoiseRemovedDetector and detector.uses_noise
    rng = np.random.default_rng(0)
    fitted = fit_machine(detector, _clips(rng, 4), [f"c{i}" for i in range(4)], ["source"] * 4, _clips(rng, 2),
                         _clips(rng, 2))
    assert fitted.detector.profile is not None  # the noise clips were taken
    assert len(fitted.detector.losses) == 3 and list(fitted.detector.losses) == list(detector.inner.losses)

    class Split:
        machine, section, test = "fan", "00", [0, 1]

    class Rec:
        filename = "x.wav"

    result = machine_result(Split, [Rec(), Rec()], fitted, c.post)
    assert result.train_losses == list(detector.inner.losses)


def test_added_normals_and_clip_members_through_the_base_api():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    bank = MemoryBank(k=1).fit(x, [f"m{i}" for i in range(8)])
    assert bank.add_normals(x[:2] + 1, ["m0", "new"]) == 1 and bank.size == 9  # a known id is skipped
    assert bank.clip_members().shape == (9, 4)
    aware = DomainAwareBank(k=1).fit(x, [f"m{i}" for i in range(8)], domains=["source"] * 4 + ["target"] * 4)
    assert aware.add_normals(x[:2], ["m4", "m0"], domain="target") == 1  # m0 is a source member: new to target
    pooled = PooledBank(strategy="seed", k=1).fit(_clips(rng, 4))
    fusion = FusionDetector([MemoryBank(k=1), MemoryBank(k=2)]).fit(x)
    for other in (pooled, fusion):
        assert not other.takes_normals
        with pytest.raises(BankError, match="takes no added normals"):
            other.add_normals(x[:1], ["a"])
        with pytest.raises(BankError, match="keeps no clip embeddings"):
            other.clip_members()


def test_score_time_settings_reach_the_detectors_inside_wrappers():
    rng = np.random.default_rng(2)
    inner = PooledBank(strategy="seed", k=1).fit(_clips(rng, 5))
    wrapped = NoiseRemovedDetector(inner)
    assert configure_detector(wrapped, {"pooled.k": 2}) == {"pooled.k": (2, "config"),
                                                            "bank.metric": ("euclidean", "saved bank")}
    assert inner.score_settings()["k"] == 2
    fusion = FusionDetector([PooledBank(strategy="seed", k=1).fit(_clips(rng, 5))], combine="max")
    got = configure_detector(fusion, {"fusion.combine": "mean"})
    assert got["fusion.combine"] == ("mean", "config") and got["member_0.pooled.k"] == (1, "saved bank")


def test_the_default_fusion_takes_the_rhythm_bank_over_log_mel_frames_only(tiny_beats):
    """fusion.members left empty: local, pooled and rhythm over log-mel frames, local and pooled over a backbone's
    frames (rhythm reads log-mel band levels; a run with the default detector and --backbone must work); members
    that are named are used as named."""
    def kinds(det):
        return [m.kind if m.kind != "PooledBank" else f"PooledBank:{m.pooling}" for m in det.members]

    default = make_detector(config())
    assert isinstance(default, FusionDetector) and default.combine == "mean"
    assert kinds(default) == ["LocalFeatureBank", "PooledBank:mean_std", "PooledBank:rhythm"]
    assert REGISTRY.needs_log_mel(config())
    over_beats = config(f"embed.backbone={tiny_beats}")
    assert kinds(make_detector(over_beats)) == ["LocalFeatureBank", "PooledBank:mean_std"]
    assert not REGISTRY.needs_log_mel(over_beats)
    frame_feature_kwargs(over_beats)  # no "pools the rhythm of log-mel bands" refusal
    named = make_detector(config("fusion.members=[pooled, local]", "fusion.combine=max"))
    assert kinds(named) == ["PooledBank:mean_std", "LocalFeatureBank"] and named.combine == "max"
