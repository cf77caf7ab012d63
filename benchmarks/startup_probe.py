"""What an embedding actor's start costs, step by step, in a fresh process (run by hand, on a GPU machine).

    python benchmarks/startup_probe.py /path/to/checkpoint [--device cuda]

Prints seconds for: import torch, import transformers' HuBERT (not for a BEATs or EAT file, which needs none),
CUDA context, from_pretrained, copy to the device, first forward of a batch of 10 s clips (``--batch``, 128) (kernel
selection), second forward; whether transformers was imported at all, and the total.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128, help="clips of 10 s in the forward passes (1 on a CPU)")
    args = ap.parse_args()
    t, out = time.perf_counter(), {}

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        out[name] = round(now - t, 3)
        t = now

    import torch
    mark("import_torch")
    if not Path(args.checkpoint).is_file():  # a BEATs or EAT file needs no transformers
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
    clips = np.random.default_rng(0).standard_normal((args.batch, 160_000)).astype(np.float32)
    lengths = np.full(args.batch, 160_000)
    backbone.embed_padded(clips, lengths)
    mark(f"first_forward_batch{args.batch}")
    backbone.embed_padded(clips, lengths)
    mark(f"second_forward_batch{args.batch}")
    out["transformers_imported"] = "transformers" in sys.modules
    out["total"] = round(sum(v for v in out.values() if isinstance(v, float)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
