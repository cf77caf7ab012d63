"""The figures of report.md and compare.md (matplotlib, drawn to PNG bytes). No ray here.

- ``machine_png``: one machine's ROC per domain (AUC in the legend, the pAUC region FPR <= 0.1 shaded and
  labelled) and its score distributions per domain (normals and anomalies as outlines, the decision threshold
  drawn);
- ``overview_png``: every machine of a run on one page (AUC_source, AUC_target, pAUC and h-mean per machine,
  grouped by split), so the weak machines and the weak metric of each stand out;
- ``compare_roc_png`` / ``compare_overview_png``: ROC curves of many detectors on one machine (each its own
  colour and line style) and the h-mean of every detector on every machine as a table of colours.
"""

from __future__ import annotations

import io
import itertools
from typing import Mapping, Sequence

import numpy as np

MAX_FPR = 0.1
DOMAIN_COLOURS = {"source": "tab:blue", "target": "tab:orange"}
METRIC_BARS = (("auc_source", "AUC source", "tab:blue"), ("auc_target", "AUC target", "tab:orange"),
               ("pauc", "pAUC", "tab:green"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    _pyplot().close(fig)
    return png.getvalue()


def curve_styles(n: int) -> list[dict]:
    """``n`` distinct (colour, line style) pairs: ten colours, then the same colours dashed, dotted ..."""
    colours = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    pairs = [(c, s) for s, c in itertools.product(styles, colours)]
    return [{"color": c, "linestyle": s} for c, s in (pairs * (n // len(pairs) + 1))[:n]]


def _shade_pauc_region(ax) -> None:
    ax.axvspan(0, MAX_FPR, color="grey", alpha=0.12, lw=0)
    ax.text(MAX_FPR / 2, 0.98, f"pAUC\nregion\nFPR≤{MAX_FPR:g}", ha="center", va="top", fontsize=7, color="dimgrey")


def machine_png(machine: str, filenames: Sequence[str], scores: Sequence[float], truth: Mapping,
                threshold: float | None = None) -> bytes | None:
    """One machine's ROC per domain and score distributions as PNG bytes; None without known labels.

    ``truth``: {filename: (label, domain, ...)}; ``threshold``: the decision threshold on the scores' scale.
    Returns bytes rather than writing a file, so that a run can draw its machines in parallel tasks on any node."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    known = [(truth[f][0], truth[f][1], s) for f, s in zip(filenames, scores) if f in truth]
    if not known:
        return None
    y = np.array([k[0] for k in known])
    d = np.array([k[1] for k in known])
    s = np.array([k[2] for k in known], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax_roc = axes[0]
    for domain in ("source", "target"):
        sel = (d == domain) | (y == 1)
        if len(set(y[sel])) == 2:
            fpr, tpr, _ = roc_curve(y[sel], s[sel])
            auc = roc_auc_score(y[sel], s[sel])
            ax_roc.plot(fpr, tpr, color=DOMAIN_COLOURS[domain], label=f"{domain} normals + all anomalies: AUC {auc:.3f}")
    if len(set(y)) == 2:
        ax_roc.plot([], [], " ", label=f"pAUC (all clips, FPR≤{MAX_FPR:g}): {roc_auc_score(y, s, max_fpr=MAX_FPR):.3f}")
    ax_roc.plot([0, 1], [0, 1], color="black", ls=":", lw=0.8)
    _shade_pauc_region(ax_roc)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{machine}: ROC", xlim=(0, 1),
               ylim=(0, 1.01))
    ax_roc.legend(loc="lower right", fontsize=7)
    bins = np.linspace(s.min(), s.max() + 1e-9, 30)
    for ax, domain in zip(axes[1:], ("source", "target")):
        for label, name, colour in ((0, "normal", "tab:blue"), (1, "anomaly", "tab:red")):
            sel = (d == domain) & (y == label)
            if sel.any():
                ax.hist(s[sel], bins=bins, histtype="step", lw=1.6, color=colour, label=f"{name} ({sel.sum()})")
        if threshold is not None:
            ax.axvline(threshold, color="black", ls="--", lw=1, label=f"decision threshold {threshold:.3g}")
        ax.set(xlabel="anomaly score", ylabel="clips", title=f"{machine}: {domain} test clips")
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.91, wspace=0.25)  # tight_layout: slower
    return _png(fig)


def overview_png(metrics: Mapping, title: str = "asd-ray run") -> bytes:
    """Every machine of every split: bars of AUC_source, AUC_target and pAUC, the h-mean as a mark, 0.5 (chance)
    drawn; machines sorted by h-mean within a split, the weakest first."""
    plt = _pyplot()
    splits = list(metrics["splits"].items())
    widths = [max(len(sp["machines"]), 1) for _, sp in splits]
    fig, axes = plt.subplots(1, len(splits), figsize=(3.4 + 1.1 * sum(widths), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (name, split) in zip(axes[0], splits):
        machines = sorted(split["machines"], key=lambda m: split["machines"][m]["hmean"])
        x = np.arange(len(machines))
        for i, (key, label, colour) in enumerate(METRIC_BARS):
            ax.bar(x + (i - 1) * 0.26, [split["machines"][m][key] for m in machines], 0.26, color=colour, label=label)
        ax.plot(x, [split["machines"][m]["hmean"] for m in machines], "k_", ms=22, mew=2.5, label="h-mean")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(x, machines, rotation=30, ha="right", fontsize=8)
        ax.set(ylim=(0, 1.05), title=f"{name}: official score {split['official_score']:.4f}")
    axes[0][0].set_ylabel("AUC / pAUC")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.86, bottom=0.2, top=0.86, wspace=0.15)
    return _png(fig)


def compare_roc_png(machine: str, curves: Mapping[str, tuple[Sequence[int], Sequence[float], float]]) -> bytes:
    """ROC of each detector on one machine's test clips: {detector: (labels, scores, h-mean)}; each curve its own
    colour and line style, the legend sorted by h-mean."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ranked = sorted(curves.items(), key=lambda kv: -kv[1][2])
    for (name, (y, s, hm)), style in zip(ranked, curve_styles(len(ranked))):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.3, **style, label=f"{name}: AUC {roc_auc_score(y, s):.3f}, h-mean {hm:.3f}")
    ax.plot([0, 1], [0, 1], color="black", ls=":", lw=0.8)
    _shade_pauc_region(ax)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{machine}: ROC, all test clips",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=6.5)
    fig.tight_layout()
    return _png(fig)


def compare_overview_png(hmeans: Mapping[str, Mapping[str, float]], official: Mapping[str, float]) -> bytes:
    """h-mean of each detector (rows, best official score first) on each machine (columns), values printed in
    the cells; the best detector of each machine framed. ``hmeans``: {detector: {machine: h-mean}}."""
    plt = _pyplot()
    detectors = sorted(hmeans, key=lambda n: -official.get(n, 0.0))
    machines = sorted({m for v in hmeans.values() for m in v})
    grid = np.array([[hmeans[n].get(m, np.nan) for m in machines] for n in detectors])
    fig, ax = plt.subplots(figsize=(2.5 + 1.0 * len(machines), 1.0 + 0.4 * len(detectors)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.4, vmax=1.0, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7)
    for j in range(len(machines)):
        if not np.all(np.isnan(grid[:, j])):
            i = int(np.nanargmax(grid[:, j]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(len(machines)), machines, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(detectors)), [f"{n} ({official.get(n, float('nan')):.3f})" for n in detectors], fontsize=8)
    ax.set_title("h-mean per machine (official score in brackets; best per machine framed)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _png(fig)
