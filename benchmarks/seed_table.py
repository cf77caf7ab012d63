"""Official score per corpus and detector from per-machine `asd-ray compare` runs, and per style the mean and
half-range over seeds (README, "Over seeds").

    python benchmarks/seed_table.py CMP_ROOT [--json OUT]

CMP_ROOT/<style><seed>/<machine>/[<sub>/]<detector>/metrics.json, e.g. cmp/A1/ToyCar/fusion/metrics.json (a
machine's detectors may sit one folder down, where they were run by a second compare). The official score
of a corpus is the h-mean over its 7 machines' AUC_source, AUC_target and pAUC, as `asd-ray evaluate` gives
for the machines' CSVs in one folder.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from asd_ray.scoring.metrics import official_score

MACHINES = ("ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve")


def corpus_scores(root: Path) -> dict:
    """{corpus: {detector: {"official_score": s, "hmean": {machine: h}}}} for every complete detector."""
    out: dict = {}
    for corpus in sorted(p.name for p in root.iterdir() if p.is_dir()):
        found: dict = {}
        for f in (root / corpus).glob("*/**/metrics.json"):
            machine = f.relative_to(root / corpus).parts[0]
            found.setdefault(f.parent.name, {})[machine] = json.loads(f.read_text())["splits"]["dev_data"]["machines"][machine]
        for det, per in sorted(found.items()):
            if set(per) == set(MACHINES):
                out.setdefault(corpus, {})[det] = {"official_score": official_score(per),
                                                   "hmean": {m: per[m]["hmean"] for m in MACHINES}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    scores = corpus_scores(args.root)
    for style in sorted({c[0] for c in scores}):
        corpora = sorted(c for c in scores if c[0] == style)
        dets = sorted({d for c in corpora for d in scores[c]})
        print(f"style {style}: " + ", ".join(corpora))
        for d in dets:
            v = [scores[c][d]["official_score"] for c in corpora if d in scores[c]]
            cells = " ".join(f"{scores[c][d]['official_score']:.4f}" if d in scores[c] else "   -   " for c in corpora)
            print(f"  {d:<18} {cells}   mean {np.mean(v):.4f} ± {(max(v) - min(v)) / 2:.4f} (half-range, {len(v)} seeds)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
