"""Every backbone family through the real loading path (tiny random checkpoints saved with save_pretrained):
batch invariance, layers and stacks, windows of the spectrogram families, fine-tuning's family check, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from asd_ray.cli import main
from asd_ray.models.backbones import BackboneError, load_backbone
from asd_ray.models import exact_layers
from asd_ray.models.encoders import FAMILIES, SpectrogramBackbone, check_finetunable, clip_windows
from tiny import FAMILIES as TINY_FAMILIES, WAVEFORM_FAMILIES

SPECTROGRAM_FAMILIES = [f for f in TINY_FAMILIES if f not in WAVEFORM_FAMILIES]


def _clips(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in lengths]


def test_the_tests_cover_every_family():
    assert set(TINY_FAMILIES) == set(FAMILIES)
    assert {t for t, (a, _) in FAMILIES.items() if issubclass(a, SpectrogramBackbone)} == set(SPECTROGRAM_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_clip_embeds_alike_alone_and_in_a_mixed_length_batch(tiny_encoder, family):
    backbone = load_backbone(str(tiny_encoder(family)))
    clips = _clips(16_000, 40_000, 23_456, 11_000)  # 1 s .. 2.5 s: the spectrogram families' 1 s windows, 1 to 3 each
    batched = backbone.embed(clips[::-1])[::-1]
    for clip, got in zip(clips, batched):
        np.testing.assert_allclose(backbone.embed([clip])[0], got, atol=1e-5, rtol=0)
    assert batched.shape == (4, backbone.dim) and np.isfinite(batched).all()
    assert np.linalg.norm(batched[0] - batched[1]) > 1e-4  # clips differ, so do their embeddings


@pytest.mark.parametrize("bias", [False, True])
def test_a_one_channel_convolution_as_a_matrix_product_equals_the_convolution(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, 8, kernel_size=10, stride=5, bias=bias)
    x = torch.randn(3, 1, 1003)
    torch.testing.assert_close(exact_layers.single_channel_conv(conv, x), conv(x), atol=1e-6, rtol=1e-6)
    padded = torch.nn.Conv1d(1, 8, kernel_size=10, stride=5, padding=2)  # not the plain case: the convolution itself
    torch.testing.assert_close(exact_layers.single_channel_conv(padded, x), padded(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: the convolution's dtype and values
        by_conv, by_product = conv(x), exact_layers.single_channel_conv(conv, x)
    assert by_product.dtype == by_conv.dtype == torch.bfloat16 and by_product.is_contiguous()
    torch.testing.assert_close(by_product.float(), by_conv.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("bias", [False, True])
def test_a_grouped_convolution_by_fft_equals_the_convolution(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(96, 96, kernel_size=32, padding=16, groups=16, bias=bias)
    if bias:  # as HuBERT's: weight-normed (its scale not the direction's norm), a bias far from zero
        conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        with torch.no_grad():
            conv.parametrizations.weight.original0.mul_(torch.rand_like(conv.parametrizations.weight.original0) + 0.5)
            conv.bias.normal_()
    x = torch.randn(3, 37, 96).transpose(1, 2)  # B x C x T, not contiguous: as the encoder hands it over
    with torch.no_grad():
        exact = conv(x)
        torch.testing.assert_close(exact_layers.grouped_conv_by_fft(conv, x), exact, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: the convolution's dtype, its values
            by_conv, by_fft = conv(x), exact_layers.grouped_conv_by_fft(conv, x)
    assert by_fft.dtype == by_conv.dtype == torch.bfloat16
    # against the fp32 convolution at bf16's precision: the CPU's own bf16 grouped convolution is no reference,
    # since oneDNN's kernel on CPUs with AMX (torch 2.11) is off by 2.3 here, against 0.007 without oneDNN
    torch.testing.assert_close(by_fft.float(), exact, atol=0.05, rtol=0.02)
    assert not exact_layers.long_kernel_by_fft(x)  # fp32 on the CPU: the convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert exact_layers.long_kernel_by_fft(x)  # bf16 on the CPU: by FFT, whatever the CPU's oneDNN does
    strided = torch.nn.Conv1d(96, 96, kernel_size=32, stride=2, groups=16)  # not its case: the convolution itself
    torch.testing.assert_close(exact_layers.grouped_conv_by_fft(strided, x), strided(x))


def test_the_gpu_paths_of_the_convolutions_embed_as_the_convolutions(tiny_hubert, monkeypatch):
    """The GPU's paths forced on the CPU (the first layer as a matrix product, the positional convolution by FFT):
    the same embeddings, one clip or a mixed batch."""
    clips = _clips(16_000, 40_000, 23_456, 11_000)
    backbone = load_backbone(str(tiny_hubert))
    assert isinstance(backbone.model.feature_extractor.conv_layers[0], exact_layers.PaddingExactGroupNorm)
    assert isinstance(backbone.model.encoder.pos_conv_embed.conv, exact_layers.PositionalConvByFFT)
    by_conv = backbone.embed(clips)
    calls = []
    monkeypatch.setattr(exact_layers, "windows_by_matmul", lambda x: calls.append("first") or True)
    monkeypatch.setattr(exact_layers, "long_kernel_by_fft", lambda x: calls.append("positional") or True)
    np.testing.assert_allclose(backbone.embed(clips), by_conv, atol=1e-5, rtol=0)
    np.testing.assert_allclose(backbone.embed(clips[1:2])[0], by_conv[1], atol=1e-5, rtol=0)
    assert calls == ["first", "positional"] * 2


@pytest.mark.parametrize("family", ["wav2vec2", "clap"])
def test_a_stack_of_layers_is_each_layer_pooled_side_by_side(tiny_encoder, family):
    path = str(tiny_encoder(family))
    clips = _clips(16_000, 27_000)
    stack = load_backbone(path, layer="0,2")
    singles = [load_backbone(path, layer=i) for i in ("0", "2")]
    np.testing.assert_allclose(stack.embed(clips), np.hstack([b.embed(clips) for b in singles]), atol=1e-6)
    assert stack.dim == sum(b.dim for b in singles)
    if family == "clap":  # the tower's stages differ in width (16, 32, 64): they stack, but do not average
        assert [b.dim for b in singles] == [16, 64]
        with pytest.raises(BackboneError, match="layer 'average' of .*differ in shape"):
            load_backbone(path, layer="average")
    else:
        assert load_backbone(path, layer="average").dim == 32


@pytest.mark.parametrize("family", SPECTROGRAM_FAMILIES)
def test_a_long_clip_is_windows_whose_frames_pool_together(tiny_encoder, family):
    backbone = load_backbone(str(tiny_encoder(family)))
    window = backbone.window_samples()
    clip = _clips(2 * window)[0]
    whole, first, second = backbone.embed([clip, clip[:window], clip[window:]])
    np.testing.assert_allclose(whole, (first + second) / 2, atol=1e-6)  # two full windows: their average
    [(frames, counts)] = backbone.forward(torch.from_numpy(clip[: window // 2])[None], torch.tensor([window // 2]))
    full = backbone.forward(torch.from_numpy(clip[:window])[None], torch.tensor([window]))[0][1]
    if family in ("audio-spectrogram-transformer", "whisper"):  # frames that see only padding stay out of the pool
        assert int(full[0]) // 2 <= int(counts[0]) < int(full[0])
    else:  # CLAP's extractor repeats a short clip to fill the window: every token sees the clip
        assert int(counts[0]) == int(full[0])


def test_windows_cover_a_clip_from_its_start_to_its_end():
    assert clip_windows(900, 1000) == [(0, 900)]
    assert clip_windows(1000, 1000) == [(0, 1000)]
    assert clip_windows(2500, 1000) == [(0, 1000), (750, 1000), (1500, 1000)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_runs_through_asd_ray_run(tiny_corpus, tiny_encoder, family, tmp_path, capsys):
    assert main(["run", "--local", "--data", str(tiny_corpus), "--backbone", str(tiny_encoder(family)),
                 "--detector", "knn", "--machines", "valve", "--out", str(tmp_path), "--set", "embed.layer=0,1"]) == 0
    assert "official score" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["official_score"] <= 1


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_only_waveform_families_fine_tune(tiny_encoder, family):
    path = str(tiny_encoder(family))
    if family in WAVEFORM_FAMILIES:
        check_finetunable(path)
        return
    with pytest.raises(BackboneError, match=f"{path}.*'{family}' checkpoint.*fine-tuning needs a waveform model"):
        check_finetunable(path)


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm", "data2vec-audio"])
def test_masked_prediction_runs_on_the_other_waveform_families(tiny_encoder, family):
    from transformers import AutoModel

    from asd_ray.models.finetune import MaskedPrediction, prepare_student

    student = prepare_student(AutoModel.from_pretrained(tiny_encoder(family))).train()
    loss = MaskedPrediction(student, seed=0).loss(torch.randn(2, 16_000))
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in student.feature_projection.parameters())


def test_fine_tuning_a_spectrogram_model_is_a_clear_error_before_ray_starts(tiny_corpus, tiny_encoder, capsys):
    whisper = str(tiny_encoder("whisper"))
    assert main(["finetune", "--data", str(tiny_corpus), "--init", whisper]) == 2
    assert f"{whisper!r} is a 'whisper' checkpoint" in capsys.readouterr().err


def test_a_spectrogram_model_needs_its_feature_extractor(tiny_encoder, tmp_path):
    bare = tmp_path / "ast-without-extractor"
    shutil.copytree(tiny_encoder("audio-spectrogram-transformer"), bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(BackboneError, match=f"{bare}.*no usable feature extractor"):
        load_backbone(str(bare))


def test_a_waveform_model_for_another_sample_rate_is_a_clear_error(tiny_encoder, tmp_path):
    other = tmp_path / "wav2vec2-8k"
    shutil.copytree(tiny_encoder("wav2vec2"), other)
    cfg = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**cfg, "sampling_rate": 8000}))
    with pytest.raises(BackboneError, match=f"{other}.*wants 8000 Hz"):
        load_backbone(str(other))


def test_a_text_model_is_a_clear_error_naming_it(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(BackboneError, match=f"{tmp_path / 'bert'}.*'bert' checkpoint \\(BertModel\\), not an audio "
                                            "encoder.*supported model types: hubert"):
        load_backbone(str(tmp_path / "bert"))


@pytest.mark.parametrize("layer", ["first", "1,x", ""])
def test_a_malformed_layer_is_a_clear_error(tiny_hubert, layer):
    with pytest.raises(BackboneError, match="use 'last', 'average', an index"):
        load_backbone(str(tiny_hubert), layer=layer)

