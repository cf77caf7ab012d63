"""The ``asd-ray`` command: synth, run, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from asd_ray.config import ConfigError, RunConfig, load_config
from asd_ray.data.layout import DEV_MACHINES, EVAL_MACHINES, LayoutError, discover, summarise

log = logging.getLogger("asd_ray")

# The offline demo corpus: every dev machine, small enough to finish in a few minutes on 2 cores.
DEMO_SIZES = {"train_source": 100, "train_target": 10, "test_per_cell": 25, "supplemental": 2, "seconds": 5.0}


def _add_synth(sub):
    p = sub.add_parser("synth", help="write a synthetic corpus laid out exactly like DCASE 2025 Task 2")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--machines", nargs="*", default=list(DEV_MACHINES), help="dev machine types")
    p.add_argument("--eval-machines", nargs="*", default=list(EVAL_MACHINES), help="eval machine types")
    p.add_argument("--train-source", type=int, default=990)
    p.add_argument("--train-target", type=int, default=10)
    p.add_argument("--test-per-cell", type=int, default=50, help="test clips per domain x label")
    p.add_argument("--supplemental", type=int, default=5, help="noise-only and clean supplemental clips each")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)


def _add_config_args(p):
    p.add_argument("--config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set bank.k=5 (repeatable)")


def _add_run(sub):
    p = sub.add_parser("run", help="embed, build banks, score, decide, write official CSVs and metrics")
    p.add_argument("--data", nargs="*", type=Path, help="DCASE roots; none: generate the synthetic demo corpus")
    p.add_argument("--backbone", help="'logmel' or a HuBERT checkpoint directory / hub id (= --set embed.backbone=)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--machines", nargs="*", help="only these machine types")
    p.add_argument("--local", action="store_true",
                   help="the single-process reference run (no Ray); results equal the Ray run's")
    _add_config_args(p)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="official metrics of a folder of anomaly_score_*.csv files")
    p.add_argument("--scores", required=True, type=Path, help="folder with anomaly_score_<machine>_section_00_test.csv")
    p.add_argument("--data", required=True, type=Path, help="data root with the test clips (and eval ground truth)")
    p.add_argument("--machines", nargs="*")


def _add_serve_fleet(sub):
    p = sub.add_parser("serve-fleet", help="score machine streams through per-machine bank actors and a router")
    p.add_argument("--banks", required=True, type=Path, help="saved banks, one folder per machine (asd-ray run writes <out>/banks)")
    p.add_argument("--data", nargs="*", type=Path, default=[], help="DCASE roots: each machine's test clips are one stream")
    p.add_argument("--clips", type=Path, help="a folder of incoming clips of --machine, one stream")
    p.add_argument("--machine", help="machine type of the clips in --clips")
    p.add_argument("--simulate", type=int, default=0, metavar="STREAMS",
                   help="instead: a simulated fleet of this many streams (pre-computed embeddings)")
    p.add_argument("--rate", type=float, default=5.0, help="clips per second per simulated stream")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the simulation")
    p.add_argument("--out", type=Path, default=Path("runs/fleet"))
    _add_config_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asd-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_run(sub)
    _add_evaluate(sub)
    _add_serve_fleet(sub)
    return parser


def run_config(config_path, overrides, backbone=None) -> RunConfig:
    overrides = list(overrides) + ([f"embed.backbone={backbone}"] if backbone else [])
    return load_config(RunConfig, config_path, overrides)


def cmd_synth(args) -> int:
    from asd_ray.data.synth import generate_corpus

    root = generate_corpus(args.out, dev_machines=args.machines, eval_machines=args.eval_machines,
                           train_source=args.train_source, train_target=args.train_target,
                           test_per_cell=args.test_per_cell, supplemental=args.supplemental,
                           seconds=args.seconds, seed=args.seed, workers=args.workers)
    s = summarise(discover([root]))
    print(f"wrote {s['clips']} clips under {root}")
    return 0


def demo_corpus(out: Path) -> Path:
    """Generate (once) the small synthetic corpus the offline demo runs on."""
    from asd_ray.data.synth import generate_corpus

    root = out / "synthetic_data"
    if not (root / "dev_data").is_dir():
        print(f"no --data given: generating the synthetic demo corpus under {root}")
        generate_corpus(root, eval_machines=(), workers=os.cpu_count() or 1, **DEMO_SIZES)
    return root


def cmd_run(args) -> int:
    config = run_config(args.config, args.overrides, args.backbone)
    roots = args.data or [demo_corpus(args.out)]
    if args.local:
        from asd_ray.detect import reference_run as run
    else:
        from asd_ray.distributed.run import ray_run as run
    report = run(roots, config, args.out, args.machines)
    print(f"clips: {report.clips_in} in, {report.clips_embedded} embedded, {len(report.rejects)} rejected, "
          f"{len(report.unused)} unused (see {args.out}/rejects.csv, unused.csv)")
    if report.metrics:
        print(format_metrics(report.metrics))
    print(f"official CSVs, metrics.json and report.md in {args.out}")
    return 0


def format_metrics(metrics: dict) -> str:
    lines = [f"{'machine':<14} {'AUC_s':>7} {'AUC_t':>7} {'pAUC':>7} {'hmean':>7}"]
    for m, v in metrics["machines"].items():
        lines.append(f"{m:<14} {v['auc_source']:7.4f} {v['auc_target']:7.4f} {v['pauc']:7.4f} {v['hmean']:7.4f}")
    lines.append(f"official score (h-mean over all machines): {metrics['official_score']:.4f}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from asd_ray.scoring.files import evaluate_dir

    metrics = evaluate_dir(args.scores, args.data, args.machines)
    print(format_metrics(metrics))
    print(json.dumps(metrics))
    return 0


def cmd_serve_fleet(args) -> int:
    from asd_ray.distributed import streams

    config = run_config(args.config, args.overrides)
    if args.simulate:
        stats = streams.simulate(args.banks, config, args.out, streams=args.simulate, rate_hz=args.rate,
                                 seconds=args.seconds)
        print(json.dumps(dataclasses.asdict(stats)))
        return 0
    if not args.data and args.clips is None:
        raise ConfigError("serve-fleet needs --data ROOT..., --clips DIR --machine M, or --simulate STREAMS")
    results = streams.score_streams(args.banks, config, args.out, roots=args.data, clips=args.clips,
                                    machine=args.machine)
    bad = sum(1 for r in results if r.error)
    print(f"{len(results) - bad} clips scored, {bad} without a score (see {args.out}/rejects.csv); "
          f"per-stream results in {args.out}/streams.csv")
    return 0


COMMANDS = {"synth": cmd_synth, "run": cmd_run, "evaluate": cmd_evaluate, "serve-fleet": cmd_serve_fleet}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from asd_ray.bank.memory_bank import BankError
    from asd_ray.models.backbones import BackboneError
    from asd_ray.scoring.metrics import MetricError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, LayoutError, MetricError, BankError, BackboneError, FileNotFoundError, ValueError) as err:
        print(f"asd-ray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
