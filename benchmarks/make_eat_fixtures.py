"""Regenerate tests/fixtures/eat/*.npz from EAT's reference implementation (github.com/cwx-worst-one/EAT, its
fairseq model in models/).

    python benchmarks/make_eat_fixtures.py /path/to/EAT [--out tests/fixtures/eat]

The reference's model code is imported from the folder given (models/EAT_pretraining.py, images.py, base.py,
modules.py, mae.py); nothing of it enters the project. It needs timm and omegaconf (pip install timm omegaconf
torchvision). fairseq itself is not needed: the names the model files import from it are given here as inert
stand-ins (``fake_fairseq``); none of them acts in the encoder's forward pass (they serve pre-training: masking,
the EMA teacher, decoders, the registry), which the fixtures check by running it.

For each configuration the reference's ``Data2VecMultiModel`` is built as EAT's pre-training config builds it
(post-norm blocks, no prenet, one CLS token, fixed sine-cosine positions, no ALiBi; no decoder and no teacher),
given the seeded weights of ``asd_ray.models.eat.random_weights`` (its state dict's names and shapes must be the
project's, and its fixed positions the project's table: asserted here), saved in the fairseq layout
(``{"cfg": {"model": ...}, "model": ...}``), read back with ``weights_only=True`` and run as the reference's
feature extraction runs it (feature_extract/feature_extract.py: the waveform minus its mean, Kaldi fbank, zero-
padded to 1,024 frames, normalised; ``extract_features(..., mask=False, remove_extra_tokens=False)``) on the
BEATs fixtures' clips (tests/fixtures/beats/clips.npz: 1.0, 1.5, 2.3 s):

- tiny.npz (width 32, 2 blocks, 4 heads, MLP 48): clip 0's every hidden state (the blocks' input, each block's
  output, caught with hooks), CLS token first; the other clips' last hidden state; clip 0's fbank before padding;
- base.npz (EAT-base: width 768, 12 blocks, 12 heads, MLP 3072; random weights): per clip every hidden state's
  mean token, the last state's CLS token and first 16 patch tokens, and the clip embeddings (frequency patches
  averaged per time step, the steps the clip reaches, each L2-normalised, the mean) of layers last, 6, average.

The tests (tests/models/test_eat.py) write the same checkpoints with the project's module from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asd_ray.models import eat as ours

CHECKOUT = Path(__file__).resolve().parents[1]
TINY = {"dim": 32, "depth": 2, "heads": 4, "hidden": 48}
BASE = {"dim": 768, "depth": 12, "heads": 12, "hidden": 3072}
SEEDS = {"tiny": 1, "base": 3}
MAX_TIME_PATCHES = 768  # the reference's max_length: positions for 768 time patches (about 2 minutes)


def fake_fairseq() -> None:
    """Inert stand-ins for what the reference's model files import from fairseq, in ``sys.modules``."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    class Unused:  # EMA teacher, padding helpers, decoders' layers: never built for the encoder here
        def __init__(self, *args, **kwargs):
            raise RuntimeError("a fairseq stand-in was used")

    @dataclass
    class FairseqDataclass:
        pass

    module("fairseq")
    module("fairseq.modules", EMAModule=Unused, EMAModuleConfig=FairseqDataclass, GradMultiply=Unused,
           LayerNorm=torch.nn.LayerNorm, SamePad=Unused, SamePad2d=Unused, TransposeLast=Unused)
    module("fairseq.modules.transformer_sentence_encoder", init_bert_params=lambda m: None)
    module("fairseq.dataclass", FairseqDataclass=FairseqDataclass)
    module("fairseq.models", BaseFairseqModel=torch.nn.Module, register_model=lambda *a, **k: (lambda cls: cls))
    module("fairseq.models.wav2vec")
    module("fairseq.models.wav2vec.wav2vec2", TransformerSentenceEncoderLayer=Unused)
    module("fairseq.data")
    module("fairseq.data.data_utils", compute_mask_indices=Unused)
    module("fairseq.utils", index_put=Unused)
    module("fairseq.tasks", FairseqTask=object)


def reference_model(ref, size: dict, seed: int, path: Path):
    """The reference's encoder with the seeded weights, saved in the fairseq layout and loaded back."""
    D2vImageConfig = sys.modules["eat_models.images"].D2vImageConfig  # noqa: N806 - the reference's class
    image = D2vImageConfig(in_chans=1, prenet_depth=0, num_extra_tokens=1, init_extra_token_zero=False,
                           use_alibi_encoder=False, decoder=None, embed_dim=size["dim"], patch_size=16,
                           target_length=1024, max_length=MAX_TIME_PATCHES)
    cfg = ref.Data2VecMultiConfig(depth=size["depth"], embed_dim=size["dim"], num_heads=size["heads"],
                                  mlp_ratio=size["hidden"] / size["dim"], norm_eps=1e-6, layer_norm_first=False,
                                  encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, supported_modality=ref.Modality.IMAGE,
                                  modalities=ref.D2vModalitiesConfig(image=image))
    model = ref.Data2VecMultiModel(cfg, [ref.Modality.IMAGE], skip_ema=True)
    arch = {**size, "patch": 16, "eps": 1e-6, "max_time_patches": MAX_TIME_PATCHES}
    weights = ours.random_weights(ours.EAT(arch), seed)
    theirs = model.state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in weights.items()}, \
        f"state dict names/shapes differ: {set(theirs) ^ set(weights)}"
    positions = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    np.testing.assert_array_equal(theirs[positions].numpy(), weights[positions].numpy())
    model.load_state_dict(weights, strict=True)
    plain = {"depth": size["depth"], "embed_dim": size["dim"], "num_heads": size["heads"], "norm_eps": 1e-6,
             "layer_norm_first": False, "mlp_ratio": size["hidden"] / size["dim"]}
    torch.save({"cfg": {"model": plain}, "model": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model = ref.Data2VecMultiModel(cfg, [ref.Modality.IMAGE], skip_ema=True)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()


def reference_input(clip: torch.Tensor) -> torch.Tensor:
    """feature_extract.py's input of one clip: 1 x 1 x 1024 x 128."""
    import torchaudio

    wav = clip - clip.mean()
    mel = torchaudio.compliance.kaldi.fbank(wav.unsqueeze(0), htk_compat=True, sample_frequency=16000,
                                            use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
                                            frame_shift=10).unsqueeze(0)
    mel = torch.nn.ZeroPad2d((0, 0, 0, 1024 - mel.shape[1]))(mel)
    return ((mel - -4.268) / (4.569 * 2)).unsqueeze(0)


@torch.no_grad()
def hidden_states(model, clip: torch.Tensor) -> list[np.ndarray]:
    """Every hidden state of one clip (the blocks' input, each block's output) as (1 + N) x D arrays, caught with
    hooks on the reference's blocks; the last one checked against what ``extract_features`` returns."""
    caught = []
    blocks = model.blocks
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: caught.append(args[0]))]
    hooks += [b.register_forward_hook(lambda m, args, out: caught.append(out[0])) for b in blocks]
    try:
        out = model.extract_features(reference_input(clip), padding_mask=None, mask=False,
                                     remove_extra_tokens=False)["x"]
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, caught[-1])
    return [c[0].numpy() for c in caught]


def clip_embedding(state: np.ndarray, samples: int) -> np.ndarray:
    """The patch tokens (CLS left out) of the time steps a clip of ``samples`` reaches, as ``embed`` pools them."""
    frames = 1 + (samples - 400) // 160
    steps = -(-frames // 16)
    from asd_ray.models.beats import clip_embedding as pooled

    return pooled(state[1: 1 + steps * 8])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="EAT's repository (its models/ folder is imported)")
    parser.add_argument("--out", type=Path, default=CHECKOUT / "tests/fixtures/eat")
    args = parser.parse_args(argv)
    fake_fairseq()
    sys.modules.pop("eat_models", None)
    import importlib.util

    spec = importlib.util.spec_from_file_location("eat_models", args.reference.resolve() / "models/__init__.py",
                                                  submodule_search_locations=[str(args.reference.resolve() / "models")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["eat_models"] = package
    spec.loader.exec_module(package)
    import dataclasses

    plain = dataclasses.dataclass

    def hashable(cls=None, **kwargs):  # Python 3.11 refuses unhashable dataclass instances as field defaults,
        def wrap(c):                   # which the reference (written for 3.9) uses: its configs made hashable
            made = plain(c, **kwargs)
            made.__hash__ = made.__hash__ or object.__hash__
            return made
        return wrap if cls is None else wrap(cls)

    dataclasses.dataclass = hashable
    try:
        import eat_models.EAT_pretraining as ref  # noqa: N813 - the reference, from the folder given
    finally:
        dataclasses.dataclass = plain

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    clips_file = np.load(CHECKOUT / "tests/fixtures/beats/clips.npz")
    pcm, lengths = clips_file["pcm"], clips_file["lengths"]
    clips = [torch.from_numpy(c.astype(np.float32) / 32768) for c in np.split(pcm, np.cumsum(lengths)[:-1])]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = reference_model(ref, TINY, SEEDS["tiny"], tmp / "tiny.pt")
        states = [hidden_states(model, c) for c in clips]
        import torchaudio

        c0 = clips[0] - clips[0].mean()
        fbank_0 = torchaudio.compliance.kaldi.fbank(c0[None], htk_compat=True, sample_frequency=16000,
                                                    use_energy=False, window_type="hanning", num_mel_bins=128,
                                                    dither=0.0, frame_shift=10).numpy()
        np.savez_compressed(args.out / "tiny.npz", size=json.dumps(TINY), seed=SEEDS["tiny"], fbank_0=fbank_0,
                            states_0=np.stack(states[0]), **{f"last_{i}": s[-1] for i, s in enumerate(states) if i})

        model = reference_model(ref, BASE, SEEDS["base"], tmp / "base.pt")
        out = {}
        for i, c in enumerate(clips):
            states = hidden_states(model, c)
            out[f"layer_means_{i}"] = np.stack([s.mean(0) for s in states])
            out[f"cls_{i}"] = states[-1][0]
            out[f"first_tokens_{i}"] = states[-1][1:17]
            out[f"embedding_last_{i}"] = clip_embedding(states[-1], len(c))
            out[f"embedding_6_{i}"] = clip_embedding(states[6], len(c))
            out[f"embedding_average_{i}"] = clip_embedding(np.mean(states[1:], axis=0), len(c))
        np.savez_compressed(args.out / "base.npz", size=json.dumps(BASE), seed=SEEDS["base"], **out)
    for f in sorted(args.out.glob("*.npz")):
        print(f"{f}: {f.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
