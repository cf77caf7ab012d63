"""End to end: ``asd-ray run`` in fresh processes and caches, its wall time and ``timings_s``, for one or more
checkouts of this project side by side (run by hand, not in CI).

    chrt -f 10 python benchmarks/run_wall.py --data D --code before=/tmp/old --code after=. --repeat 2 \\
        --json benchmarks/results_run_wall_cpu2.json -- --detector knn --backbone /tmp/tiny-hubert

Each ``--code NAME=DIR`` is put first on ``PYTHONPATH`` of its runs (the checkout's ``asd_ray`` package); runs
alternate between the checkouts so that a change of load touches them alike. Arguments after ``--`` go to
``asd-ray run``. On a shared machine run it under ``chrt -f 10`` (see ``embed_stage_proxy.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(code: Path, data: str, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "asd_ray.cli", "run", "--data", data, "--out", str(out),
           "--set", f"ray.cache_dir={out / 'cache'}", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   cwd=tempfile.gettempdir())  # not the checkout: its asd_ray must come from PYTHONPATH
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, **metrics["timings_s"], "official_score": metrics["official_score"],
            "clips": metrics["counts"]["embedded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--code", action="append", default=[], help="NAME=DIR of a checkout (default: this one)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: arguments of asd-ray run")
    args = ap.parse_args()
    codes = dict(c.split("=", 1) for c in args.code) or {"this": str(Path(__file__).resolve().parents[1])}
    extra = [a for a in args.run_args if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="asd-run-wall-"))
    result = {"data": args.data, "run_args": extra, "cpu_count": os.cpu_count(), "runs": {name: [] for name in codes}}
    for _ in range(args.repeat):
        for name, code in codes.items():
            run = timed_run(Path(code).resolve(), args.data, work / name, extra)
            result["runs"][name].append(run)
            print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
