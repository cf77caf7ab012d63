"""The table of benchmarks/channels_2026.sh: official score by noise style, channel handling and detector, the
mean over the seeds with each seed's score; also written as JSON.

    python benchmarks/channels_2026_table.py OUT_DIR [--json benchmarks/results_channels_2026_cpu2.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CHANNELS = ("near", "mix", "far", "cancel", "subtract")
NOISES = ("direct", "diffuse")
DETECTORS = ("fusion", "knn", "local", "ae-maha")


def collect(out: Path) -> dict:
    """{noise: {channels: {detector: {seed: official score}}}} from OUT_DIR/cmp/<noise>_<seed>/<channels>/<detector>."""
    got: dict = {}
    for metrics in sorted(out.glob("cmp/*_*/*/*/metrics.json")):
        detector, channels, run = metrics.parent.name, metrics.parent.parent.name, metrics.parent.parent.parent.name
        noise, seed = run.rsplit("_", 1)
        score = json.loads(metrics.read_text())["official_score"]
        got.setdefault(noise, {}).setdefault(channels, {}).setdefault(detector, {})[seed] = score
    return got


def table(got: dict) -> str:
    lines = []
    for noise, by_channels in sorted(got.items(), key=lambda kv: NOISES.index(kv[0])):
        lines += [f"noise style {noise} (mean over seeds; each seed's in brackets)", "",
                  "| channels | " + " | ".join(DETECTORS) + " |", "|---" * (len(DETECTORS) + 1) + "|"]
        for channels in (c for c in CHANNELS if c in by_channels):
            cells = []
            for detector in DETECTORS:
                seeds = by_channels[channels].get(detector, {})
                cells.append(f"{np.mean(list(seeds.values())):.4f} ({' / '.join(f'{seeds[s]:.4f}' for s in sorted(seeds))})"
                             if seeds else "")
            lines.append(f"| {channels} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    got = collect(args.out)
    print(table(got))
    if args.json:
        args.json.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
