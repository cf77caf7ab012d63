"""The re-measured AE cells of issue 28, from the folder ``benchmarks/ae_remeasure.sh`` wrote.

    python benchmarks/ae_pinned_summary.py OUT_DIR [--json FILE]

Per corpus (A1 A2 B1 B2 at reduced size, full_b at full size): how many machines are done, ae-maha's per-machine
h-means and, once all 7 are, its official score beside the one in benchmarks/results_seeds/seeds.json (before the
AE's thread pin); and whether ``pooled``'s per-machine h-means equal seeds.json's (the regenerated corpus is the
one of the tables).
"""

import argparse
import json
from pathlib import Path

from asd_ray.scoring.metrics import official_score

MACHINES = ("ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve")
SEEDS = Path(__file__).resolve().parent / "results_seeds" / "seeds.json"


def _machine(folder: Path, machine: str, detector: str) -> dict | None:
    f = folder / machine / detector / "metrics.json"
    return json.loads(f.read_text())["splits"]["dev_data"]["machines"][machine] if f.is_file() else None


def summary(root: Path) -> dict:
    before = json.loads(SEEDS.read_text())
    out = {}
    for corpus, folder in [*((c, root / "cmp" / c) for c in ("A1", "A2", "B1", "B2")), ("full_b", root / "full_b")]:
        ae = {m: r for m in MACHINES if (r := _machine(folder, m, "ae-maha"))}
        pooled = {m: r for m in MACHINES if (r := _machine(folder, m, "pooled"))}
        row = {"machines_done": len(ae), "hmean": {m: r["hmean"] for m, r in ae.items()}}
        if corpus in before and pooled:
            row["pooled_equals_seeds_json"] = all(
                abs(r["hmean"] - before[corpus]["pooled"]["hmean"][m]) < 1e-9 for m, r in pooled.items())
        if len(ae) == len(MACHINES):
            row["official_score"] = official_score(ae)
            if corpus in before:
                row["official_score_before_the_pin"] = before[corpus]["ae-maha"]["official_score"]
        if len(pooled) == len(MACHINES):
            row["pooled_official_score"] = official_score(pooled)
        out[corpus] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    got = summary(args.root)
    print(json.dumps(got, indent=1))
    if args.json:
        args.json.write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
