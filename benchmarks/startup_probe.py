"""What an embedding actor's start costs, step by step, in a fresh process (run by hand, on a GPU machine).

    python benchmarks/startup_probe.py /path/to/checkpoint [--device cuda]

Prints seconds for: import torch, import transformers' HuBERT, CUDA context, from_pretrained, copy to the
device, first forward of one 10 s clip (kernel selection), second forward.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t, out = time.perf_counter(), {}

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        out[name] = round(now - t, 3)
        t = now

    import torch
    mark("import_torch")
    from transformers import AutoModel  # noqa: F401
    from transformers.models.hubert import modeling_hubert  # noqa: F401
    mark("import_transformers_hubert")
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    mark("cuda_context")
    from asd_ray.models.backbones import load_backbone
    mark("import_asd_ray_backbones")
    backbone = load_backbone(args.checkpoint, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    mark("load_backbone_to_device")
    import numpy as np
    clips = np.random.default_rng(0).standard_normal((128, 160_000)).astype(np.float32)
    lengths = np.full(128, 160_000)
    backbone.embed_padded(clips, lengths)
    mark("first_forward_batch128")
    backbone.embed_padded(clips, lengths)
    mark("second_forward_batch128")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
