"""report.md with the per-machine table, ROC curves and score histograms (matplotlib PNGs). No ray here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from asd_ray.results import RunReport
from asd_ray.scoring.metrics import DECISION_KEYS, EVALUATOR_COLUMNS, SPLITS


def plot_png(machine: str, filenames, scores, truth: dict) -> bytes | None:
    """One machine's ROC curves (per domain) and score histograms as PNG bytes; None without known labels.

    Returns the bytes rather than writing a file, so that a run can draw its machines in parallel tasks on any
    node (each plot is a few tenths of a second, matplotlib's import most of a second more)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    known = [(truth[f][0], truth[f][1], s) for f, s in zip(filenames, scores) if f in truth]
    if not known:
        return None
    y = np.array([k[0] for k in known])
    d = np.array([k[1] for k in known])
    s = np.array([k[2] for k in known])
    fig, (ax_roc, ax_hist) = plt.subplots(1, 2, figsize=(10, 4))
    for domain in ("source", "target"):
        sel = (d == domain) | (y == 1)
        if len(set(y[sel])) == 2:
            fpr, tpr, _ = roc_curve(y[sel], s[sel])
            ax_roc.plot(fpr, tpr, label=f"{domain} normals + all anomalies")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.axvline(0.1, color="grey", lw=0.8, ls="--")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{machine}: ROC")
    ax_roc.legend(loc="lower right", fontsize=8)
    bins = np.linspace(s.min(), s.max() + 1e-9, 25)
    for domain in ("source", "target"):
        for label, name in ((0, "normal"), (1, "anomaly")):
            sel = (d == domain) & (y == label)
            if sel.any():
                ax_hist.hist(s[sel], bins=bins, alpha=0.45, label=f"{domain} {name}")
    ax_hist.set(xlabel="anomaly score", ylabel="clips", title=f"{machine}: scores")
    ax_hist.legend(fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)  # tight_layout: a quarter of the time
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    plt.close(fig)
    return png.getvalue()


def _in_turn(fn: Callable, jobs: list[tuple]) -> list:
    return [fn(*args) for args in jobs]


def headline_line(metrics: dict) -> str:
    """The sentence that says which split the top-level official score is."""
    split = metrics["headline_split"]
    n = len(metrics["machines"])
    others = [s for s in metrics["splits"] if s != split]
    return (f"**Official score** ({split}: h-mean of its {n} machine(s)' AUC_source, AUC_target and pAUC): "
            f"**{metrics['official_score']:.4f}**. This is `official_score` at the top of `metrics.json`"
            + (f"; {', '.join(others)} is scored apart below, never mixed in." if others else "."))


def split_lines(name: str, split: dict, results: dict | None = None, system: str = "") -> list[str]:
    """Markdown for one split: its official score and means, and the per-machine table with the official
    evaluator's column names (values rounded here only; ``metrics.json`` holds them unrounded)."""
    lines = [f"## {name}", "",
             f"Official score **{split['official_score']:.4f}**"
             + (f" (official score ci95 {split['official_score_ci95']:.2g}: the evaluator's jackknife half-width)"
                if "official_score_ci95" in split else "")
             + f"; arithmetic mean (AUC) {split['mean_auc']:.4f}, harmonic mean (source) {split['hmean_source']:.4f}, "
               f"harmonic mean (target) {split['hmean_target']:.4f}, mean pAUC {split['mean_pauc']:.4f}.", ""]
    keys = [k for k in EVALUATOR_COLUMNS if all(k in v for v in split["machines"].values())]
    extra = ["threshold", "detector", "bank"] if results else []
    lines += ["| machine | " + " | ".join([EVALUATOR_COLUMNS[k] for k in keys] + ["h-mean"] + extra) + " |",
              "|---|" + "---|" * (len(keys) + 1 + len(extra))]
    for machine, v in split["machines"].items():
        cells = [f"{v[k]:.4f}" for k in keys] + [f"{v['hmean']:.4f}"]
        if results:
            r = results[machine]
            cells += [f"{r.threshold:.3f}", r.detector, str(r.bank_size)]
        lines.append(f"| {machine} | " + " | ".join(cells) + " |")
    if system and all(k in keys for k in DECISION_KEYS):
        lines += ["", f"The official evaluator's table of this split: `evaluator/{name}/{system}_result.csv`."]
    return lines + [""]


def write_report(report: RunReport, out: Path, config,
                 plot_map: Callable[[Callable, list[tuple]], list] | None = None) -> Path:
    """Write ``report.md`` (and one PNG per machine with known labels) into ``out``; ``plot_map(fn, jobs)`` draws
    them (in this process by default; a Ray run's draws them in parallel tasks)."""
    lines = ["# asd-ray report", ""]
    m = report.metrics
    if m:
        lines += [headline_line(m), ""]
        for name, split in m["splits"].items():
            lines += split_lines(name, split, report.results, out.resolve().name)
        if m.get("excluded_test_clips"):
            lines += [f"{len(m['excluded_test_clips'])} rejected test clip(s) left out of the metrics.", ""]
    unlabeled = sorted(set(report.results) - set(report.truth))
    if unlabeled:
        lines += [f"Scored without ground truth (no metrics): {', '.join(unlabeled)}."]
    lines += ["", "## Clips", "",
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
    lines += ["## Timings (s)", "", " · ".join(f"{k} {v:.1f}" for k, v in report.timings.items()), "",
              "## Config", "", "```json", json.dumps(dataclasses.asdict(config), indent=1), "```", "",
              "## Plots", ""]
    names = list(report.results)
    jobs = [(name, report.results[name].filenames, report.results[name].scores, report.truth.get(name, {}))
            for name in names]
    for name, png in zip(names, (plot_map or _in_turn)(plot_png, jobs)):
        if png is not None:
            (out / f"plot_{name}.png").write_bytes(png)
            lines.append(f"![{name}](plot_{name}.png)")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_comparison(reports: dict[str, RunReport], out: Path) -> Path:
    """``compare.md`` / ``compare.json``: per split the official score of each detector, per machine and detector
    AUC_s, AUC_t, pAUC, h-mean; ``roc_<machine>.png`` with one ROC per detector (all test clips of the machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

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
    lines += [""]
    for machine in machines:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for n in names:
            r, truth = reports[n].results.get(machine), reports[n].truth.get(machine, {})
            known = [(truth[f][0], s) for f, s in zip(r.filenames, r.scores) if f in truth] if r else []
            if len({k[0] for k in known}) == 2:
                fpr, tpr, _ = roc_curve([k[0] for k in known], [k[1] for k in known])
                ax.plot(fpr, tpr, label=f"{n} (h-mean {per_machine[n][machine][1]['hmean']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{machine}: ROC, all test clips")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"roc_{machine}.png", dpi=90)
        plt.close(fig)
        lines.append(f"![{machine}](roc_{machine}.png)")
    (out / "compare.json").write_text(json.dumps(scored, indent=2))
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path
