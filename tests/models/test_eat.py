"""EAT (models/eat.py) equals the reference implementation (github.com/cwx-worst-one/EAT, its fairseq model) on the
fixtures it made (tests/fixtures/eat, benchmarks/make_eat_fixtures.py): the checkpoints loaded here are written in
the fairseq layout from the fixtures' seeds. A file is told apart from BEATs by its contents; mixed-length batches
embed as each clip alone; bad files are one-line errors; the frame and clip detectors run over it."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asd_ray.cli import main
from asd_ray.models import eat
from asd_ray.models.backbones import BackboneError, load_backbone
from test_beats import clips, close

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eat"


def fixture(name: str):
    return np.load(FIXTURES / f"{name}.npz")


def checkpoint(tmp_path, name: str, **extra):
    f = fixture(name)
    return eat.write_random_checkpoint(tmp_path / f"{name}.pt", **json.loads(str(f["size"])), seed=int(f["seed"]),
                                       **extra)


def open_fp32(path, **kwargs):
    return load_backbone(str(path), device="cpu", precision="fp32", **kwargs)


def states(backbone, clip: np.ndarray) -> np.ndarray:
    """Every hidden state of one clip alone, the CLS token first: (blocks + 1) x (1 + N) x D."""
    hidden, _ = backbone.hidden_states(torch.from_numpy(clip)[None], torch.tensor([len(clip)]))
    return np.stack([h[0].float().numpy() for h in hidden])


def test_front_end_equals_the_references_fbank():
    close(eat.fbank(torch.from_numpy(clips()[0])).numpy(), fixture("tiny")["fbank_0"])


def test_every_hidden_state_equals_the_reference(tiny_eat):
    backbone = open_fp32(tiny_eat)
    assert type(backbone).__name__ == "EATBackbone"  # a .pt file told apart from BEATs by its contents
    ref = fixture("tiny")
    waves = clips()
    close(states(backbone, waves[0]), ref["states_0"])
    for i in (1, 2):
        close(states(backbone, waves[i])[-1], ref[f"last_{i}"])


def test_official_base_configuration_embeds_as_the_reference(tmp_path):
    """The Done-when check: EAT-base's architecture with the fixtures' random weights, through
    ``load_backbone(path, pooling="mean")``, gives the reference's tokens pooled the same way."""
    ref = fixture("base")
    backbone = load_backbone(str(checkpoint(tmp_path, "base")), pooling="mean", device="cpu", precision="fp32")
    waves = clips()
    got = backbone.embed(waves)
    for i, clip in enumerate(waves):
        close(got[i], ref[f"embedding_last_{i}"])
        hidden = states(backbone, clip)
        close(hidden.mean(1), ref[f"layer_means_{i}"])
        close(hidden[-1][0], ref[f"cls_{i}"])
        close(hidden[-1][1:17], ref[f"first_tokens_{i}"])
    six = open_fp32(tmp_path / "base.pt", layer="6").embed(waves)
    average = open_fp32(tmp_path / "base.pt", layer="average").embed(waves)
    for i in range(len(waves)):
        close(six[i], ref[f"embedding_6_{i}"])
        close(average[i], ref[f"embedding_average_{i}"])


def test_a_fine_tuned_checkpoint_loads_its_encoder_strictly_and_leaves_the_classifier(tmp_path, tiny_eat):
    tuned = checkpoint(tmp_path, "tiny", finetuned_classes=5)
    assert any(k.startswith("model.modality_encoders.") for k in torch.load(tuned, weights_only=True)["model"])
    np.testing.assert_array_equal(open_fp32(tuned).embed(clips()), open_fp32(tiny_eat).embed(clips()))


def test_a_mixed_length_batch_embeds_as_each_clip_alone_past_ten_seconds_too(tiny_eat):
    """Clips under 10.24 s are padded to 1,024 frames each, as the reference pads them; a longer clip keeps all its
    patches (the reference cuts it) and the others' padding past 1,024 frames is masked out."""
    backbone = open_fp32(tiny_eat)
    rng = np.random.default_rng(3)
    long = (0.1 * rng.standard_normal(12 * 16_000)).astype(np.float32)
    waves = [*clips(), long]
    batch = backbone.embed(waves)
    for clip, got in zip(waves, batch):
        np.testing.assert_allclose(got, backbone.embed([clip])[0], atol=1e-5, rtol=0)
    n = max(map(len, waves))
    padded = torch.stack([torch.nn.functional.pad(torch.from_numpy(w), (0, n - len(w))) for w in waves])
    hidden, reached = backbone.hidden_states(padded, torch.tensor([len(w) for w in waves]))
    assert hidden[-1].shape[1] == 1 + 75 * 8 and reached.tolist() == [7, 10, 15, 75]  # 12 s: 1,198 frames
    close(hidden[-1][0, : 1 + 64 * 8].numpy(), fixture("tiny")["states_0"][-1])  # clip 0 as the reference's
    short = backbone.hidden_states(torch.from_numpy(long[: 10 * 16_000])[None], torch.tensor([10 * 16_000]))[0]
    assert short[-1].shape[1] == 1 + 64 * 8


@pytest.mark.parametrize("change", ["fbank mean", "fbank std", "padding target", "no CLS token"])
def test_a_changed_front_end_padding_or_token_layout_fails_the_fixtures(tiny_eat, monkeypatch, change):
    """The fixtures see each of these: changed, the tokens leave the reference's (relative 1e-4)."""
    backbone = open_fp32(tiny_eat)
    if change == "fbank mean":
        monkeypatch.setattr(eat, "FBANK_MEAN", eat.FBANK_MEAN + 0.5)
    elif change == "fbank std":
        monkeypatch.setattr(eat, "FBANK_STD", eat.FBANK_STD * 1.2)
    elif change == "padding target":
        monkeypatch.setattr(eat, "TARGET_FRAMES", 512)
    else:
        image = backbone.model.modality_encoders["IMAGE"]
        monkeypatch.setattr(image, "extra_tokens", torch.nn.Parameter(torch.zeros_like(image.extra_tokens)))
    got = states(backbone, clips()[0])
    ref = fixture("tiny")["states_0"]
    with pytest.raises(AssertionError):
        close(got[:, : ref.shape[1]], ref)


def test_bad_eat_files_are_one_line_errors_naming_the_file(tmp_path, tiny_eat):
    ckpt = torch.load(tiny_eat, weights_only=True)
    gone = tmp_path / "gone-block.pt"
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("blocks.1.attn.")}
    torch.save({**ckpt, "model": state}, gone)
    with pytest.raises(BackboneError, match=f"{gone}: its weights do not fit an EAT: Missing key.*blocks.1.attn"):
        load_backbone(str(gone))
    prenorm = tmp_path / "prenorm.pt"
    torch.save({"cfg": {"model": {**ckpt["cfg"]["model"], "layer_norm_first": True}}, "model": ckpt["model"]},
               prenorm)
    with pytest.raises(BackboneError, match=f"{prenorm}: a pre-norm EAT"):
        load_backbone(str(prenorm))
    extra = tmp_path / "extra.pt"
    torch.save({**ckpt, "model": {**ckpt["model"], "blocks.0.attn.rel_bias": torch.zeros(3)}}, extra)
    with pytest.raises(BackboneError, match=f"{extra}: its weights do not fit an EAT: Unexpected key.*rel_bias"):
        load_backbone(str(extra))
    pickled = tmp_path / "pickled.pt"
    torch.save({**ckpt, "args": argparse.Namespace(task="pretraining_AS2M")}, pickled)  # as fairseq may keep it
    with pytest.raises(BackboneError, match=f"{pickled}: .*pickled Python objects \\(argparse.Namespace\\)"):
        load_backbone(str(pickled))
    heads = tmp_path / "heads.pt"
    torch.save({"cfg": {"model": {**ckpt["cfg"]["model"], "num_heads": 5}}, "model": ckpt["model"]}, heads)
    with pytest.raises(BackboneError, match=f"{heads}: 5 heads do not divide the width 32"):
        load_backbone(str(heads))


@pytest.mark.parametrize("detector", ["knn", "local", "fusion"])
def test_asd_ray_run_over_an_eat_file(tiny_corpus, tiny_eat, tmp_path, capsys, detector):
    """``asd-ray run --backbone eat.pt``: the clip k-NN over its embeddings, the frame detectors over its frames."""
    args = ["run", "--local", "--data", str(tiny_corpus), "--backbone", str(tiny_eat), "--machines", "valve",
            "--detector", detector, "--set", "embed.layer=2", "--out", str(tmp_path)]
    assert main(args) == 0, capsys.readouterr().err
    assert "official score" in capsys.readouterr().out
    assert 0 <= json.loads((tmp_path / "metrics.json").read_text())["official_score"] <= 1


CONFIG_CODE = '''
from transformers import PretrainedConfig


class EATConfig(PretrainedConfig):
    model_type = "eat"

    def __init__(self, dim=32, depth=2, heads=4, hidden=48, max_time_patches=768, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.depth, self.heads, self.hidden, self.max_time_patches = dim, depth, heads, hidden, max_time_patches
'''

MODEL_CODE = '''
import os
import pathlib

import torch
from transformers import PreTrainedModel

from asd_ray.models.eat import EAT

from .configuration_eat import EATConfig

pathlib.Path(os.environ["EAT_REMOTE_CODE_MARKER"]).write_text("ran")  # shows when this file's code runs


class EATModel(PreTrainedModel):
    """A stand-in for EAT's Hugging Face model code: ``extract_features`` of a B x 1 x T x 128 fbank -> the last
    layer's tokens, the CLS token first (as the release's code answers)."""

    config_class = EATConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = EAT({"dim": config.dim, "patch": 16, "depth": config.depth, "hidden": config.hidden,
                          "heads": config.heads, "eps": 1e-6, "max_time_patches": config.max_time_patches})
        self.post_init()

    def extract_features(self, x):
        return self.model(x[:, 0], torch.full((x.shape[0],), x.shape[2] // 16))[-1]
'''


@pytest.fixture
def remote_eat(tmp_path, tiny_eat, monkeypatch):
    """A folder as EAT's Hugging Face releases are: config.json with an auto_map, the model's own code, the weights
    (those of ``tiny_eat``, the reference's fixtures' seed, as model.safetensors). Its code writes a marker when it
    runs; nothing here runs it (transformers would register its classes in this process)."""
    from safetensors.torch import save_file

    folder = tmp_path / "EAT-tiny"
    folder.mkdir()
    (folder / "configuration_eat.py").write_text(CONFIG_CODE)
    (folder / "modeling_eat.py").write_text(MODEL_CODE)
    auto_map = {"AutoConfig": "configuration_eat.EATConfig", "AutoModel": "modeling_eat.EATModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "eat", "auto_map": auto_map, "dim": 32, "depth": 2,
                                                    "heads": 4, "hidden": 48, "architectures": ["EATModel"]}))
    state = torch.load(tiny_eat, weights_only=True)["model"]
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("EAT_REMOTE_CODE_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return folder, marker


def test_an_eat_folder_with_its_own_code_runs_only_when_trusted_and_embeds_as_the_file(remote_eat, tiny_eat,
                                                                                       capsys):
    folder, marker = remote_eat
    with pytest.raises(BackboneError, match="holds its own model code .* embed.trust_remote_code=true"):
        load_backbone(str(folder), device="cpu")
    assert not marker.exists()  # refused before any of its code ran
    trusted = load_backbone(str(folder), device="cpu", precision="fp32", trust_remote_code=True)
    assert marker.exists() and type(trusted).__name__ == "RemoteEATBackbone"
    rng = np.random.default_rng(4)
    waves = [*clips(), (0.1 * rng.standard_normal(11 * 16_000)).astype(np.float32)]
    got = trusted.embed(waves)
    np.testing.assert_allclose(got, open_fp32(tiny_eat).embed(waves), atol=1e-5, rtol=0)
    for clip, row in zip(waves, got):  # batches of mixed padded lengths: each clip as alone
        np.testing.assert_allclose(row, trusted.embed([clip])[0], atol=1e-5, rtol=0)
    from asd_ray.models.encoders import check_finetunable

    with pytest.raises(BackboneError, match="its own model code .*fine-tuning supports .*hubert"):
        check_finetunable(str(folder))
    with pytest.raises(BackboneError, match="BEATs or EAT checkpoint.*fine-tuning supports"):
        check_finetunable(str(tiny_eat))
    with pytest.raises(BackboneError, match="last layer only"):
        load_backbone(str(folder), device="cpu", layer="1", trust_remote_code=True)
    assert main(["run", "--local", "--data", str(tiny_eat.parent), "--detector", "knn", "--set",
                 "embed.trust_remote_code=true", "--out", str(folder.parent / "x")]) == 2
    assert "embed.trust_remote_code is read only for a checkpoint folder" in capsys.readouterr().err
