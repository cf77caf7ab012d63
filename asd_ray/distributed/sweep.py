"""Ray Tune sweeps over the detector's choices, with the official h-mean on dev data as the objective.

A space file (``configs/sweep_*.yaml``) holds ``base`` (config overrides for every trial), ``grid``
(dotted keys -> lists: every combination) and ``sample`` (dotted keys -> ``{choice: [...]}``,
``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}``), ``num_samples``.

Embedding choices (``embed.*``, ``preprocess.*``) must be in ``grid``: the driver embeds once per
distinct choice with the Ray Data pipeline before any trial starts, and every trial reads the Parquet
cache (no trial embeds). A trial is the main job's ``run_detection`` with the trial's config, so the
best trial's metrics are those ``asd-ray run --config best_config.yaml`` gives. A space with
``finetune.*`` keys fine-tunes in each trial through the same ``finetune()`` (its ``TorchTrainer``),
then scores with the resulting checkpoint as backbone.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from asd_ray.config import ConfigError, RunConfig, from_dict, save_config, to_dict, with_overrides
from asd_ray.data.layout import discover
from asd_ray.detect import check_batch_post, plan_records, run_detection
from asd_ray.detectors import features_key, uses_noise
from asd_ray.distributed.run import check_resources, embedder_for, features_table
from asd_ray.distributed.session import ensure_ray
from asd_ray.scoring.metrics import MetricError

EMBEDDING_SECTIONS = ("embed.", "preprocess.")
SAMPLERS = ("choice", "uniform", "loguniform", "randint")
log = logging.getLogger(__name__)

OBJECTIVE = "official_score"  # of dev_data only
EVAL_SCORE = "eval_official_score"  # shown beside it, never optimised
ROW_KEYS = (OBJECTIVE, EVAL_SCORE, "auc_source", "auc_target", "pauc", "checkpoint", "final_loss", "config_json")


@dataclass(frozen=True)
class SweepSpace:
    """A parsed space file."""

    base: dict[str, Any]
    grid: dict[str, list]
    sample: dict[str, dict]
    num_samples: int = 1
    trial_cpus: float = 0.5

    @property
    def finetunes(self) -> bool:
        return any(k.startswith("finetune.") for k in [*self.grid, *self.sample])


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_space(path: str | Path) -> SweepSpace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep space not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = sorted(set(raw) - {"base", "grid", "sample", "num_samples", "trial_cpus"})
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown}; use base, grid, sample, num_samples, trial_cpus")
    grid = _flatten(raw.get("grid") or {})
    sample = raw.get("sample") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid {key}: expected a non-empty list, got {values!r}")
    for key, spec in sample.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS):
            raise ConfigError(f"{p}: sample {key}: expected one of {SAMPLERS} with its arguments, got {spec!r}")
        if key.startswith(EMBEDDING_SECTIONS):
            raise ConfigError(f"{p}: sample {key}: embedding choices go under grid (each is embedded once, up front)")
    space = SweepSpace(base=_flatten(raw.get("base") or {}), grid=grid, sample=dict(sample),
                       num_samples=int(raw.get("num_samples", 1)), trial_cpus=float(raw.get("trial_cpus", 0.5)))
    with_overrides(RunConfig(), {**space.base, **{k: v[0] for k, v in grid.items()}})  # bad keys fail here
    if "post.median_window" in sample:
        raise ConfigError(f"{p}: sample post.median_window: a sweep's trials are batch runs, which take no median filter")
    for window in [space.base.get("post.median_window", 1), *grid.get("post.median_window", [])]:
        try:
            check_batch_post(with_overrides(RunConfig(), {"post.median_window": window}).post)
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
    return space


def embedding_variants(space: SweepSpace, config: RunConfig) -> list[RunConfig]:
    """One config per distinct feature table the grid's trials read (``features_key``: the clip embeddings of a
    backbone and layer, or the log-mel frames of a frame detector), what the driver computes up front, once each.
    A sampled setting that changes the features leaves them to its trial."""
    variants: dict = {}
    for combo in itertools.product(*space.grid.values()):
        variant = with_overrides(config, dict(zip(space.grid, combo)))
        variants.setdefault(features_key(variant), variant)
    return list(variants.values())


def _param_space(space: SweepSpace) -> dict:
    from ray import tune

    params: dict[str, Any] = {k: tune.grid_search(v) for k, v in space.grid.items()}
    for key, spec in space.sample.items():
        (kind, args), = spec.items()
        params[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return params


def _metrics_row(metrics: dict | None) -> dict:
    """A trial's row: the dev_data official score (the objective) and mean AUC_s, AUC_t, pAUC over the dev
    machines; the eval_data official score beside it when eval labels are known (never the objective)."""
    splits = (metrics or {}).get("splits", {})
    if "dev_data" not in splits:
        raise MetricError("the sweep's objective is the dev_data official score, and the roots have no dev_data "
                          "test clips with labels")
    machines = splits["dev_data"]["machines"].values()
    mean = lambda key: sum(m[key] for m in machines) / len(machines)  # noqa: E731
    row = {OBJECTIVE: splits["dev_data"]["official_score"], "auc_source": mean("auc_source"),
           "auc_target": mean("auc_target"), "pauc": mean("pauc"), "metrics_json": json.dumps(metrics)}
    if "eval_data" in splits:
        row[EVAL_SCORE] = splits["eval_data"]["official_score"]
    return row


def trial(params: dict, *, roots: Sequence[str], base: dict, machines: list[str] | None) -> dict:
    """One trial: the main job's detection with the trial's config (fine-tuning first if the space asks)."""
    config = with_overrides(from_dict(RunConfig, base), params)
    extra = {}
    if any(k.startswith("finetune.") for k in params):
        from ray import tune

        from asd_ray.distributed.finetune import finetune  # torch: only a fine-tuning trial's process needs it

        name = f"{config.finetune.name or 'sweep'}-{tune.get_context().get_trial_id()}"
        config = with_overrides(config, {"finetune.name": name})
        result = finetune(roots, config, machines)
        config = with_overrides(config, {"embed.backbone": str(result.checkpoint)})
        extra = {"checkpoint": str(result.checkpoint), "final_loss": result.steps[-1]["loss"] if result.steps else None}
    report = run_detection(roots, config, embedder_for(config), None, machines)
    return {**_metrics_row(report.metrics), **extra, "config_json": json.dumps(to_dict(config))}


@dataclass
class SweepResult:
    table: list[dict]  # one row per trial, best first
    best_config: RunConfig
    best_config_path: Path
    embedded: list[str]  # Parquet folders the driver wrote (embedding choices that were not cached yet)
    cached: list[str]  # Parquet folders that were already there


def trial_configs(space: SweepSpace, base: RunConfig) -> list[RunConfig]:
    """Every distinct config a trial can run as far as resources go: each grid combination, with each ``choice``
    of the sampled keys and the lower end of the sampled ranges (what a trial needs depends on choices, not on
    where in a range it samples)."""
    keys = list(space.grid) + list(space.sample)
    options = [space.grid[k] for k in space.grid] + [
        (args if kind == "choice" else [args[0]]) for kind, args in (next(iter(v.items())) for v in space.sample.values())]
    return [with_overrides(base, dict(zip(keys, combo))) for combo in itertools.product(*options)]


def check_space_settings(space: SweepSpace, config: RunConfig, given: Iterable[str] = ()) -> None:
    """A setting of the space (base, grid, sample) or among ``given`` (the command line's and config file's keys)
    that no trial's detector reads is a ``ConfigError`` naming what applies instead, before any trial starts (a
    grid over ``bank.k`` with the default detector would give trials that differ in nothing)."""
    from asd_ray.detectors import unread_settings

    configs = trial_configs(space, with_overrides(config, space.base))
    keys = sorted({*given, *space.base, *space.grid, *space.sample} - {"detector"})
    lines = []
    for key in keys:
        unread = [unread_settings(c, [key], [c.detector]) for c in configs]
        if all(unread):  # read by no trial
            lines.append(unread[0][0])
    if lines:
        raise ConfigError("; ".join(lines))


def trial_count(space: SweepSpace) -> int:
    """How many trials the space gives: every grid combination, ``num_samples`` times."""
    n = 1
    for values in space.grid.values():
        n *= len(values)
    return n * space.num_samples


def _trial_progress(total: int):
    """A Tune callback that moves the sweep's bar as trials end and shows how many run and wait."""
    from ray import tune

    from asd_ray.progress import advance, note

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.done = 0

        def _show(self, trials) -> None:
            running = sum(1 for t in trials if t.status == "RUNNING")
            note(f"{self.done} done, {running} running, {max(0, total - self.done - running)} pending")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            advance()
            self._show(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial, **info)

    return TrialProgress()


def sweep(roots: Sequence[str | Path], space: SweepSpace, config: RunConfig, out_dir: str | Path,
          machines: Iterable[str] | None = None, name: str | None = None) -> SweepResult:
    """Run every trial of ``space`` on Ray Tune; write ``sweep.csv``, ``sweep.md`` (sorted by the official
    score) and ``best_config.yaml`` (a complete config for ``asd-ray run --config``) to ``out_dir``.

    Trials run as many at a time as the cluster's CPUs hold with room for each trial's own tasks and workers
    (``resources.sweep_resources``); a space whose trial cannot fit is a ``ConfigError`` before any trial starts."""
    import os

    import ray
    from ray import tune

    from asd_ray.distributed.resources import sweep_resources
    from asd_ray.progress import stage

    check_space_settings(space, config)
    started = ensure_ray(num_cpus=config.ray.num_cpus or None)
    roots = [str(Path(r).resolve()) for r in roots]
    machines = list(machines) if machines else None
    asked = with_overrides(config, space.base)
    have = ray.cluster_resources()
    plan = sweep_resources(trial_configs(space, asked), space.trial_cpus, space.finetunes, have.get("CPU", 0.0),
                           have.get("GPU", 0.0), strict=started)
    log.info("sweep plan: %s", plan.describe())
    base = with_overrides(asked, plan.overrides)
    embedded, cached = [], []
    if not space.finetunes:  # each trial reads its features back from the cache (trials side by side computed
        # the same frames at once, and a frame detector's trials read none of the clip embeddings made for them)
        records = discover(roots, machines, normals_only_roots=base.normals_only_roots)
        for variant in embedding_variants(space, base):
            used, _ = plan_records(records, noise=uses_noise(variant))
            check_resources(variant, strict=started)
            with stage("embed", total=len(used)):
                table = features_table(used, variant)
            (cached if table.from_cache else embedded).append(str(table.path))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    base_tree = to_dict(base)

    def objective(params: dict) -> None:
        tune.report(trial(params, roots=roots, base=base_tree, machines=machines))

    # Ctrl-C ends the command (the CLI shuts Ray down), instead of Tune's own stop that returns unfinished trials
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    total = trial_count(space)
    tuner = tune.Tuner(
        tune.with_resources(objective, {"cpu": space.trial_cpus}),
        param_space=_param_space(space),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=space.num_samples,
                                    max_concurrent_trials=plan.concurrent),
        run_config=tune.RunConfig(name=name or time.strftime("sweep-%Y%m%d-%H%M%S"), storage_path=str(out / "tune"),
                                  verbose=0, callbacks=[_trial_progress(total)]))
    with stage("trials", total=total, unit="trial"):
        grid = tuner.fit()
    rows = []
    for r in grid:
        params = {f"param:{k}": v for k, v in (r.config or {}).items()}
        if r.error is not None or not r.metrics:
            rows.append({OBJECTIVE: float("nan"), "error": str(r.error or "no result"), **params})
            continue
        rows.append({**params, **{k: v for k, v in r.metrics.items() if k in ROW_KEYS}})
    ok = [r for r in rows if r[OBJECTIVE] == r[OBJECTIVE]]
    if not ok:
        raise RuntimeError(f"every trial failed: {[r.get('error') for r in rows]}")
    rows.sort(key=lambda r: -r[OBJECTIVE] if r[OBJECTIVE] == r[OBJECTIVE] else float("inf"))
    best = from_dict(RunConfig, json.loads(rows[0]["config_json"]))
    # the plan's resource settings were for trials side by side: the best config keeps the ones asked for
    best = with_overrides(best, {k: _get(asked, k) for k in plan.overrides})
    best_path = out / "best_config.yaml"
    save_config(best, best_path)
    write_sweep_table(out, rows)
    return SweepResult(table=rows, best_config=best, best_config_path=best_path, embedded=embedded, cached=cached)


def _get(config: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def write_sweep_table(out: Path, rows: list[dict]) -> None:
    """``sweep.csv`` (every column) and ``sweep.md`` (parameters and metrics, best first)."""
    columns = sorted({k for r in rows for k in r if k != "config_json"}, key=lambda k: (not k.startswith("param:"), k))
    with (out / "sweep.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in columns if c.startswith("param:")] + [
        c for c in (OBJECTIVE, "auc_source", "auc_target", "pauc", EVAL_SCORE, "final_loss", "error") if c in columns]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# Sweep (best first; objective: official h-mean on dev data)", "",
             "| " + " | ".join(c.removeprefix("param:") for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in shown) + " |" for r in rows]
    lines += ["", "best config: `best_config.yaml` (`asd-ray run --config best_config.yaml`)"]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
