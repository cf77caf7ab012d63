"""report.md with the per-machine table, ROC curves and score histograms (matplotlib PNGs). No ray here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import numpy as np

from asd_ray.results import RunReport


def _plots(machine: str, filenames, scores, truth: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    known = [(truth[f][0], truth[f][1], s) for f, s in zip(filenames, scores) if f in truth]
    if not known:
        return []
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
    name = f"plot_{machine}.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return [name]


def write_report(report: RunReport, out: Path, config) -> Path:
    """Write ``report.md`` (and one PNG per machine with known labels) into ``out``."""
    lines = ["# asd-ray report", ""]
    m = report.metrics
    if m:
        lines += [f"**Official score** (h-mean of every machine's AUC_s, AUC_t, pAUC): **{m['official_score']:.4f}**", "",
                  "| machine | AUC_source | AUC_target | pAUC | h-mean | threshold | detector | bank |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in m["machines"].items():
            r = report.results[name]
            lines.append(f"| {name} | {v['auc_source']:.4f} | {v['auc_target']:.4f} | {v['pauc']:.4f} | "
                         f"{v['hmean']:.4f} | {r.threshold:.3f} | {r.detector} | {r.bank_size} |")
        lines += ["", f"Mean AUC {m['mean_auc']:.4f}, mean pAUC {m['mean_pauc']:.4f}."]
        if m.get("excluded_test_clips"):
            lines.append(f"{len(m['excluded_test_clips'])} rejected test clip(s) left out of the metrics.")
    unlabeled = sorted(set(report.results) - set(report.truth))
    if unlabeled:
        lines += ["", f"Scored without ground truth (no metrics): {', '.join(unlabeled)}."]
    lines += ["", "## Clips", "",
              f"{report.clips_in} in: {report.clips_embedded} embedded, {len(report.rejects)} rejected "
              f"(`rejects.csv`), {len(report.unused)} unused (`unused.csv`). Pre-processing flags: "
              f"{json.dumps(report.flags) if report.flags else 'none'}.", ""]
    if report.unscored:
        lines += [f"{len(report.unscored)} embedded test clip(s) not scored (`unscored.csv`): "
                  + "; ".join(sorted({u.reason for u in report.unscored})), ""]
    if report.rejects:
        lines += ["| rejected clip | reason |", "|---|---|"]
        lines += [f"| {Path(r.path).name} | {r.reason} |" for r in report.rejects[:50]]
        lines.append("")
    lines += ["## Timings (s)", "", " · ".join(f"{k} {v:.1f}" for k, v in report.timings.items()), "",
              "## Config", "", "```json", json.dumps(dataclasses.asdict(config), indent=1), "```", "",
              "## Plots", ""]
    for name, r in report.results.items():
        for png in _plots(name, r.filenames, r.scores, report.truth.get(name, {}), out):
            lines.append(f"![{name}]({png})")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_comparison(reports: dict[str, RunReport], out: Path) -> Path:
    """``compare.md`` / ``compare.json``: per machine and detector AUC_s, AUC_t, pAUC, h-mean and the official
    score; ``roc_<machine>.png`` with one ROC per detector (all test clips of the machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    scored = {n: r.metrics for n, r in reports.items() if r.metrics}
    if not scored:
        raise ValueError("no detector run has ground truth to compare on")
    machines = sorted({m for met in scored.values() for m in met["machines"]})
    lines = ["# Detector comparison", "", "Official score (h-mean over every machine's AUC_s, AUC_t, pAUC):", "",
             "| detector | official score | mean AUC | mean pAUC |", "|---|---|---|---|"]
    lines += [f"| {n} | {m['official_score']:.4f} | {m['mean_auc']:.4f} | {m['mean_pauc']:.4f} |"
              for n, m in scored.items()]
    lines += ["", "Per machine (AUC_s / AUC_t / pAUC / h-mean):", "",
              "| machine | " + " | ".join(scored) + " |", "|---|" + "---|" * len(scored)]
    for machine in machines:
        cells = []
        for n, m in scored.items():
            v = m["machines"].get(machine)
            cells.append("—" if v is None else
                         f"{v['auc_source']:.3f} / {v['auc_target']:.3f} / {v['pauc']:.3f} / **{v['hmean']:.3f}**")
        lines.append(f"| {machine} | " + " | ".join(cells) + " |")
    lines += [""]
    for machine in machines:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for n in names:
            r, truth = reports[n].results.get(machine), reports[n].truth.get(machine, {})
            known = [(truth[f][0], s) for f, s in zip(r.filenames, r.scores) if f in truth] if r else []
            if len({k[0] for k in known}) == 2:
                fpr, tpr, _ = roc_curve([k[0] for k in known], [k[1] for k in known])
                ax.plot(fpr, tpr, label=f"{n} (h-mean {scored[n]['machines'][machine]['hmean']:.3f})")
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
