"""BEATs (models/beats.py) equals the reference implementation (microsoft/unilm beats/) on the fixtures it made
(tests/fixtures/beats, benchmarks/make_beats_fixtures.py): the checkpoints loaded here are written in the official
format from the fixtures' seeds. Mixed-length batches embed as each clip alone; bad files are one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asd_ray.cli import main
from asd_ray.models import beats
from asd_ray.models.backbones import BackboneError, load_backbone
from asd_ray.models.encoders import check_finetunable
from asd_ray.models.hub import check_available
from tiny import WritesAMarker

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "beats"


def fixture(name: str):
    return np.load(FIXTURES / f"{name}.npz")


def clips() -> list[np.ndarray]:
    f = fixture("clips")
    return [c.astype(np.float32) / 32768 for c in np.split(f["pcm"], np.cumsum(f["lengths"])[:-1])]


def checkpoint(tmp_path, name: str, cfg_key: str = "cfg", **extra) -> Path:
    f = fixture(name)
    return beats.write_random_checkpoint(tmp_path / f"{name}-{cfg_key}.pt", json.loads(str(f[cfg_key])),
                                         int(f["seed"]), **extra)


def open_fp32(path, **kwargs):
    return load_backbone(str(path), device="cpu", precision="fp32", **kwargs)


def close(got, ref, rtol=1e-4):
    """Equal within ``rtol`` of each value, or of the largest value (for values near zero)."""
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def hidden(backbone, clip: np.ndarray) -> np.ndarray:
    """Every hidden state's tokens of one clip alone: (layers + 1) x N x D."""
    states, _ = backbone.tokens(torch.from_numpy(clip)[None], torch.tensor([len(clip)]))
    return np.stack([s[0].float().numpy() for s in states])


def test_front_end_equals_the_references_fbank():
    close(beats.fbank(torch.from_numpy(clips()[0])).numpy(), fixture("tiny")["fbank_0"])


@pytest.mark.parametrize("name", ["tiny", "prenorm"])
def test_every_hidden_state_equals_the_reference(tmp_path, name):
    backbone = open_fp32(checkpoint(tmp_path, name))
    for i, clip in enumerate(clips()):
        close(hidden(backbone, clip), fixture(name)[f"tokens_{i}"])


def test_a_fine_tuned_checkpoint_loads_strictly_and_its_classifier_is_not_used(tmp_path):
    path = checkpoint(tmp_path, "tiny", "cfg_finetuned", label_dict={0: "/m/0"})
    backbone = open_fp32(path)
    assert backbone.model.predictor is not None  # its weights were in the state dict, loaded with strict=True
    for i, clip in enumerate(clips()):
        close(hidden(backbone, clip)[-1], fixture("tiny")[f"finetuned_last_{i}"])


def test_official_iter3_configuration_embeds_as_the_reference(tmp_path):
    """The Done-when check: the official BEATs_iter3 architecture with the fixtures' random weights, through
    ``load_backbone(path, pooling="mean")``, gives the reference's tokens pooled the same way."""
    ref = fixture("iter3")
    backbone = load_backbone(str(checkpoint(tmp_path, "iter3")), pooling="mean", device="cpu", precision="fp32")
    got = backbone.embed(clips())
    for i, clip in enumerate(clips()):
        close(got[i], ref[f"embedding_last_{i}"])
        states = hidden(backbone, clip)
        close(states.mean(1), ref[f"layer_means_{i}"])
        close(states[-1][:16], ref[f"first_tokens_{i}"])
        close(beats.clip_embedding(states[6]), ref[f"embedding_6_{i}"])
        close(beats.clip_embedding(states[1:].mean(0)), ref[f"embedding_average_{i}"])


def test_a_mixed_length_batch_embeds_as_each_clip_alone(tiny_beats):
    backbone = open_fp32(tiny_beats)
    waves = clips()
    batch = backbone.embed(waves)
    for clip, got in zip(waves, batch):
        np.testing.assert_allclose(got, backbone.embed([clip])[0], atol=1e-5, rtol=0)
    # tokens of the padded batch: each clip's equal the reference's for the clip alone
    n = max(map(len, waves))
    padded = torch.stack([torch.nn.functional.pad(torch.from_numpy(w), (0, n - len(w))) for w in waves])
    states, steps = backbone.tokens(padded, torch.tensor([len(w) for w in waves]))
    ref = fixture("tiny")
    for i in range(len(waves)):
        valid = int(steps[i]) * 8
        close(np.stack([s[i, :valid].numpy() for s in states]), ref[f"tokens_{i}"])
    # the reference's own padded batch is right for its longest clip only (its padding mask is not exact)
    close(states[-1][-1].numpy(), ref["batch_last"][-1])
    short = ref["tokens_0"][-1]
    assert not np.allclose(ref["batch_last"][0][: len(short)], short, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", ["last", "0", "1", "average", "0,2"])
def test_layers_pool_the_chosen_hidden_states(tiny_beats, layer):
    waves = clips()
    backbone = open_fp32(tiny_beats, layer=layer)
    states = [hidden(backbone, w) for w in waves]
    for w, s, got in zip(waves, states, backbone.embed(waves)):
        if layer in ("last", "average"):
            chosen = [s[-1] if layer == "last" else s[1:].mean(0)]
        else:
            chosen = [s[int(i)] for i in layer.split(",")]
        close(got, np.concatenate([beats.clip_embedding(t) for t in chosen]), rtol=1e-5)


def test_stacked_patches_are_a_time_steps_tokens_side_by_side(tiny_beats):
    stacked = beats.BEATsBackbone(str(tiny_beats), patches="stack", device="cpu", precision="fp32")
    assert stacked.dim == 8 * 32
    clip = clips()[1]
    [(frames, steps)] = stacked.forward(torch.from_numpy(clip)[None], torch.tensor([len(clip)]))
    tokens = hidden(stacked, clip)[-1]
    assert int(steps[0]) == len(tokens) // 8 == 9
    close(frames[0].numpy(), tokens.reshape(9, -1), rtol=1e-6)
    with pytest.raises(BackboneError, match="patches 'sum'"):
        beats.BEATsBackbone(str(tiny_beats), patches="sum")


def _break_gate(backbone, monkeypatch):
    for layer in backbone.model.encoder.layers:
        monkeypatch.setattr(layer.self_attn, "gated", False)


def _break_deep_norm(backbone, monkeypatch):
    for layer in backbone.model.encoder.layers:
        monkeypatch.setattr(layer, "alpha", 1.0)


@pytest.mark.parametrize("change", ["fbank mean", "fbank std", "position buckets", "position gate", "deep norm"])
def test_a_changed_front_end_position_bias_or_deep_norm_fails_the_fixtures(tmp_path, monkeypatch, change):
    """The fixtures see each of these: changed, the tokens leave the reference's (relative 1e-4)."""
    backbone = open_fp32(checkpoint(tmp_path, "tiny"))
    if change == "fbank mean":
        monkeypatch.setattr(beats, "FBANK_MEAN", beats.FBANK_MEAN + 0.5)
    elif change == "fbank std":
        monkeypatch.setattr(beats, "FBANK_STD", beats.FBANK_STD * 1.2)
    elif change == "position buckets":
        original = beats.relative_buckets
        monkeypatch.setattr(beats, "relative_buckets", lambda n, buckets, far, device: original(n, buckets, 2 * far,
                                                                                                 device))
    elif change == "position gate":
        _break_gate(backbone, monkeypatch)
    else:
        _break_deep_norm(backbone, monkeypatch)
    clip = clips()[2]
    with pytest.raises(AssertionError):
        close(hidden(backbone, clip), fixture("tiny")["tokens_2"])


def test_bad_checkpoint_files_are_one_line_errors_naming_the_file(tmp_path, tiny_beats):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(BackboneError, match=f"{plain}: not a BEATs checkpoint .*found \\['state_dict'\\]"):
        load_backbone(str(plain))
    unfit = tmp_path / "unfit.pt"
    ckpt = torch.load(tiny_beats, weights_only=True)
    ckpt["cfg"]["encoder_layers"] = 3
    torch.save(ckpt, unfit)
    with pytest.raises(BackboneError, match=f"{unfit}: its weights do not fit its cfg: Missing key.*layers.2"):
        load_backbone(str(unfit))
    code = tmp_path / "code.pt"
    marker = tmp_path / "ran"
    torch.save({"cfg": {}, "model": {}, "hook": WritesAMarker(marker)}, code)
    with pytest.raises(BackboneError, match=f"{code}: not a readable torch checkpoint"):
        load_backbone(str(code))
    assert not marker.exists()  # weights_only: the file's code never ran
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(BackboneError, match="embed.backbone=.*notes.pt: a file, but not a torch checkpoint"):
        check_available(str(text))
    check_available(str(tiny_beats))
    with pytest.raises(BackboneError, match="embed.backbone=.*gone.pt: checkpoint file not found"):
        check_available(str(tmp_path / "gone.pt"))


def test_fine_tuning_refuses_a_beats_checkpoint_naming_what_it_supports(tiny_beats):
    with pytest.raises(BackboneError, match="BEATs or EAT checkpoint.*fine-tuning supports .*hubert, wav2vec2.*not BEATs"):
        check_finetunable(str(tiny_beats))


def test_the_beats_knn_recipe_runs_with_asd_ray_run_local(tiny_corpus, tiny_beats, tmp_path, capsys):
    recipe = str(Path(__file__).resolve().parents[2] / "configs" / "beats_knn.yaml")
    args = ["run", "--local", "--config", recipe, "--data", str(tiny_corpus), "--backbone", str(tiny_beats),
            "--machines", "valve", "--out", str(tmp_path)]
    assert main(args) != 0  # the recipe's layer 4 of a 2-layer model: one line naming the layers there are
    assert "layer '4': " in capsys.readouterr().err
    assert main([*args, "--set", "embed.layer=2"]) == 0
    assert "official score" in capsys.readouterr().out
    assert 0 <= json.loads((tmp_path / "metrics.json").read_text())["official_score"] <= 1


def test_the_positional_convolution_by_fft_embeds_as_the_convolution(tiny_beats, monkeypatch):
    """The GPU's path (by FFT) forced on the CPU gives the convolution's embeddings, one clip or a mixed batch."""
    backbone = open_fp32(tiny_beats)
    waves = clips()
    by_conv = backbone.embed(waves)
    calls = []
    monkeypatch.setattr(beats, "long_kernel_by_fft", lambda x: calls.append(x.shape) or True)
    np.testing.assert_allclose(backbone.embed(waves), by_conv, atol=1e-5, rtol=0)
    np.testing.assert_allclose(backbone.embed(waves[:1])[0], by_conv[0], atol=1e-5, rtol=0)
    assert len(calls) == 2


def test_bf16_on_the_cpu_embeds_close_to_fp32(tiny_beats):
    """bf16 autocast on a CPU: the positional convolution runs by FFT, since torch 2.11's oneDNN grouped convolution
    is wrong on CPUs with AMX (by the convolution, embeddings were off by 0.19 of at most 0.38 on this project's
    machine)."""
    waves = clips()
    exact = open_fp32(tiny_beats).embed(waves)
    half = load_backbone(str(tiny_beats), device="cpu", precision="bf16").embed(waves)
    np.testing.assert_allclose(half, exact, atol=0.01, rtol=0)


def test_a_beats_frames_are_its_time_steps_before_pooling_alike_alone_and_in_a_batch(tiny_beats):
    """The frames the frame detectors eat over a BEATs file: one per time step, the layer's frequency patches
    averaged and L2-normalised, whose mean is the clip embedding; a clip's frames alike alone and in a mixed
    batch."""
    from asd_ray.models.backbones import BackboneFrames

    backbone = open_fp32(tiny_beats, layer="0,2")
    frames = BackboneFrames(backbone)
    waves = clips()
    batch = frames.embed(waves)
    for w, got, emb in zip(waves, batch, backbone.embed(waves)):
        steps = len(hidden(backbone, w)[-1]) // 8
        assert got.shape == (steps, 2 * 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, frames.embed([w])[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got[:, :32], axis=1), 1.0, rtol=1e-5)
        close(got.mean(0), emb, rtol=1e-5)


@pytest.mark.parametrize("detector", ["local", "fusion"])
def test_frame_detectors_run_over_a_beats_files_frames(tiny_corpus, tiny_beats, tmp_path, capsys, detector):
    """``--backbone FILE.pt`` with a frame detector: its banks hold BEATs frames (the layer's width, not n_mels),
    the embed settings apply and the frames ones are refused as unread; a min_seconds too short for the
    detector's windows of 160 ms frames is one line up front."""
    from asd_ray.config import ConfigError, RunConfig, load_config
    from asd_ray.detect import reference_run
    from asd_ray.detectors import load_detector

    config = load_config(RunConfig, None, [f"detector={detector}", f"embed.backbone={tiny_beats}",
                                           "embed.device=cpu", "embed.layer=1"])
    report = reference_run([tiny_corpus], config, tmp_path / "run", ["valve"])
    scores = report.results["valve"].raw_scores
    assert len(scores) == 20 and np.isfinite(scores).all() and len(set(np.round(scores, 6))) > 10
    saved = load_detector(tmp_path / "run" / "banks" / "valve")
    assert saved.dim == 32  # BEATs frames of the tiny model's width
    args = ["run", "--local", "--data", str(tiny_corpus), "--machines", "valve", "--detector", detector,
            "--backbone", str(tiny_beats), "--out", str(tmp_path / "cli")]
    assert main([*args, "--set", "frames.n_mels=64"]) == 2  # log-mel settings: not read over a backbone's frames
    assert "frames.n_mels is not read by detector" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"stacks 5 frames of .*tiny.pt, so clips must be at least 0.815 s"):
        reference_run([tiny_corpus], load_config(RunConfig, None, [f"detector={detector}",
                                                                   f"embed.backbone={tiny_beats}",
                                                                   "preprocess.min_seconds=0.5"]), None, ["valve"])


def test_the_rhythm_pooling_is_refused_over_a_beats_files_frames(tiny_corpus, tiny_beats, tmp_path, capsys):
    """``rhythm`` reads onsets of log-mel band levels in dB: over a backbone's frames it would run and mean nothing,
    so it (alone or as a fusion member) is one line before anything is embedded."""
    from asd_ray.config import RunConfig, load_config
    from asd_ray.detectors import REGISTRY

    args = ["run", "--local", "--data", str(tiny_corpus), "--machines", "valve", "--backbone", str(tiny_beats),
            "--out", str(tmp_path / "cli")]
    for detector in (["--detector", "rhythm"], ["--set", "fusion.members=[local, pooled, rhythm]"]):
        assert main([*args, *detector]) == 2
        err = capsys.readouterr().err
        assert "pools the rhythm of log-mel bands" in err and str(tiny_beats) in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "banks").exists()
    config = load_config(RunConfig, None, ["detector=rhythm"])
    assert REGISTRY.needs_log_mel(config) and not REGISTRY.needs_log_mel(config, "pooled")
