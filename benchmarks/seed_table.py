"""Official score per corpus and detector from per-machine `asd-ray compare` runs, and per style the mean and
half-range over seeds (README, "Over seeds").

    python benchmarks/seed_table.py CMP_ROOT [--json OUT] [--merge EARLIER_JSON] [--rename OLD=NEW ...]
        [--default DETECTOR --singles D1 D2 ...]

CMP_ROOT/<style><seed>/<machine>/[<sub>/]<detector>/metrics.json, e.g. cmp/A1/ToyCar/fusion/metrics.json (a
machine's detectors may sit one folder down, where they were run by a second compare). The official score
of a corpus is the h-mean over its 7 machines' AUC_source, AUC_target and pAUC, as `asd-ray evaluate` gives
for the machines' CSVs in one folder.

``--merge`` adds the corpora and detectors of an earlier ``--json`` that CMP_ROOT lacks (its runs are gone,
their per-machine h-means kept); ``--rename`` renames detectors (of both) first. With ``--default``, each style
is checked against issue 26's bar: the default's mean over seeds at least every single detector's (``--singles``)
and AE-Maha's + 5 pp, and on no corpus a machine's h-mean more than 5 pp below the best single detector's there.
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


def merged(scores: dict, earlier: dict, renames: dict[str, str]) -> dict:
    """``scores`` with the corpora and detectors of ``earlier`` it lacks, detectors of both renamed."""
    out: dict = {}
    for table in (earlier, scores):  # scores last: what was run now wins
        for corpus, dets in table.items():
            for det, v in dets.items():
                out.setdefault(corpus, {})[renames.get(det, det)] = v
    return out


def bar_check(scores: dict, style: str, default: str, singles: list[str], margin: float = 0.05) -> list[str]:
    """What keeps ``default`` from issue 26's bar on ``style`` (empty: it meets it)."""
    corpora = sorted(c for c in scores if c[0] == style)
    mean = {d: np.mean([scores[c][d]["official_score"] for c in corpora]) for d in [default, *singles]
            if all(d in scores[c] for c in corpora)}
    if default not in mean:
        return [f"{style}: {default} not run on every corpus"]
    misses = [f"{style}: mean {mean[default]:.4f} below {d}'s {mean[d]:.4f}" for d in singles
              if d in mean and mean[d] > mean[default]]
    if "ae-maha" in mean and mean[default] < mean["ae-maha"] + margin:
        misses.append(f"{style}: mean {mean[default]:.4f} < ae-maha's {mean['ae-maha']:.4f} + {margin}")
    for c in corpora:
        for machine, h in scores[c][default]["hmean"].items():
            best = max((scores[c][d]["hmean"][machine], d) for d in singles if d in scores[c])
            if h < best[0] - margin:
                misses.append(f"{c} {machine}: {h:.4f}, {best[1]} {best[0]:.4f}")
    return misses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--merge", type=Path, help="an earlier --json: its corpora and detectors that ROOT lacks")
    ap.add_argument("--rename", nargs="*", default=[], help="OLD=NEW detector names")
    ap.add_argument("--default", help="check this detector against issue 26's bar")
    ap.add_argument("--singles", nargs="*", default=["local", "pooled", "rhythm", "knn-domain-aware", "ae-maha"])
    args = ap.parse_args()
    renames = dict(r.split("=", 1) for r in args.rename)
    scores = merged(corpus_scores(args.root), json.loads(args.merge.read_text()) if args.merge else {}, renames)
    for style in sorted({c[0] for c in scores}):
        corpora = sorted(c for c in scores if c[0] == style)
        dets = sorted({d for c in corpora for d in scores[c]})
        print(f"style {style}: " + ", ".join(corpora))
        for d in dets:
            v = [scores[c][d]["official_score"] for c in corpora if d in scores[c]]
            cells = " ".join(f"{scores[c][d]['official_score']:.4f}" if d in scores[c] else "   -   " for c in corpora)
            print(f"  {d:<18} {cells}   mean {np.mean(v):.4f} ± {(max(v) - min(v)) / 2:.4f} (half-range, {len(v)} seeds)")
        if args.default:
            misses = bar_check(scores, style, args.default, args.singles)
            print(f"  {args.default} against the bar: " + ("met" if not misses else "; ".join(misses)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
