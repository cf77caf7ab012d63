"""Memory and scoring cost of saved detectors: what a bank actor holds and how long one clip takes.

    python benchmarks/detector_cost.py --banks runs/full/banks --data /tmp/full [--clips 50] [--json out.json]

For each machine under ``--banks``: the detector kind, its members, the bytes of its stored vectors,
its load time, and the time to score one test clip (features computed beforehand: log-mel frames or
the backbone's embedding, as the detector eats), median over ``--clips`` clips, one FAISS thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np

from asd_ray.config import FramesConfig, PreprocessConfig
from asd_ray.data.audio import preprocess_clip
from asd_ray.data.layout import discover
from asd_ray.detectors import load_detector
from asd_ray.models.backbones import load_backbone
from asd_ray.models.frames import LogMelFrames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--banks", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--clips", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    records = [r for r in discover([args.data]) if r.split == "test" and not r.parse_error]
    frames = LogMelFrames(sample_rate=PreprocessConfig().sample_rate, **dataclasses.asdict(FramesConfig()))
    backbone = None
    out = {}
    for d in sorted(p for p in args.banks.iterdir() if (p / "bank.json").is_file()):
        t0 = time.perf_counter()
        det = load_detector(d)
        load_s = time.perf_counter() - t0
        clips = [r for r in records if r.machine == d.name][: args.clips]
        waves = [preprocess_clip(r.path).waveform for r in clips]
        if det.features == "frames":
            feats = frames.embed(waves)
        else:
            backbone = backbone or load_backbone("logmel")
            feats = list(backbone.embed(waves))
        times = []
        for f in feats:
            t = time.perf_counter()
            det.score([f] if det.features == "frames" else np.asarray(f)[None, :])
            times.append(time.perf_counter() - t)
        out[d.name] = {"kind": det.kind, "members": det.size, "stored_mib": round(det.memory_bytes / 2**20, 2),
                       "load_s": round(load_s, 3), "score_ms_per_clip": round(1000 * statistics.median(times), 2)}
        print(d.name, out[d.name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
