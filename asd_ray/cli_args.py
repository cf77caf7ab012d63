"""The ``asd-ray`` command's arguments: one parser per subcommand, each option with its help and its default.

Options that stand for a config key (``--backbone`` is ``--set embed.backbone=``) take no argparse default: the
config's dataclass is the one source of defaults (STYLE, habit 2), and ``--help`` quotes it from there.
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

from asd_ray.config import RunConfig
from asd_ray.data.layout import DEV_MACHINES, DEV_MACHINES_2026, EVAL_MACHINES, EVAL_MACHINES_2026, NOISE_STYLES_2026

# Detector names for `asd-ray compare`: each is config overrides on top of the run's config.
DETECTORS = {
    "knn": ["detector=knn"],  # the seed's bank: backbone embeddings, one bank, k = 3
    "knn-domain-aware": ["detector=knn", "bank.strategy=domain_aware"],
    "knn-density": ["detector=knn", "bank.strategy=domain_aware", "bank.density=true", "bank.k=1"],
    "pooled": ["detector=pooled"],  # mean and std of log-mel frames, domain banks, density k-NN, K = 1
    "pooled-gem": ["detector=pooled", "pooled.pooling=gem"],
    "pooled-reldev": ["detector=pooled", "pooled.pooling=reldev"],
    "pooled-smote": ["detector=pooled", "pooled.oversample_target=100"],
    "rhythm": ["detector=rhythm"],  # pooled's bank over when events come (issue 26), a member of the default fusion
    "bands": ["detector=bands"],  # a pooled bank per group of log-mel bands (as BEAM), not yet a fusion member
    "local": ["detector=local"],
    "fusion": ["detector=fusion"],  # local + pooled + rhythm, z-normalised by their train scores, mean
    # the default until 2026-12-03, exactly: local + pooled, max, the local bank's earlier domain rule (README,
    # "Detection quality")
    "fusion-max": ["detector=fusion", "fusion.members=[local, pooled]", "fusion.combine=max", "local.domain_pick=min"],
    "fusion-mean": ["detector=fusion", "fusion.members=[local, pooled]", "fusion.combine=mean"],
    "fusion-noise": ["detector=fusion", "supplemental.noise_profile=true"],  # minus each machine's noise profile
    "ae-mse": ["detector=ae-mse"],
    "ae-maha": ["detector=ae-maha"],
}
# What `compare` runs unless told otherwise: the default detector, the seed's k-NN bank, the local-feature bank
# and the DCASE AE baseline (the other nine are variants of these; `--detectors all` runs every one).
COMPARE_DEFAULT = list(dict.fromkeys([RunConfig().detector, "knn", "local", "ae-maha"]))


def detector_names(chosen: list[str]) -> list[str]:
    """The detectors ``compare --detectors`` names, in order, once each; ``all``: every one of ``DETECTORS``."""
    return list(DETECTORS) if "all" in chosen else list(dict.fromkeys(chosen))


def config_default(key: str) -> str:
    """The default of a config key (``"embed.backbone"``), as ``--help`` quotes it."""
    value = RunConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return str(value)


def backbone_help() -> str:
    return ("'logmel' or an audio encoder's checkpoint directory / hub id: HuBERT, wav2vec2, WavLM, data2vec-audio, "
            f"AST, Whisper, CLAP (= --set embed.backbone=; default: {config_default('embed.backbone')})")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends each option's default, except where there is none to show: flags
    (default False) and options whose default is None (not given: the config's default applies, which their
    help names). Lists read as they are typed (``ToyCar valve``), not as Python lists."""

    def _get_help_string(self, action):  # the one method ArgumentDefaultsHelpFormatter itself overrides
        if action.default is None or action.default is False or action.default == []:
            return action.help
        if isinstance(action.default, (list, tuple)) and "%(default)" not in (action.help or ""):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


class VersionAction(argparse.Action):
    """``--version``: the package's version and the checkout's commit, looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from asd_ray.version import version_line

        print(version_line())  # on stdout, as argparse's own "version" action prints
        parser.exit()


def _parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def _add_machines(p, what: str = "only these machine types (default: every machine found)"):
    p.add_argument("--machines", nargs="*", metavar="MACHINE", help=what)


def _add_config_args(p):
    p.add_argument("--config", type=Path, help="YAML config (see configs/); default: the built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set bank.k=5 (repeatable)")


def _add_synth(sub):
    p = _parser(sub, "synth", "write a synthetic corpus laid out exactly like DCASE 2025 Task 2 (or 2026: --year)")
    p.add_argument("--out", required=True, type=Path, help="root of the corpus (dev_data/, eval_data/ under it)")
    p.add_argument("--year", type=int, choices=(2025, 2026), default=2025,
                   help="the DCASE set-up: 2025 (mono clips), or 2026 (its machine names and clip lengths; each clip "
                        "two channels, a near and a far microphone, with factory noise that both hear)")
    p.add_argument("--machines", nargs="*", default=None, metavar="MACHINE",
                   help=f"dev machine types to write (dev_data/); default: the year's (2025: {' '.join(DEV_MACHINES)}; "
                        f"2026: {' '.join(DEV_MACHINES_2026)})")
    p.add_argument("--eval-machines", nargs="*", default=None, metavar="MACHINE",
                   help="also write these eval machine types (eval_data/); the flag alone: all of the year's (2025: "
                        f"{' '.join(EVAL_MACHINES)}; 2026: {' '.join(EVAL_MACHINES_2026)}); without it: none")
    p.add_argument("--train-source", type=int, default=990, help="source-domain normal train clips per machine")
    p.add_argument("--train-target", type=int, default=10, help="target-domain normal train clips per machine")
    p.add_argument("--test-per-cell", type=int, default=50, help="test clips per domain x label")
    p.add_argument("--supplemental", type=int, default=None,
                   help="noise-only and clean supplemental clips each (default: 5 for 2025, none for 2026)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length of every clip (default: 10 for 2025; each machine type's for 2026, 6 to 16 s)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same corpus")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing clips (default: this machine's CPUs, %(default)s)")
    p.add_argument("--style", default="A",
                   help="sound models and anomaly kinds: A (rotating / impulsive / broadband), B (reciprocating, "
                        "conveyor, pump, motor, gear; designed independently of A) or C (rhythms: press, sorter, "
                        "indexer, spindle; anomalies in timing and in narrow bands)")
    p.add_argument("--noise", choices=NOISE_STYLES_2026, default=NOISE_STYLES_2026[0],
                   help="--year 2026: how the factory reaches the two microphones: direct (short responses, heard "
                        "coherently by both) or diffuse (a reverberant hall with neighbouring machines; about half "
                        "the noise at each microphone incoherent with the other's)")


def _add_run(sub):
    p = _parser(sub, "run", "embed, build banks, score, decide, write official CSVs and metrics")
    p.add_argument("--data", nargs="*", type=Path, metavar="ROOT",
                   help="DCASE roots; none: generate the synthetic demo corpus under --out")
    p.add_argument("--backbone", help=backbone_help())
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the CSVs, metrics and report")
    _add_machines(p)
    p.add_argument("--local", action="store_true",
                   help="the single-process reference run (no Ray); results equal the Ray run's")
    p.add_argument("--detector", choices=typing.get_args(typing.get_type_hints(RunConfig)["detector"]),
                   help="clip k-NN bank (backbone or pooled log-mel), local-feature bank, the DCASE AE baseline "
                        f"or a fusion (= --set detector=; default: {config_default('detector')})")
    _add_config_args(p)


def _add_compare(sub):
    p = _parser(sub, "compare", "run several detectors on the same data; one table and ROC plots")
    p.add_argument("--data", nargs="*", type=Path, metavar="ROOT", help="DCASE roots; none: the synthetic demo corpus")
    p.add_argument("--detectors", nargs="+", choices=[*DETECTORS, "all"], default=COMPARE_DEFAULT, metavar="NAME",
                   help=f"detectors to run, of: {', '.join(DETECTORS)}; 'all': every one")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.md, plots, one run each")
    _add_machines(p)
    p.add_argument("--local", action="store_true", help="single-process runs (no Ray)")
    _add_config_args(p)


def _add_evaluate(sub):
    p = _parser(sub, "evaluate", "official metrics, per split, of a folder of anomaly_score_*.csv files")
    p.add_argument("--scores", required=True, type=Path,
                   help="folder with anomaly_score_<machine>_section_00_test.csv (and decision_result_*.csv)")
    p.add_argument("--data", required=True, type=Path,
                   help="data root with the test clips (eval ground truth: eval_data/ground_truth_{data,domain}/)")
    p.add_argument("--eval-list", type=Path,
                   help="eval ground truth from the baseline repo's single list (datasets/eval_data_list_<year>.csv)")
    p.add_argument("--out", type=Path, help="also write metrics.json and evaluator/<split>/<system>_result.csv here "
                                            "(system: the --scores folder's name); default: print metrics as JSON")
    _add_machines(p)


def _add_serve_fleet(sub):
    p = _parser(sub, "serve-fleet", "score machine streams through per-machine bank actors and a router")
    p.add_argument("--banks", required=True, type=Path,
                   help="saved banks, one folder per machine (asd-ray run writes <out>/banks)")
    p.add_argument("--data", nargs="*", type=Path, default=[], metavar="ROOT",
                   help="DCASE roots: each machine's test clips are one stream")
    p.add_argument("--clips", type=Path, help="a folder of incoming clips of --machine, one stream")
    p.add_argument("--machine", help="machine type of the clips in --clips")
    p.add_argument("--simulate", type=int, default=0, metavar="STREAMS",
                   help="instead: a simulated fleet of this many streams, features computed beforehand: of the test "
                        "clips of --data (needed for frame detectors such as fusion), else clip-bank members")
    p.add_argument("--rate", type=float, default=5.0, help="clips per second per simulated stream")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the simulation")
    p.add_argument("--out", type=Path, default=Path("runs/fleet"), help="folder for streams.csv, rejects.csv, run.log")
    _add_config_args(p)


def _add_serve(sub):
    p = _parser(sub, "serve", "HTTP scoring service on Ray Serve over per-machine bank actors "
                              "(POST /score, POST /normals, GET /machines, GET /healthz)")
    p.add_argument("--banks", required=True, type=Path,
                   help="saved banks, one folder per machine (asd-ray run writes <out>/banks)")
    p.add_argument("--host", help=f"address to listen on (= --set serve.host=; default: {config_default('serve.host')})")
    p.add_argument("--port", type=int,
                   help=f"port of Serve's HTTP proxy (= --set serve.port=; default: {config_default('serve.port')})")
    p.add_argument("--allow-unauthenticated-writes", action="store_true",
                   help="without serve.token, let POST /normals change the banks anyway; only with a loopback "
                        "--host (127.0.0.1), where only this machine's users reach it "
                        "(= --set serve.allow_unauthenticated_writes=true)")
    p.add_argument("--block", action="store_true",
                   help="keep this command running after deploying on a running Ray (a Ray this command starts "
                        "itself always runs until Ctrl-C)")
    p.add_argument("--stop", action="store_true",
                   help="instead: stop the service running over --banks on the running Ray (its application, "
                        "Serve when nothing else runs on it, its bank actors); same --set serve.app_name, fleet.*")
    p.add_argument("--out", type=Path, default=Path("runs/serve"),
                   help="folder of serve.log: the log lines of Ray, Serve and asd-ray (the console shows their "
                        "errors only; -v shows everything)")
    _add_config_args(p)


def _add_finetune(sub):
    p = _parser(sub, "finetune", "self-supervised masked-prediction fine-tuning of a waveform backbone (Ray Train)")
    p.add_argument("--data", nargs="+", type=Path, required=True, metavar="ROOT",
                   help="corpus roots (normal train clips of all machines)")
    p.add_argument("--init", help="checkpoint directory or hub id to start from "
                                  f"(= --set finetune.init=; default: {config_default('finetune.init')})")
    p.add_argument("--workers", type=int,
                   help=f"DDP workers (= --set finetune.workers=; default: {config_default('finetune.workers')})")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (= --set finetune.use_gpu=yes; default: "
                                                      f"{config_default('finetune.use_gpu')}, a GPU when there is one)")
    _add_machines(p)
    _add_config_args(p)


def _add_sweep(sub):
    p = _parser(sub, "sweep", "Ray Tune sweep; objective: the official h-mean on dev data")
    p.add_argument("--data", nargs="+", type=Path, required=True, metavar="ROOT", help="dev roots (test labels needed)")
    p.add_argument("--space", type=Path, required=True, help="sweep space (see configs/sweep_*.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="folder for sweep.md, the best config, run.log")
    _add_machines(p)
    _add_config_args(p)


def _add_embed(sub):
    p = _parser(sub, "embed", "embed a corpus with the Ray Data pipeline into the Parquet cache")
    p.add_argument("--data", nargs="+", type=Path, required=True, metavar="ROOT", help="DCASE roots to embed")
    p.add_argument("--backbone", help=backbone_help())
    _add_machines(p)
    p.add_argument("--out", type=Path, default=Path("runs/embed"),
                   help="folder for run.log, rejects.csv and unused.csv (the embeddings go to ray.cache_dir)")
    _add_config_args(p)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The ``asd-ray`` parser: global options, then one subcommand."""
    parser = argparse.ArgumentParser(prog="asd-ray", description=description, formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction,
                        help="print asd-ray's version (and the git commit, run from a checkout) and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug lines of asd-ray, and Ray's own log lines, on the console too "
                             "(otherwise they go to the run's run.log only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_run, _add_evaluate, _add_serve_fleet, _add_serve, _add_finetune, _add_sweep,
                _add_embed, _add_compare):
        add(sub)
    return parser
