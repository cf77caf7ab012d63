"""Where a backbone's forward pass spends its GPU time, and what cuDNN autotuning or batch size would change
(run by hand on a GPU machine; the embedding actor's steady rate is this forward's rate).

    python benchmarks/forward_profile.py /path/to/checkpoint [--batch-size 128] [--seconds 10] [--json out.json]

Measures ``Backbone.embed_padded`` on one batch of random clips, the way the embedding actor calls it:
- ``off``: steady ms per batch as the actor runs it (no cuDNN autotuning);
- ``first_layer_by_conv``, ``positional_by_conv``, ``all_by_conv``: the same with cuDNN's convolution instead of
  the GPU's path for the first conv layer (a matrix product, ``exact_layers.single_channel_conv``), for the
  positional convolution (by FFT, ``exact_layers.grouped_conv_by_fft``), for both (the code before 2026-11-26);
- the 15 operators with the most GPU time over two batches (``torch.profiler``), and the share of the
  convolution kernels;
- ``autotune``: the first batch with ``torch.backends.cudnn.benchmark`` on (the tuning), then steady, on a batch
  8 clips smaller: a shape already run keeps the plan cuDNN chose for it without tuning;
- ``double``: steady with twice the batch (autotuning off);
- ``modules_ms``: GPU milliseconds of one batch per part of a waveform encoder (each conv layer of the feature
  encoder, the positional convolution, the transformer layers together), timed with CUDA events around them.

``conv_share`` counts cuDNN's convolutions only: on a GPU the first layer and the positional convolution are
outside it now (``modules_ms`` times them either way). Every clip has the same length, so the padding-exact GroupNorm's
masked path (batches of mixed lengths) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import time


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steady_ms(fn, repeats: int) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats * 1000


def module_ms(model, run) -> dict[str, float]:
    """GPU milliseconds of one ``run()`` per part of a waveform encoder (CUDA events around each part)."""
    import torch

    parts = {f"conv{i}": m for i, m in enumerate(model.feature_extractor.conv_layers)}
    parts["positional_conv"] = model.encoder.pos_conv_embed
    parts.update({f"layer{i}": m for i, m in enumerate(model.encoder.layers)})
    events: dict[str, list] = {name: [] for name in parts}
    hooks = []
    for name, module in parts.items():
        def pre(_m, _a, name=name):
            events[name].append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            events[name][-1][0].record()

        def post(_m, _a, _o, name=name):
            events[name][-1][1].record()

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    run()
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    ms = {name: round(sum(a.elapsed_time(b) for a, b in pairs), 2) for name, pairs in events.items()}
    layers = sum(v for k, v in ms.items() if k.startswith("layer"))
    return {**{k: v for k, v in ms.items() if not k.startswith("layer")}, "transformer_layers": round(layers, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from asd_ray.models import exact_layers
    from asd_ray.models.backbones import load_backbone

    backbone = load_backbone(args.checkpoint, device=args.device)
    n = int(args.seconds * 16_000)
    clips = np.random.default_rng(0).standard_normal((2 * args.batch_size, n)).astype(np.float32)
    lengths = np.full(2 * args.batch_size, n)
    b = args.batch_size

    def run(size: int = b):
        backbone.embed_padded(clips[:size], lengths[:size])

    out = {"checkpoint": args.checkpoint, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "batch_size": b,
           "seconds": args.seconds}
    run()
    run()
    out["off_ms"] = steady_ms(run, args.repeats)
    out["off_clips_per_s"] = b / out["off_ms"] * 1000
    gpu_paths = {"first_layer": "windows_by_matmul", "positional": "long_kernel_by_fft"}
    for name, switches in {**{n: [f] for n, f in gpu_paths.items()}, "all": list(gpu_paths.values())}.items():
        saved = {f: getattr(exact_layers, f) for f in switches}  # cuDNN's convolution instead of the GPU path(s)
        for f in switches:
            setattr(exact_layers, f, lambda x: False)
        run()
        out[f"{name}_by_conv_ms"] = steady_ms(run, args.repeats)
        for f, fn in saved.items():
            setattr(exact_layers, f, fn)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        run()
        sync()
    events = prof.key_averages()
    timed = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    # On a GPU both an operator's row and its kernels' rows carry the kernels' time: the total is the kernels'.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] if args.device == "cuda" else events
    total = max(sum(getattr(e, timed) for e in kernels), 1e-9)
    top = sorted(events, key=lambda e: getattr(e, timed), reverse=True)[:15]
    out["top_ops"] = [{"op": e.key[:90], "share": round(getattr(e, timed) / total, 3), "calls": e.count} for e in top]
    conv = sum(getattr(e, timed) for e in events if e.key in ("aten::cudnn_convolution", "aten::mkldnn_convolution"))
    out["conv_share"] = round(conv / total, 3)
    print(events.table(sort_by="self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total",
                       row_limit=25))

    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    run(b - 8)
    sync()
    out["autotune_first_batch_s"] = time.perf_counter() - t
    out["autotune_ms"] = steady_ms(lambda: run(b - 8), args.repeats)
    out["autotune_clips_per_s"] = (b - 8) / out["autotune_ms"] * 1000
    torch.backends.cudnn.benchmark = False

    run(2 * b)
    out["double_ms"] = steady_ms(lambda: run(2 * b), max(2, args.repeats // 2))
    out["double_clips_per_s"] = 2 * b / out["double_ms"] * 1000
    if args.device == "cuda" and hasattr(backbone.model, "feature_extractor"):
        out["modules_ms"] = module_ms(backbone.model, run)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
