"""Per anomaly kind AUC of detectors on a synthetic corpus (issue 26: which detector finds which kind).

    python benchmarks/per_kind_auc.py ROOT --style C --seed 11 --run "detector=fusion" \
        --run "detector=fusion;fusion.members=[local, pooled, rhythm]"

Each ``--run`` is a ``;``-separated list of config overrides, run with ``reference_run`` (single process). For each
dev machine: the official h-mean, and per anomaly kind the AUC of the source test normals against that kind's
source test anomalies (the generator gives test anomaly i of a machine its profile's kind i % len(kinds), so the
corpus must be written by ``asd-ray synth`` with the same ``--style`` and ``--seed``). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json

from sklearn.metrics import roc_auc_score

from asd_ray.config import RunConfig, load_config
from asd_ray.data.synth import corpus_style
from asd_ray.detect import reference_run


def per_kind(root: str, style: str, seed: int, overrides: list[str]) -> dict:
    report = reference_run([root], load_config(RunConfig, None, overrides))
    out = {"run": overrides, "official_score": report.metrics["official_score"], "machines": {}}
    hmeans = report.metrics["splits"]["dev_data"]["machines"]
    for machine, res in report.results.items():
        kinds = corpus_style(style).draw(machine, seed).anomaly_kinds
        scores = dict(zip(res.filenames, res.raw_scores))
        normal = [v for f, v in scores.items() if "_source_test_normal_" in f]
        found: dict = {}
        for f, v in scores.items():
            if "_source_test_anomaly_" in f:
                found.setdefault(kinds[int(f.split("_anomaly_")[1][:4]) % len(kinds)], []).append(v)
        out["machines"][machine] = {
            "hmean": hmeans[machine]["hmean"] if machine in hmeans else None,
            "auc_by_kind": {k: roc_auc_score([0] * len(normal) + [1] * len(a), normal + a) for k, a in found.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--style", default="A")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", action="append", required=True, help="';'-separated config overrides")
    args = parser.parse_args()
    for run in args.run:
        print(json.dumps(per_kind(args.root, args.style, args.seed, [o for o in run.split(";") if o])), flush=True)


if __name__ == "__main__":
    main()
