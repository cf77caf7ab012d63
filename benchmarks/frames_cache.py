"""The default detector's embedding stage, first run against a second run on the same corpus (issue 23 item 7).

The default detector (fusion) eats log-mel frame matrices; they are cached like clip embeddings
(``docs/cache.md``), so a second ``asd-ray run`` over the same clips and settings reads them back. Goal: the
second run's embedding stage (``timings_s.embed`` in metrics.json) under 10 % of the first's.

    python benchmarks/frames_cache.py --json benchmarks/results_frames_cache_cpu2.json

Without ``--data``, the README's demo corpus is generated first (what ``asd-ray run`` without ``--data`` makes).
Both runs get a fresh process; the cache folder is new for the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: Path, out: Path, cache: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "asd_ray.cli", "run", "--data", str(data), "--out", str(out),
           "--set", f"ray.cache_dir={cache}", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    return {"embed_s": metrics["timings_s"]["embed"], "warm_up_s": metrics["timings_s"].get("warm_up"),
            "wall_s": wall, "clips": metrics["counts"]["embedded"], "official_score": metrics.get("official_score"),
            "cache_said": [line.split(": ", 1)[-1] for line in (out / "run.log").read_text().splitlines()
                           if "log-mel frames" in line and "cache" in line]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="an existing DCASE-layout root (else the demo corpus is generated)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="asd-frames-cache-"))
    data = args.data
    if data is None:
        from asd_ray.cli import demo_corpus

        data = demo_corpus(work)
    cache = work / "cache"
    first = run(data, work / "first", cache)
    second = run(data, work / "second", cache)
    result = {"machine": f"cpu ({os.cpu_count()} cores), load average at the end {os.getloadavg()[0]:.1f}",
              "data": str(data), "detector": "fusion (default)", "first": first, "second": second,
              "goal": "second embed_s < 10 % of the first", "ratio_second_over_first": second["embed_s"] / first["embed_s"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
