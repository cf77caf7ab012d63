"""report.md: a header (data, clips, detector, version, date, host), per split the official score and a compact
per-machine table, the settings that differ from the defaults; an overview figure of every machine and per
machine its ROC curves and score distributions (``plots``); compare.md for several detectors. No ray here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from asd_ray.detectors import REGISTRY
from asd_ray.plots import compare_overview_png, compare_roc_png, machine_png, overview_png
from asd_ray.results import RunReport
from asd_ray.scoring.metrics import DECISION_KEYS, SPLITS, in_process


def headline_line(metrics: dict) -> str:
    """The sentence that says which split the top-level official score is."""
    split = metrics["headline_split"]
    n = len(metrics["machines"])
    others = [s for s in metrics["splits"] if s != split]
    return (f"**Official score** ({split}: h-mean of its {n} machine(s)' AUC_source, AUC_target and pAUC): "
            f"**{metrics['official_score']:.4f}**. This is `official_score` at the top of `metrics.json`"
            + (f"; {', '.join(others)} is scored apart below, never mixed in." if others else "."))


# The run's timings as a person reads them (metrics.json keeps the keys); evaluation = score_evaluate - fit_score
TIMING_WORDS = {"discover": "finding the clips", "warm_up": "Ray workers' warm-up", "embed": "embedding",
                "fit_score": "fitting banks and scoring", "evaluate": "metrics", "report": "report"}


def clip_counts(records) -> dict[str, dict[str, int | str]]:
    """``{machine: {"split": "dev_data" | "eval_data" | <dataset>, "train": n, "test": n}}`` of a run's embedded
    clips (``ClipRecord``s), machines in name order; supplemental clips are counted in neither."""
    counts: dict[str, dict[str, int | str]] = {}
    for r in records:
        c = counts.setdefault(r.machine, {"split": f"{r.dataset}_data" if r.dataset in ("dev", "eval") else r.dataset,
                                          "train": 0, "test": 0})
        if r.split in ("train", "test"):
            c[r.split] += 1
    return dict(sorted(counts.items()))


def detector_line(config) -> str:
    """The detector by the name a user gives it (``--detector``), what it is, and what it eats."""
    name = config.detector
    eats = (f"backbone `{config.embed.backbone}`" + (f", layer {config.embed.layer}" if config.embed.layer != "last" else "")
            if REGISTRY.features(config) == "clip" else
            f"log-mel frames ({config.frames.n_mels} mels, hop {config.frames.hop_length})")
    return f"`{name}`: {REGISTRY.describe(config)}; features: {eats}"


def changed_settings(config) -> list[tuple[str, object, object]]:
    """``(dotted key, value, default)`` of every setting of ``config`` that differs from its class's default."""
    from asd_ray.config import to_dict

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    now, default = flat(to_dict(config)), flat(to_dict(type(config)()))
    return [(k, v, default.get(k)) for k, v in now.items() if v != default.get(k)]


def header_lines(report: RunReport, config) -> list[str]:
    """What was run on what, by which version, when and where: a two-column table under the title."""
    import os
    import platform
    from datetime import datetime, timezone

    from asd_ray.version import version_line

    per_split: dict[str, list[str]] = {}
    for machine, c in report.clips.items():
        per_split.setdefault(str(c["split"]), []).append(f"{machine} {c['train']} + {c['test']}")
    clips = "; ".join(f"{split}: {', '.join(items)}" for split, items in per_split.items())
    where = f"{platform.node() or 'unknown host'} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs)"
    rows = [("data", ", ".join(f"`{r}`" for r in report.roots) or "(not recorded)"),
            ("clips (train + test per machine)", clips or "none scored"),
            ("detector", detector_line(config)),
            ("version", version_line()),
            ("written", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {where}")]
    return ["| run | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def split_lines(name: str, split: dict, system: str = "") -> list[str]:
    """Markdown for one split: its official score and means, and the compact per-machine table (AUC_s, AUC_t,
    pAUC, h-mean; rounded here only, ``metrics.json`` holds them unrounded). Every other column of the official
    evaluator is in its table, ``evaluator/<split>/<system>_result.csv``, linked."""
    lines = [f"## {name}", "",
             f"Official score **{split['official_score']:.4f}**; arithmetic mean (AUC) {split['mean_auc']:.4f}, "
             f"harmonic mean (source) {split['hmean_source']:.4f}, harmonic mean (target) {split['hmean_target']:.4f}, "
             f"mean pAUC {split['mean_pauc']:.4f}.", "",
             "| machine | AUC_s | AUC_t | pAUC | h-mean |", "|---|---|---|---|---|"]
    for machine, v in split["machines"].items():
        lines.append(f"| {machine} | {v['auc_source']:.4f} | {v['auc_target']:.4f} | {v['pauc']:.4f} | {v['hmean']:.4f} |")
    lines.append("")
    if system and all(all(k in v for k in DECISION_KEYS) for v in split["machines"].values()):
        table = f"evaluator/{name}/{system}_result.csv"
        lines += [f"Every column of the official evaluator per machine (AUC (all), and precision, recall and F1 per "
                  f"domain from the decisions): [{table}]({table}).", ""]
    if "official_score_ci95" in split:
        lines += [f"The evaluator's `official score ci95` of this split, {split['official_score_ci95']:.2g}, is a "
                  "jackknife half-width of the AUC and pAUC pooled over the split's test clips, computed as the "
                  "official evaluator does: not a confidence interval of the official score above.", ""]
    return lines


def machine_lines(results: dict) -> list[str]:
    """Each machine's fitted detector in a sentence: its kind, bank members and decision threshold."""
    kinds = sorted({r.detector for r in results.values()})
    return [f"Fitted per machine ({', '.join(kinds)}): "
            + "; ".join(f"{m} {r.bank_size} bank members, decision threshold {r.threshold:.3f}"
                        for m, r in results.items())
            + ". A clip is decided anomalous when its score (0-1 after min-max) is above its machine's threshold.", ""]


def timing_lines(timings: dict[str, float]) -> list[str]:
    """The stages' wall times; ``score_evaluate`` (fitting, scoring and metrics) is shown as its two parts."""
    t = dict(timings)
    if "score_evaluate" in t and "fit_score" in t:
        t["evaluate"] = max(t.pop("score_evaluate") - t["fit_score"], 0.0)
    return ["## Timings", "", ", ".join(f"{TIMING_WORDS.get(k, k)} {v:.1f} s" for k, v in t.items()) + ".", ""]


def config_lines(config) -> list[str]:
    changed = changed_settings(config)
    lines = ["## Settings", "", "The whole config is in `config.yaml`. "
             + ("Settings that differ from the defaults:" if changed else "Every setting is at its default."), ""]
    if changed:
        lines += ["| setting | value | default |", "|---|---|---|"]
        lines += [f"| `{k}` | `{v}` | `{d}` |" for k, v, d in changed] + [""]
    return lines


def write_report(report: RunReport, out: Path, config,
                 plot_map: Callable[[Callable, list[tuple]], list] | None = None) -> Path:
    """Write ``report.md`` (and one PNG per machine with known labels) into ``out``; ``plot_map(fn, jobs)`` draws
    them (in this process by default; a Ray run's draws them in parallel tasks)."""
    lines = [f"# asd-ray report: {out.resolve().name}", ""]
    m = report.metrics
    if m:
        lines += [headline_line(m), ""]
    lines += header_lines(report, config)
    if m:
        # drawn by plot_map too: a Ray run's driver never imports matplotlib
        overview = (plot_map or in_process)(overview_png, [(m, f"asd-ray run: {out.resolve().name}")])[0]
        (out / "overview.png").write_bytes(overview)
        lines += ["![every machine: AUC source, AUC target, pAUC and h-mean](overview.png)", ""]
        for name, split in m["splits"].items():
            lines += split_lines(name, split, out.resolve().name)
        if m.get("excluded_test_clips"):
            lines += [f"{len(m['excluded_test_clips'])} rejected test clip(s) left out of the metrics.", ""]
    unlabeled = sorted(set(report.results) - set(report.truth))
    if unlabeled:
        lines += [f"Scored without ground truth (no metrics): {', '.join(unlabeled)}.", ""]
    if report.results:
        lines += machine_lines(report.results)
    lines += ["## Clips", "",
              f"{report.clips_in} in: {report.clips_embedded} embedded, {len(report.rejects)} rejected "
              f"(`rejects.csv`), {len(report.unused)} unused (`unused.csv`). Pre-processing flags: "
              f"{json.dumps(report.flags) if report.flags else 'none'}.", ""]
    if report.unscored:
        lines += [f"{len(report.unscored)} embedded clip(s) of machines without a bank (`unscored.csv`): "
                  + "; ".join(sorted({u.reason for u in report.unscored})), ""]
    if report.rejects:
        lines += ["| rejected clip | reason |", "|---|---|"]
        lines += [f"| {Path(r.path).name} | {r.reason} |" for r in report.rejects[:50]]
        lines.append("")
    lines += timing_lines(report.timings) + config_lines(config) + ["## Plots", ""]
    names = list(report.results)
    jobs = [(name, report.results[name].filenames, report.results[name].scores, report.truth.get(name, {}),
             report.results[name].threshold) for name in names]
    for name, png in zip(names, (plot_map or in_process)(machine_png, jobs)):
        if png is not None:
            (out / f"plot_{name}.png").write_bytes(png)
            lines.append(f"![{name}](plot_{name}.png)")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_comparison(reports: dict[str, RunReport], out: Path) -> Path:
    """``compare.md`` / ``compare.json``: per split the official score of each detector, per machine and detector
    AUC_s, AUC_t, pAUC, h-mean; ``roc_<machine>.png`` with one ROC per detector (all test clips of the machine)."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    scored = {n: r.metrics for n, r in reports.items() if r.metrics}
    if not scored:
        raise ValueError("no detector run has ground truth to compare on")
    splits = [s for s in SPLITS if any(s in met["splits"] for met in scored.values())]
    machines = sorted({m for met in scored.values() for sp in met["splits"].values() for m in sp["machines"]})
    lines = ["# Detector comparison", "",
             "Official score per split (h-mean over the split's machines' AUC_s, AUC_t, pAUC; dev_data and eval_data "
             "are scored apart):", "",
             "| detector | " + " | ".join(f"{s} official score | {s} mean AUC | {s} mean pAUC" for s in splits) + " |",
             "|---|" + "---|---|---|" * len(splits)]
    for n, m in scored.items():
        cells = []
        for s in splits:
            sp = m["splits"].get(s)
            cells += (["—"] * 3 if sp is None else
                      [f"{sp['official_score']:.4f}", f"{sp['mean_auc']:.4f}", f"{sp['mean_pauc']:.4f}"])
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Per machine (AUC_s / AUC_t / pAUC / h-mean):", "",
              "| machine | split | " + " | ".join(scored) + " |", "|---|---|" + "---|" * len(scored)]
    per_machine = {n: {mach: (s, v) for s, sp in m["splits"].items() for mach, v in sp["machines"].items()}
                   for n, m in scored.items()}
    for machine in machines:
        split = next(per_machine[n][machine][0] for n in scored if machine in per_machine[n])
        cells = [f"{v['auc_source']:.3f} / {v['auc_target']:.3f} / {v['pauc']:.3f} / **{v['hmean']:.3f}**"
                 if (v := per_machine[n].get(machine, (None, None))[1]) else "—" for n in scored]
        lines.append(f"| {machine} | {split} | " + " | ".join(cells) + " |")
    headline = {n: m["official_score"] for n, m in scored.items()}
    hmeans = {n: {mach: v["hmean"] for mach, (_, v) in per_machine[n].items()} for n in scored}
    (out / "compare_overview.png").write_bytes(compare_overview_png(hmeans, headline))
    lines += ["", "![h-mean of every detector on every machine](compare_overview.png)", ""]
    for machine in machines:
        curves = {}
        for n in names:
            r, truth = reports[n].results.get(machine), reports[n].truth.get(machine, {})
            known = [(truth[f][0], s) for f, s in zip(r.filenames, r.scores) if f in truth] if r else []
            if len({k[0] for k in known}) == 2:
                curves[n] = ([k[0] for k in known], [k[1] for k in known], per_machine[n][machine][1]["hmean"])
        if curves:
            (out / f"roc_{machine}.png").write_bytes(compare_roc_png(machine, curves))
            lines.append(f"![{machine}](roc_{machine}.png)")
    (out / "compare.json").write_text(json.dumps(scored, indent=2))
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path
