"""Backbones: batch invariance through the real loading path, layer options, clear load errors."""

import json

import numpy as np
import pytest
import torch

from asd_ray.models.backbones import BackboneError, load_backbone, pool_frames
from asd_ray.models.exact_layers import PaddingExactGroupNorm


def _clips():
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16_000, 40_000, 23_456)]


def test_hubert_embedding_does_not_depend_on_the_batch(tiny_hubert):
    backbone = load_backbone(str(tiny_hubert))
    short, long_, odd = _clips()
    alone = backbone.embed([short])
    batched = backbone.embed([long_, short, odd, long_])
    assert alone.shape == (1, 32)
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5, rtol=0)
    assert np.linalg.norm(alone[0]) <= 1.0 + 1e-6  # mean of unit vectors


def test_mixed_lengths_run_in_one_forward_pass_and_equal_the_unpadded_model(tiny_hubert):
    """The padding-exact GroupNorm: one padded forward pass gives each clip's embedding as the untouched
    checkpoint gives it for that clip alone (the per-length groups of the old path)."""
    from transformers import AutoModel

    backbone = load_backbone(str(tiny_hubert))
    clips = _clips() + [np.random.default_rng(3).standard_normal(31_999).astype(np.float32)]
    calls = []
    hook = backbone.model.register_forward_hook(lambda *a: calls.append(1))
    batched = backbone.embed(clips)
    hook.remove()
    assert len(calls) == 1
    plain = AutoModel.from_pretrained(str(tiny_hubert)).eval()
    with torch.no_grad():
        for clip, got in zip(clips, batched):
            frames = plain(torch.from_numpy(clip)[None]).last_hidden_state[0]
            want = torch.nn.functional.normalize(frames, dim=-1).mean(0).numpy()
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # a GroupNorm that saw the padding would be off by far more than that
    leaky = load_backbone(str(tiny_hubert))
    leaky.model.feature_extractor.conv_layers[0] = plain.feature_extractor.conv_layers[0]
    assert np.abs(leaky.embed(clips)[0] - batched[0]).max() > 1e-3


def test_layernorm_checkpoints_use_an_attention_mask(tiny_hubert, tmp_path):
    from transformers import HubertConfig, HubertModel

    cfg = HubertConfig.from_pretrained(tiny_hubert)
    cfg.feat_extract_norm, cfg.do_stable_layer_norm = "layer", True
    torch.manual_seed(1)
    HubertModel(cfg).save_pretrained(tmp_path / "ln")
    backbone = load_backbone(str(tmp_path / "ln"))
    assert not any(isinstance(m, PaddingExactGroupNorm) for m in backbone.model.modules())
    short, long_, _ = _clips()
    np.testing.assert_allclose(backbone.embed([short])[0], backbone.embed([long_, short])[1], atol=1e-5)


def test_manual_frame_pooling_matches_definition(tiny_hubert):
    backbone = load_backbone(str(tiny_hubert))
    short = _clips()[0]
    [(frames, n)] = backbone.forward(torch.from_numpy(short)[None], torch.tensor([len(short)]))
    expected = (frames[0, : n[0]] / frames[0, : n[0]].norm(dim=-1, keepdim=True)).mean(0)
    np.testing.assert_allclose(backbone.embed([short])[0], expected.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["last", "average", "0", "1", "-2"])
def test_layer_choices(tiny_hubert, layer):
    emb = load_backbone(str(tiny_hubert), layer=layer).embed(_clips()[:1])
    assert emb.shape == (1, 32) and np.isfinite(emb).all()
    if layer == "1":
        assert not np.allclose(emb, load_backbone(str(tiny_hubert), layer="last").embed(_clips()[:1]))


def test_bad_layer_is_a_clear_error(tiny_hubert):
    with pytest.raises(BackboneError, match="layer '9'"):
        load_backbone(str(tiny_hubert), layer="9").embed(_clips()[:1])


def test_logmel_is_batch_invariant_and_256_d():
    backbone = load_backbone("logmel")
    short, long_, _ = _clips()
    assert backbone.dim == 256
    assert np.array_equal(backbone.embed([short])[0], backbone.embed([long_, short])[1])


def test_pooling_ignores_padding():
    frames = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]]])
    pooled = pool_frames(frames, torch.tensor([2]), l2_normalise=True, pooling="mean_std")
    np.testing.assert_allclose(pooled[0].numpy(), [0.8, 0.4, 0.2, 0.4], atol=1e-6)


def test_missing_and_broken_checkpoints_name_the_path(tmp_path, tiny_hubert):
    with pytest.raises(BackboneError, match=str(tmp_path / "nowhere")):
        load_backbone(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="broken"):
        load_backbone(str(broken))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_hubert / "config.json").read_text())
    with pytest.raises(BackboneError, match="noweights"):
        load_backbone(str(noweights))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(BackboneError, match="bert"):
        load_backbone(str(bert))


@pytest.mark.parametrize("capability, auto, finetune_bf16", [((7, 5), torch.float16, False),
                                                             ((8, 0), torch.bfloat16, True),
                                                             ((9, 0), torch.bfloat16, True)])
def test_precision_auto_takes_bf16_only_where_the_gpu_has_it(monkeypatch, capability, auto, finetune_bf16):
    """A T4 (7.5) emulates bf16 (``torch.cuda.is_bf16_supported()`` says yes): embedding there runs in fp16,
    fine-tuning in fp32; Ampere and later in bf16. The CPU stays in fp32; an explicit precision is kept."""
    from asd_ray.models.backbones import autocast_dtype, native_bf16

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    assert autocast_dtype(gpu, "auto") == auto
    assert native_bf16(gpu) is finetune_bf16
    assert autocast_dtype(gpu, "bf16") == torch.bfloat16 and autocast_dtype(gpu, "fp16") == torch.float16
    assert autocast_dtype(gpu, "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "auto") is None and native_bf16(torch.device("cpu")) is False
