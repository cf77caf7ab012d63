"""Official DCASE 2025 Task 2 metrics (SPEC §6), computed as the official evaluator does.

AUC_source uses the source-domain normals plus ALL anomalies, AUC_target the target-domain normals
plus ALL anomalies; pAUC is sklearn's McClish-corrected ``roc_auc_score(..., max_fpr=0.1)`` over
every test clip of the section; the official score is ``scipy.stats.hmean`` over every machine's
three values, per split: the development set (``dev_data``) and the evaluation set (``eval_data``)
are scored apart, as the official evaluator and papers do.

What else nttcslab's evaluator (``dcase2024_task2_evaluator``) writes is here too: AUC over all clips,
precision / recall / F1 per domain from the 0/1 decisions, source-only and target-only harmonic means,
and its jackknife 95 % half-width of the score (``EVALUATOR_COLUMNS`` maps our keys to its column names).
"""

from __future__ import annotations

import sys
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.integrate import trapezoid
from scipy.stats import hmean, t as student_t
from sklearn.metrics import roc_auc_score

from asd_ray.errors import MetricError  # noqa: F401 - defined there, raised and re-exported here

MAX_FPR = 0.1
EPS = sys.float_info.epsilon  # the evaluator's floor under every value it takes an h-mean of, and under divisors
SPLITS = ("dev_data", "eval_data")  # a split's name is its folder under a DCASE root
DOMAINS = ("source", "target")

# metrics.json's per-machine keys -> the official evaluator's column names (its ``COLUMNS``)
EVALUATOR_COLUMNS = {
    "auc_all": "AUC (all)", "auc_source": "AUC (source)", "auc_target": "AUC (target)", "pauc": "pAUC",
    "precision_source": "precision (source)", "precision_target": "precision (target)",
    "recall_source": "recall (source)", "recall_target": "recall (target)",
    "f1_source": "F1 score (source)", "f1_target": "F1 score (target)",
}
DECISION_KEYS = tuple(k for k in EVALUATOR_COLUMNS if k.split("_")[0] in ("precision", "recall", "f1"))

TaskMap = Callable[[Callable, list[tuple]], list]  # map(fn, [args, ...]) -> [fn(*args), ...], maybe in other processes
LOO_CHUNK = 512  # clips left out per job of the jackknife: ~0.1 s each on 1,400 clips, worth a task


def in_process(fn: Callable, jobs: list[tuple]) -> list:
    return [fn(*args) for args in jobs]


def floored_hmean(values: Sequence[float]) -> float:
    """``scipy.stats.hmean`` of ``values`` floored at machine epsilon, as the evaluator takes every h-mean
    (equal to the plain h-mean unless a value is 0)."""
    return float(hmean(np.maximum(np.asarray(values, dtype=float), EPS)))


def machine_metrics(labels: Sequence[int], domains: Sequence[str], scores: Sequence[float],
                    decisions: Sequence[int] | None = None, max_fpr: float = MAX_FPR) -> dict[str, float]:
    """AUC over all clips, AUC_source, AUC_target and pAUC of one machine's section (and, with ``decisions``,
    precision, recall and F1 per domain: see ``decision_metrics``).

    labels: 1 anomaly / 0 normal per clip; domains: "source" / "target"; scores: higher = more anomalous.
    """
    y = np.asarray(labels, dtype=int)
    d = np.asarray(domains)
    s = np.asarray(scores, dtype=float)
    if not (len(y) == len(d) == len(s)):
        raise MetricError(f"lengths differ: {len(y)} labels, {len(d)} domains, {len(s)} scores")
    if not np.isfinite(s).all():
        raise MetricError("scores contain NaN or Inf")
    out = {}
    for domain in DOMAINS:
        sel = (d == domain) | (y == 1)
        if len(set(y[sel])) < 2:
            raise MetricError(f"{domain}: needs both normal and anomalous clips")
        out[f"auc_{domain}"] = float(roc_auc_score(y[sel], s[sel]))
    out["pauc"] = float(roc_auc_score(y, s, max_fpr=max_fpr))
    out["auc_all"] = float(roc_auc_score(y, s))
    if decisions is not None:
        out.update(decision_metrics(y, d, decisions))
    return out


def decision_metrics(labels: Sequence[int], domains: Sequence[str], decisions: Sequence[int]) -> dict[str, float]:
    """Precision, recall and F1 of the 0/1 decisions on each domain's test clips (normals and anomalies of
    that domain only, unlike AUC), as the evaluator: ``tp / max(tp + fp, eps)``, ``tp / max(tp + fn, eps)``,
    ``2 p r / max(p + r, eps)`` (0, not an error, where a domain has no positive decision or no anomaly)."""
    y = np.asarray(labels, dtype=int)
    d = np.asarray(domains)
    z = np.asarray(decisions)
    if len(z) != len(y):
        raise MetricError(f"lengths differ: {len(y)} labels, {len(z)} decisions")
    if not set(np.unique(z).tolist()) <= {0, 1}:
        raise MetricError(f"decisions must be 0 or 1, got {sorted(set(np.unique(z).tolist()) - {0, 1})[:5]}")
    z = z.astype(int)
    out = {}
    for domain in DOMAINS:
        sel = d == domain
        tp = int(np.sum((z[sel] == 1) & (y[sel] == 1)))
        fp = int(np.sum((z[sel] == 1) & (y[sel] == 0)))
        fn = int(np.sum((z[sel] == 0) & (y[sel] == 1)))
        precision = tp / max(tp + fp, EPS)
        recall = tp / max(tp + fn, EPS)
        out[f"precision_{domain}"] = float(precision)
        out[f"recall_{domain}"] = float(recall)
        out[f"f1_{domain}"] = float(2.0 * precision * recall / max(precision + recall, EPS))
    return out


def official_score(per_machine: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean over every machine's AUC_source, AUC_target and pAUC (one split's machines), summed in the
    evaluator's order (every AUC_source, every AUC_target, every pAUC) so that even the last bit agrees."""
    ordered = [per_machine[m] for m in sorted(per_machine)]
    values = [m[k] for k in ("auc_source", "auc_target", "pauc") for m in ordered]
    if not values:
        raise MetricError("no machines to score")
    return floored_hmean(values)


def jackknife(theta: float, loo: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The official evaluator's jackknife from a statistic ``theta`` and its N leave-one-out values ``loo``:
    (estimate, 95 % half-width).

    Pseudo-values N theta - (N - 1) loo_i, estimate = their mean; the half-width is
    ``|t_{(1-confidence)/2, N-1}| * sqrt(sum_i (loo_i - mean loo)^2 / (N (N - 1)))``. That is the evaluator's
    step (6) as written (Mesaros et al., TASLP 2019, sec. IV): it puts the leave-one-out values where the
    paper has pseudo-values, so it is (N - 1) times narrower than the textbook jackknife interval.
    """
    loo = np.asarray(loo, dtype=float)
    n = len(loo)
    if n < 3:
        raise MetricError(f"jackknife needs at least 3 leave-one-out values, got {n}")
    estimate = float(np.mean(n * theta - (n - 1) * loo))
    sigma = np.sqrt(np.sum((loo - loo.mean()) ** 2) / (n * (n - 1)))
    return estimate, float(abs(student_t.ppf((1 - confidence) / 2, n - 1)) * sigma)


def leave_one_out_auc(labels: Sequence[int], scores: Sequence[float], max_fpr: float | None = None,
                      task_map: TaskMap = in_process) -> np.ndarray:
    """Each clip's ``roc_auc_score`` of the other N - 1 clips (with ``max_fpr``: the McClish-corrected pAUC), (N,).

    Computed as the official evaluator computes it (sklearn's curve and trapezoids on each clip left out, by
    sklearn's steps: ``_auc_without_each``), so that its jackknife and the "official score ci95" it writes agree
    to the last bit: a closed form from rank counts differs from sklearn's trapezoids by up to 1e-16, which the
    jackknife's subtraction magnifies into the printed digits. Clips with the same label and score leave the same
    multiset behind, and sklearn's curve of a multiset does not depend on the order of its ties (its cumulative
    counts are exact integers), so each such pair is computed once. In jobs of ``LOO_CHUNK`` clips through
    ``task_map`` (a Ray run's: one task each); each value is the same wherever it runs. Needs 2+ clips of each
    class."""
    return leave_one_out_aucs(labels, scores, (max_fpr,), task_map)[0]


def leave_one_out_aucs(labels: Sequence[int], scores: Sequence[float], max_fprs: Sequence[float | None],
                       task_map: TaskMap = in_process) -> list[np.ndarray]:
    """``leave_one_out_auc`` for each of ``max_fprs`` (None: the AUC), every job through one ``task_map`` call."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(n_pos, n_neg) < 2:
        raise MetricError(f"leave-one-out AUCs need 2+ anomalies and 2+ normals, got {n_pos} and {n_neg}")
    _, first, pair = np.unique(np.stack([y.astype(float), s]), axis=1, return_index=True, return_inverse=True)
    chunks = [first[i:i + LOO_CHUNK] for i in range(0, len(first), LOO_CHUNK)]
    values = task_map(_auc_without_each, [(y, s, chunk, max_fpr) for max_fpr in max_fprs for chunk in chunks])
    return [np.concatenate(values[j * len(chunks):(j + 1) * len(chunks)])[pair.ravel()]
            for j in range(len(max_fprs))]


def _auc_without_each(y: np.ndarray, s: np.ndarray, left_out: np.ndarray, max_fpr: float | None) -> np.ndarray:
    """``roc_auc_score`` of ``y``, ``s`` without each clip of ``left_out`` in turn (a job of ``leave_one_out_aucs``),
    to the last bit: sklearn's own steps (``roc_curve``'s thresholds and dropped collinear points, scipy's
    ``trapezoid``, the McClish correction) over the clips sorted once, less the one left out. sklearn called
    on each subset spent 2.5 ms of its 2.6 ms a call checking its inputs (1,400 calls a machine of 700 test
    clips); ``tests/scoring/test_metrics.py`` holds these values to sklearn's, ties included."""
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order].astype(np.float64), s[order]
    where = np.empty(len(s), dtype=np.int64)
    where[order] = np.arange(len(s))
    values = np.empty(len(left_out))
    for k, i in enumerate(left_out):
        values[k] = _sorted_auc(np.delete(ys, where[i]), np.delete(ss, where[i]), max_fpr)
    return values


def _sorted_auc(y: np.ndarray, s: np.ndarray, max_fpr: float | None) -> float:
    """sklearn's ``roc_auc_score(y, s, max_fpr=max_fpr)`` of 0/1 labels ``y`` (float64) by scores ``s`` sorted
    in descending order, both classes present: ``roc_curve`` (``drop_intermediate``), then ``auc``."""
    thresholds = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y, dtype=np.float64)[thresholds]
    fps = 1 + thresholds.astype(np.float64) - tps
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    if max_fpr is None or max_fpr == 1:
        return float(trapezoid(tpr, fpr))  # sklearn's ``auc`` of a curve whose fpr never decreases
    stop = np.searchsorted(fpr, max_fpr, "right")
    tpr = np.append(tpr[:stop], np.interp(max_fpr, [fpr[stop - 1], fpr[stop]], [tpr[stop - 1], tpr[stop]]))
    fpr = np.append(fpr[:stop], max_fpr)
    min_area, max_area = 0.5 * max_fpr ** 2, max_fpr
    return 0.5 * (1 + (float(trapezoid(tpr, fpr)) - min_area) / (max_area - min_area))


def score_ci95(labels: Sequence[int], scores: Sequence[float], max_fpr: float = MAX_FPR,
               task_map: TaskMap = in_process) -> dict[str, float]:
    """The evaluator's "official score ci95": the mean of the jackknife 95 % half-widths of the AUC and of the
    pAUC of one split's clips pooled over its machines (``auc_ci95``, ``pauc_ci95`` also returned); the
    leave-one-out values are computed through ``task_map`` (``leave_one_out_auc``)."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    loo_auc, loo_pauc = leave_one_out_aucs(y, s, (None, max_fpr), task_map)
    _, auc_ci = jackknife(roc_auc_score(y, s), loo_auc)
    _, pauc_ci = jackknife(roc_auc_score(y, s, max_fpr=max_fpr), loo_pauc)
    return {"official_score_ci95": float(np.mean([auc_ci, pauc_ci])), "auc_ci95": auc_ci, "pauc_ci95": pauc_ci}


def split_summary(per_machine: Mapping[str, Mapping[str, float]], labels: Sequence[int] | None = None,
                  scores: Sequence[float] | None = None, task_map: TaskMap = in_process) -> dict:
    """One split's body in metrics.json: official score, arithmetic means, the evaluator's source-only and
    target-only h-means of the AUCs, per-machine values (unrounded, with their own h-mean) and, given every
    clip's ``labels`` and ``scores`` pooled over the split's machines, the jackknife half-width (its
    leave-one-out values through ``task_map``)."""
    if not per_machine:
        raise MetricError("no machines to score")
    machines = {m: {**v, "hmean": floored_hmean([v["auc_source"], v["auc_target"], v["pauc"]])}
                for m, v in sorted(per_machine.items())}
    out = {
        "official_score": official_score(per_machine),
        "mean_auc": float(np.mean([v[k] for k in ("auc_source", "auc_target") for v in machines.values()])),
        "mean_pauc": float(np.mean([v["pauc"] for v in machines.values()])),
        "hmean_source": floored_hmean([v["auc_source"] for v in machines.values()]),
        "hmean_target": floored_hmean([v["auc_target"] for v in machines.values()]),
    }
    if labels is not None and scores is not None:
        out.update(score_ci95(labels, scores, task_map=task_map))
    return {**out, "machines": machines}


def summary(splits: Mapping[str, dict]) -> dict:
    """The metrics.json body from ``split_summary`` per split: every split under ``splits``, and at the top
    level the headline split's fields (``dev_data`` when present, else ``eval_data``; named in
    ``headline_split``). Scores of the two splits are never mixed."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise MetricError(f"splits must be among {SPLITS}, got {sorted(splits)}")
    headline = next(s for s in SPLITS if s in splits)
    return {**splits[headline], "headline_split": headline, "splits": {s: splits[s] for s in SPLITS if s in splits}}
