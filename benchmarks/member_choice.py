"""Label-free choice of a detector per machine (issue 26 item 3), measured: would pseudo-anomalies made from a
machine's own normal train clips pick its best detector?

    python benchmarks/member_choice.py ROOT [--members local pooled rhythm bands [fusion]] [--json OUT]

For each dev machine of the corpus at ROOT (log-mel frames, single process):
- the criterion, from normal train clips only: every 5th source train clip is held out; each member detector is
  fitted on the rest and scores the held-out clips and three generic perturbations of them, made on their log-mel
  frames (none is one of the generator's anomaly kinds): ``shuffle`` (the clip cut into 0.5 s pieces put back in a
  random order: its spectrum kept, its timing broken), ``band`` (+6 dB in one random eighth of the mel bands, the
  whole clip) and ``stall`` (one random second replaced by the clip's quietest frame, repeated). The criterion is
  the member's mean AUC of held-out clips against their perturbations;
- the truth: each member (and ``fusion``, the default) fitted on all train clips, its test clips' h-mean of AUC_s,
  AUC_t and pAUC, as the official evaluator computes them.
``fusion`` may be a candidate too (``--members ... fusion``).
Prints per machine the criterion and h-mean of each member, the member chosen and the best one; then the official
score (h-mean over every machine's AUC_s, AUC_t, pAUC) of each member, of ``fusion``, of the per-machine choice and
of the per-machine best (an oracle). A benchmark of a criterion, not a detector: nothing here changes a run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score

from asd_ray.config import RunConfig, load_config
from asd_ray.data.layout import discover
from asd_ray.detect import embed_records, frame_feature_kwargs, machine_splits, plan_records, take
from asd_ray.detectors.registry import REGISTRY
from asd_ray.models.backbones import frame_extractor
from asd_ray.scoring.metrics import floored_hmean, machine_metrics, official_score

FRAMES_PER_SECOND = 16_000 / 512


def perturb(frames: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """One generic perturbation of one clip's (T x n_mels) log-mel frames (dB)."""
    out = frames.copy()
    if how == "shuffle":
        piece = int(round(0.5 * FRAMES_PER_SECOND))
        pieces = [out[i:i + piece] for i in range(0, len(out), piece)]
        return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
    if how == "band":
        width = max(1, out.shape[1] // 8)
        start = int(rng.integers(0, out.shape[1] - width + 1))
        out[:, start:start + width] += 6.0
        return out
    if how == "stall":
        span = min(len(out) - 1, int(round(FRAMES_PER_SECOND)))
        start = int(rng.integers(0, len(out) - span))
        out[start:start + span] = out[int(np.argmin(out.mean(1)))]
        return out
    raise ValueError(how)


PERTURBATIONS = ("shuffle", "band", "stall")


def machine_rows(config, member: str, train, train_ids, train_domains, test, labels, test_domains, held, seed):
    """(criterion: {perturbation: AUC}, truth: the evaluator's metrics) of one member on one machine."""
    keep = [i for i in range(len(train)) if i not in held]
    det = REGISTRY.make(config, member)
    det.fit(take(train, keep), [train_ids[i] for i in keep], domains=[train_domains[i] for i in keep])
    normal = det.score(take(train, held))
    rng = np.random.default_rng(seed)
    crit = {}
    for how in PERTURBATIONS:
        fake = det.score([perturb(train[i], how, rng) for i in held])
        crit[how] = float(roc_auc_score([0] * len(normal) + [1] * len(fake), np.concatenate([normal, fake])))
    det = REGISTRY.make(config, member)
    det.fit(train, train_ids, domains=train_domains)
    return crit, machine_metrics(labels, test_domains, det.score(test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--members", nargs="+", default=["local", "pooled", "rhythm", "bands"])
    parser.add_argument("--json")
    args = parser.parse_args()
    config = load_config(RunConfig, None, [])
    records, _ = plan_records(discover([args.root]))
    records = [r for r in records if r.dataset == "dev"]
    features, kept, rejects, _ = embed_records(records, frame_extractor(**frame_feature_kwargs(config)),
                                               config.preprocess, config.embed.batch_size)
    assert not rejects, rejects[:3]
    out = {"root": args.root, "members": args.members, "machines": {}}
    truth: dict[str, dict[str, dict]] = {m: {} for m in dict.fromkeys([*args.members, "fusion", "chosen", "best"])}
    for k, split in enumerate(machine_splits(kept)):
        train = take(features, split.train)
        ids = [kept[i].filename for i in split.train]
        domains = [kept[i].domain for i in split.train]
        test = take(features, split.test)
        labels = [int(kept[i].label == "anomaly") for i in split.test]
        test_domains = [kept[i].domain for i in split.test]
        held = [j for j, i in enumerate(split.train) if kept[i].domain == "source"][::5]
        rows = {}
        for member in args.members:
            crit, metrics = machine_rows(config, member, train, ids, domains, test, labels, test_domains, held, k)
            rows[member] = {"criterion": crit, "criterion_mean": float(np.mean(list(crit.values()))),
                            "hmean": floored_hmean([metrics["auc_source"], metrics["auc_target"], metrics["pauc"]]),
                            "metrics": metrics}
            truth[member][split.machine] = metrics
        fusion = REGISTRY.make(config, "fusion")
        fusion.fit(train, ids, domains=domains)
        truth["fusion"][split.machine] = machine_metrics(labels, test_domains, fusion.score(test))
        chosen = max(args.members, key=lambda m: rows[m]["criterion_mean"])
        best = max(args.members, key=lambda m: rows[m]["hmean"])
        truth["chosen"][split.machine], truth["best"][split.machine] = rows[chosen]["metrics"], rows[best]["metrics"]
        out["machines"][split.machine] = {"members": rows, "chosen": chosen, "best": best}
        print(f"{split.machine:14s} chosen {chosen:7s} best {best:7s} "
              + " ".join(f"{m} {rows[m]['criterion_mean']:.3f}/{rows[m]['hmean']:.3f}" for m in args.members),
              flush=True)
    out["official"] = {name: official_score(per) for name, per in truth.items()}
    out["picked_best"] = sum(v["chosen"] == v["best"] for v in out["machines"].values())
    print(json.dumps({"official": out["official"], "picked_best": out["picked_best"],
                      "machines": len(out["machines"])}))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
