"""`asd-ray run` (Ray) against `asd-ray run --local` per detector: official scores and whether every machine's
score CSV is the same byte for byte (benchmarks/results_ray_vs_local/README.txt has the commands).

    python benchmarks/ray_vs_local.py NAME=LOCAL_DIR,RAY_DIR [...] --json OUT

LOCAL_DIR and RAY_DIR are `asd-ray compare [--local] --out` folders of one corpus: <dir>/<detector>/metrics.json
and <dir>/<detector>/anomaly_score_*.csv, as `asd-ray run --detector <detector>` writes them.
"""

import argparse
import json
from pathlib import Path


def detector_pair(local: Path, ray: Path) -> dict:
    """Official score of each path, their difference, and the machines whose score CSVs differ."""
    ml, mr = (json.loads((d / "metrics.json").read_text()) for d in (local, ray))
    csvs = sorted(p.name for p in local.glob("anomaly_score_*.csv"))
    differ = [n for n in csvs if (local / n).read_bytes() != (ray / n).read_bytes()]
    return {"local": ml["official_score"], "ray": mr["official_score"],
            "ray_minus_local": mr["official_score"] - ml["official_score"],
            "machines": len(csvs), "score_csvs_differing": differ,
            "timings_s": {"local": ml["timings_s"], "ray": mr["timings_s"]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="+", help="NAME=LOCAL_DIR,RAY_DIR")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {}
    for item in args.pairs:
        name, dirs = item.split("=", 1)
        local, ray = (Path(d) for d in dirs.split(","))
        done = sorted(p.parent.name for p in local.glob("*/metrics.json") if (ray / p.parent.name / "metrics.json").is_file())
        out[name] = {det: detector_pair(local / det, ray / det) for det in done}
        for det, r in out[name].items():
            print(f"{name:8} {det:18} local {r['local']:.4f}  ray {r['ray']:.4f}  diff {r['ray_minus_local']:+.2e}  "
                  f"score CSVs differing: {len(r['score_csvs_differing'])}/{r['machines']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
