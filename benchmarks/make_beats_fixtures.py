"""Regenerate tests/fixtures/beats/*.npz from the BEATs reference implementation (microsoft/unilm, folder beats/).

    python benchmarks/make_beats_fixtures.py /path/to/unilm/beats [--out tests/fixtures/beats]

The reference is imported from the folder given (its BEATs.py, backbone.py, modules.py); nothing of it enters
the project. For each configuration below the reference's model is built, given the seeded weights of
``asd_ray.models.beats.random_weights`` (the names and shapes of the reference's own state dict, which must be
those of the project's module: asserted here), saved and reloaded in the official checkpoint format
(``{"cfg": ..., "model": ...}``), and run on fixed clips (seeded noise and tones, 16-bit, 1.0 / 1.5 / 2.3 s):

- clips.npz: the clips as int16 samples (float = int16 / 32768) and their lengths;
- tiny.npz (2 layers, every switch on: relative position bias with gating, deep norm, a conv bias, a projection
  after the patch embedding): every hidden state's tokens of each clip alone, the reference's tokens and padding
  mask of the three clips as one padded batch, the front end's fbank of clip 0, and the last layer's tokens of the
  same network saved as a fine-tuned checkpoint (label_dict and a classifier head added);
- prenorm.npz (2 layers, pre-norm, ungated bias, no projection): every hidden state's tokens of each clip alone;
- iter3.npz (the official BEATs_iter3 configuration, random weights): per clip, every hidden state's mean token,
  the last layer's first 16 tokens and the clip embeddings (frequency patches averaged per time step, each step
  L2-normalised, the mean; ``clip_embedding``) of layers ``last``, ``6`` and ``average``.

The tests (tests/models/test_beats.py) write the same checkpoints with the project's module from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from asd_ray.models import beats as ours

TINY = {"input_patch_size": 16, "embed_dim": 24, "conv_bias": True, "encoder_layers": 2, "encoder_embed_dim": 32,
        "encoder_ffn_embed_dim": 48, "encoder_attention_heads": 4, "activation_fn": "gelu",
        "layer_norm_first": False, "deep_norm": True, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0, "conv_pos": 16,
        "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 64, "max_distance": 128,
        "gru_rel_pos": True, "finetuned_model": False}
TINY_FINETUNED = {**TINY, "finetuned_model": True, "predictor_dropout": 0.0, "predictor_class": 5}
PRENORM = {**TINY, "embed_dim": 32, "conv_bias": False, "layer_norm_first": True, "deep_norm": False,
           "gru_rel_pos": False}
ITER3 = {"input_patch_size": 16, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12,
         "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
         "activation_fn": "gelu", "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False,
         "deep_norm": True, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
         "encoder_layerdrop": 0.05, "dropout_input": 0.0, "conv_pos": 128, "conv_pos_groups": 16,
         "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True,
         "finetuned_model": False}
SEEDS = {"tiny": 1, "prenorm": 2, "iter3": 3}
SECONDS = (1.0, 1.5, 2.3)


def make_clips() -> tuple[np.ndarray, np.ndarray]:
    """(concatenated int16 samples, lengths) of the fixture clips: noise plus tones, each its own seed."""
    clips = []
    for i, seconds in enumerate(SECONDS):
        rng = np.random.default_rng(100 + i)
        t = np.arange(int(seconds * 16_000)) / 16_000
        x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (220 * (i + 1)) * t)
        x += 0.1 * np.sin(2 * np.pi * 3_000 * t) * (1 + np.sin(2 * np.pi * 4 * t))
        clips.append(np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16))
    return np.concatenate(clips), np.array([len(c) for c in clips])


def split(pcm: np.ndarray, lengths: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(c.astype(np.float32) / 32768) for c in np.split(pcm, np.cumsum(lengths)[:-1])]


def reference_model(ref, cfg: dict, seed: int, path: Path, extra: dict | None = None):
    """The reference's model with the seeded weights, saved in the official format and loaded back as its README
    says; the key set and shapes must be the project's."""
    model = ref.BEATs(ref.BEATsConfig(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.BEATs({**ours.DEFAULTS, **cfg}).state_dict().items()}
    assert shapes == mine, f"state dict names/shapes differ: {set(shapes) ^ set(mine)}"
    model.load_state_dict(ours.random_weights(shapes, seed), strict=True)
    torch.save({"cfg": cfg, "model": model.state_dict(), **(extra or {})}, path)
    ckpt = torch.load(path, weights_only=True)
    model = ref.BEATs(ref.BEATsConfig(ckpt["cfg"]))
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()


@torch.no_grad()
def hidden_states(model, clip: torch.Tensor) -> list[np.ndarray]:
    """Every hidden state of one clip alone (the layers' input, each layer's output; the last one as the model
    returns it) as N x D arrays, caught with hooks on the reference's encoder."""
    caught = []
    layers = model.encoder.layers
    hooks = [layers[0].register_forward_pre_hook(lambda m, args, kw: caught.append(args[0] if args else kw["x"]),
                                                 with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, args, out: caught.append(out[0])) for layer in layers]
    encoded = []
    hooks.append(model.encoder.register_forward_hook(lambda m, args, out: encoded.append(out[0])))
    try:
        model.extract_features(clip[None], padding_mask=torch.zeros(1, len(clip), dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    states = [c.transpose(0, 1)[0].numpy() for c in caught]  # T x B x C -> N x D
    states[-1] = encoded[0][0].numpy()  # the encoder's output (after the final norm of a pre-norm model)
    return states


def all_tokens(model, clips) -> dict[str, np.ndarray]:
    return {f"tokens_{i}": np.stack(hidden_states(model, c)) for i, c in enumerate(clips)}


@torch.no_grad()
def padded_batch(model, clips) -> dict[str, np.ndarray]:
    """The reference's tokens and token padding mask of the clips as one zero-padded batch."""
    n = max(len(c) for c in clips)
    batch = torch.stack([torch.nn.functional.pad(c, (0, n - len(c))) for c in clips])
    mask = torch.arange(n)[None, :] >= torch.tensor([len(c) for c in clips])[:, None]
    x, token_mask = model.extract_features(batch, padding_mask=mask)
    return {"batch_last": x.numpy(), "batch_mask": token_mask.numpy()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path,
                        help="the reference's beats/ folder (BEATs.py, backbone.py, modules.py)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/beats")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.reference.resolve()))
    import BEATs as ref  # noqa: N813 - the reference module, found on the path just added

    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    pcm, lengths = make_clips()
    np.savez_compressed(args.out / "clips.npz", pcm=pcm, lengths=lengths)
    clips = split(pcm, lengths)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = reference_model(ref, TINY, SEEDS["tiny"], tmp / "tiny.pt")
        finetuned = reference_model(ref, TINY_FINETUNED, SEEDS["tiny"], tmp / "tiny_ft.pt",
                                    {"label_dict": {i: f"/m/{i}" for i in range(5)}})
        ft_tokens = [hidden_states(finetuned, c)[-1] for c in clips]
        np.savez_compressed(
            args.out / "tiny.npz", cfg=json.dumps(TINY), seed=SEEDS["tiny"], cfg_finetuned=json.dumps(TINY_FINETUNED),
            fbank_0=model.preprocess(clips[0][None])[0].numpy(), **all_tokens(model, clips),
            **padded_batch(model, clips), **{f"finetuned_last_{i}": t for i, t in enumerate(ft_tokens)})

        model = reference_model(ref, PRENORM, SEEDS["prenorm"], tmp / "prenorm.pt")
        np.savez_compressed(args.out / "prenorm.npz", cfg=json.dumps(PRENORM), seed=SEEDS["prenorm"],
                            **all_tokens(model, clips))

        model = reference_model(ref, ITER3, SEEDS["iter3"], tmp / "iter3.pt")
        out = {}
        for i, c in enumerate(clips):
            states = hidden_states(model, c)
            out[f"layer_means_{i}"] = np.stack([s.mean(0) for s in states])
            out[f"first_tokens_{i}"] = states[-1][:16]
            out[f"embedding_last_{i}"] = ours.clip_embedding(states[-1])
            out[f"embedding_6_{i}"] = ours.clip_embedding(states[6])
            out[f"embedding_average_{i}"] = ours.clip_embedding(np.mean(states[1:], axis=0))
        np.savez_compressed(args.out / "iter3.npz", cfg=json.dumps(ITER3), seed=SEEDS["iter3"], **out)
    for f in sorted(args.out.glob("*.npz")):
        print(f"{f}: {f.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
