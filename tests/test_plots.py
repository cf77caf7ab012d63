"""The figures say what a reader needs: AUCs in legends, the pAUC region and the threshold labelled, a distinct
style per curve, every machine on the overview."""

import numpy as np
import pytest

from asd_ray import plots


@pytest.fixture
def figures(monkeypatch):
    drawn = []

    def keep(fig):
        drawn.append(fig)
        return b"\x89PNG"

    monkeypatch.setattr(plots, "_png", keep)
    return drawn


def _machine(seed=0, n=40):
    rng = np.random.default_rng(seed)
    names = [f"clip_{i}.wav" for i in range(n)]
    truth = {f: (int(i % 4 == 0), "source" if i % 2 else "target") for i, f in enumerate(names)}
    scores = [rng.random() + 0.6 * truth[f][0] for f in names]
    return names, scores, truth


def test_machine_figure_has_aucs_the_pauc_region_and_the_threshold(figures):
    names, scores, truth = _machine()
    assert plots.machine_png("fan", names, scores, truth, threshold=0.7) == b"\x89PNG"
    roc, source, target = figures[0].axes
    labels = [t.get_text() for t in roc.get_legend().get_texts()]
    assert any(label.startswith("source normals + all anomalies: AUC 0.") for label in labels)
    assert any(label.startswith("pAUC (all clips, FPR≤0.1): 0.") for label in labels)
    assert any("pAUC" in t.get_text() for t in roc.texts)  # the shaded FPR <= 0.1 region says what it is
    for ax in (source, target):
        assert "decision threshold 0.7" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.machine_png("fan", names, scores, {}) is None  # no labels, no figure


def test_thirteen_compare_curves_each_have_their_own_style(figures):
    styles = plots.curve_styles(13)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 13
    names, scores, truth = _machine()
    y = [truth[f][0] for f in names]
    curves = {f"detector-{i}": (y, list(np.add(scores, 0.01 * i)), 0.5 + i / 100) for i in range(13)}
    plots.compare_roc_png("fan", curves)
    lines = [ln for ln in figures[0].axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in lines}) == 13
    assert lines[0].get_label().startswith("detector-12: AUC")  # best h-mean first


def test_overviews_show_every_machine(figures):
    machines = {m: {"auc_source": 0.9, "auc_target": 0.6, "pauc": 0.55, "hmean": h}
                for m, h in (("fan", 0.7), ("valve", 0.5))}
    metrics = {"splits": {"dev_data": {"official_score": 0.6, "machines": machines},
                          "eval_data": {"official_score": 0.7, "machines": {"ToyPet": machines["fan"]}}}}
    plots.overview_png(metrics)
    dev, ev = figures[0].axes
    assert [t.get_text() for t in dev.get_xticklabels()] == ["valve", "fan"]  # weakest first
    assert [t.get_text() for t in ev.get_xticklabels()] == ["ToyPet"]
    plots.compare_overview_png({"knn": {"fan": 0.6, "valve": 0.8}, "fusion": {"fan": 0.9}}, {"knn": 0.7, "fusion": 0.9})
    ax = figures[1].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fusion (0.900)", "knn (0.700)"]
    assert {t.get_text() for t in ax.texts} == {"0.900", "0.600", "0.800"}
