"""Official result files and ground truth, and the ``evaluate`` step over a folder of them.

Result files, one pair per machine and section, no header, rows ``filename,value``:
``anomaly_score_<machine>_section_<ss>_test.csv`` and ``decision_result_<machine>_section_<ss>_test.csv``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import numpy as np
from scipy.stats import hmean

from asd_ray.data.layout import LayoutError, discover, ground_truth_paths, parse_clip_name
from asd_ray.scoring.metrics import (DECISION_KEYS, EPS, EVALUATOR_COLUMNS, MetricError, TaskMap, in_process,
                                     machine_metrics, split_summary, summary)

_RESULT_FILE = re.compile(
    r"^(?P<kind>anomaly_score|decision_result)_(?P<machine>.+)_section_(?P<section>\d{2})_test\.csv$")


def score_path(out_dir: str | Path, machine: str, section: str = "00") -> Path:
    return Path(out_dir) / f"anomaly_score_{machine}_section_{section}_test.csv"


def decision_path(out_dir: str | Path, machine: str, section: str = "00") -> Path:
    return Path(out_dir) / f"decision_result_{machine}_section_{section}_test.csv"


def write_rows(path: str | Path, rows: Iterable[tuple[str, object]]) -> None:
    """Write ``filename,value`` rows with no header."""
    with Path(path).open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def read_rows(path: str | Path) -> dict[str, str]:
    """Read a no-header ``filename,value`` table into {filename: value} (duplicates are an error)."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"file not found: {path}")
    out: dict[str, str] = {}
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) < 2:
                raise MetricError(f"{path}:{n}: expected 'filename,value', got {row}")
            if row[0] in out:
                raise MetricError(f"{path}:{n}: {row[0]} listed twice")
            out[row[0]] = row[1]
    return out


def write_results(out_dir: str | Path, machine: str, filenames: Iterable[str], scores: Iterable[float],
                  decisions: Iterable[int], section: str = "00") -> tuple[Path, Path]:
    """Write one machine's official score and decision files; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(filenames)
    sp, dp = score_path(out_dir, machine, section), decision_path(out_dir, machine, section)
    write_rows(sp, zip(names, (repr(float(s)) for s in scores)))
    write_rows(dp, zip(names, (int(d) for d in decisions)))
    return sp, dp


class ClipTruth(NamedTuple):
    """A test clip's ground truth: ``label`` 1 anomaly / 0 normal, ``domain`` source / target, and the
    ``split`` it belongs to (``dev_data`` or ``eval_data``: scored apart)."""

    label: int
    domain: str
    split: str = "dev_data"


Truth = Mapping[str, Mapping[str, ClipTruth]]  # {machine: {test file name: ClipTruth}}


def read_eval_list(path: str | Path) -> dict[str, dict[str, tuple[int, str]]]:
    """The official baseline repo's single eval list (``datasets/eval_data_list_2025.csv`` of
    nttcslab/dcase2023_task2_baseline_ae) -> {machine: {eval file name: (label 0/1, domain)}}.

    Its format: a one-column row names a machine type; each following row is ``<eval file name>,<labelled
    name>``, the labelled name in the development form (``section_00_target_test_anomaly_0012_<attrs>.wav``).
    """
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"eval list not found: {path}")
    out: dict[str, dict[str, tuple[int, str]]] = {}
    machine = None
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            row = [c.strip() for c in row if c.strip()]
            if not row:
                continue
            if len(row) == 1:
                machine = row[0]
                out.setdefault(machine, {})
                continue
            rec = parse_clip_name(Path(row[1]), machine or "", "test", "eval")
            if machine is None or rec.parse_error or rec.label not in ("normal", "anomaly"):
                raise LayoutError(f"{path}:{n}: expected a machine line, then rows '<eval name>,<labelled test "
                                  f"name>'; got {row}")
            out[machine][row[0]] = (int(rec.label == "anomaly"), rec.domain)
    if not any(out.values()):
        raise LayoutError(f"{path}: no clips listed")
    return out


def read_truth_tables(root: str | Path, machine: str, section: str = "00") -> dict[str, tuple[int, str]] | None:
    """{eval file name: (label, domain)} from the evaluator's per-machine ``ground_truth_data`` and
    ``ground_truth_domain`` tables under ``<root>/eval_data`` (None when the label table is absent)."""
    labels_csv, domains_csv, _ = ground_truth_paths(root, machine, section)
    if not labels_csv.is_file():
        return None
    labels, domains = read_rows(labels_csv), read_rows(domains_csv)
    table = {}
    for name, lab in labels.items():
        if name not in domains:
            raise LayoutError(f"{domains_csv}: no domain for {name}")
        table[name] = (int(lab), "target" if int(domains[name]) else "source")
    return table


def ground_truth(root: str | Path, machines: Iterable[str] | None = None,
                 eval_list: Mapping[str, Mapping[str, tuple[int, str]]] | None = None
                 ) -> dict[str, dict[str, ClipTruth]]:
    """{machine: {test filename: ClipTruth}} for every machine with known test labels.

    Dev test clips carry label and domain in their names (split ``dev_data``); eval test clips get them from
    ``eval_list`` (``read_eval_list``) for the machines it lists, else from the official evaluator's
    ``ground_truth_data`` / ``ground_truth_domain`` tables when present (split ``eval_data``).
    """
    truth: dict[str, dict[str, ClipTruth]] = {}
    tables: dict[tuple[str, str], tuple[dict | None, str]] = {}
    for r in discover([root], machines):
        if r.split != "test":
            continue
        split = "eval_data" if r.dataset == "eval" else "dev_data"
        if r.label in ("normal", "anomaly"):
            truth.setdefault(r.machine, {})[r.filename] = ClipTruth(int(r.label == "anomaly"), r.domain, split)
            continue
        if r.dataset != "eval" or r.parse_error:
            continue
        key = (r.machine, r.section)
        if key not in tables:
            listed = (eval_list or {}).get(r.machine)
            tables[key] = ((dict(listed), "the eval list") if listed else
                           (read_truth_tables(root, r.machine, r.section), str(ground_truth_paths(root, *key)[0])))
        table, source = tables[key]
        if table is None:
            continue
        if r.filename not in table:
            raise LayoutError(f"{source}: no ground truth for {r.path}")
        label, domain = table[r.filename]
        truth.setdefault(r.machine, {})[r.filename] = ClipTruth(label, domain, split)
    return truth


def _check_names(machine: str, what: str, expected: Iterable[str], got: Iterable[str]) -> None:
    absent, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if absent or extra:
        raise MetricError(f"{machine}: {what} file names do not match ground truth: "
                          f"missing {absent[:5]}{'...' if len(absent) > 5 else ''}, "
                          f"unknown {extra[:5]}{'...' if len(extra) > 5 else ''}")


def evaluate_scores(scores: Mapping[str, Mapping[str, float]], truth: Truth,
                    decisions: Mapping[str, Mapping[str, int]] | None = None, task_map: TaskMap = in_process) -> dict:
    """Metrics (``metrics.summary``: per split, the dev split at the top) from {machine: {filename: score}}
    against ``ground_truth`` output; with ``decisions`` ({machine: {filename: 0/1}}), precision, recall and
    F1 per domain too. ``task_map`` computes the jackknife's leave-one-out values (``metrics.leave_one_out_auc``).

    Every machine of ``truth`` must have scores for exactly its test files, and decisions too where it has any:
    a missing machine, a missing file or an extra file is a MetricError naming it. As the official evaluator
    does, a split with a machine that has no decisions gets none of them: its machines are listed under that
    split's ``machines_without_decisions`` and the other split keeps its own.
    """
    missing = sorted(set(truth) - set(scores))
    if missing:
        raise MetricError(f"no scores for machine(s) {missing}")
    decisions = decisions or {}
    rows_of, split_of = {}, {}
    for machine, table in sorted(truth.items()):
        _check_names(machine, "score", table, scores[machine])
        rows_of[machine] = [(n, ClipTruth(*table[n])) for n in sorted(table)]
        splits = {t.split for _, t in rows_of[machine]}
        if len(splits) > 1:
            raise MetricError(f"{machine}: test clips in both {sorted(splits)}; a machine belongs to one split")
        split_of[machine] = splits.pop()
        if machine in decisions:
            _check_names(machine, "decision", table, decisions[machine])
    undecided: dict[str, list[str]] = {}
    for machine, split in split_of.items():
        if machine not in decisions:
            undecided.setdefault(split, []).append(machine)
    per_split: dict[str, dict[str, dict]] = {}
    pooled: dict[str, tuple[list, list]] = {}
    for machine, rows in rows_of.items():
        split = split_of[machine]
        s = [scores[machine][n] for n, _ in rows]
        decided = None if split in undecided else [decisions[machine][n] for n, _ in rows]
        per_split.setdefault(split, {})[machine] = machine_metrics(
            [t.label for _, t in rows], [t.domain for _, t in rows], s, decided)
        pooled.setdefault(split, ([], []))[0].extend(t.label for _, t in rows)
        pooled[split][1].extend(s)
    splits = {split: split_summary(per, *pooled[split], task_map=task_map) for split, per in per_split.items()}
    if decisions:  # a system that wrote no decision file at all is scored without them, and no more said
        for split, machines in undecided.items():
            splits[split]["machines_without_decisions"] = machines
    return summary(splits)


def read_result_dir(result_dir: str | Path, kind: str = "anomaly_score") -> dict[str, dict[str, float]]:
    """{machine: {filename: value}} from every ``<kind>_<machine>_section_<ss>_test.csv`` of a folder
    (``kind``: ``anomaly_score``, or ``decision_result`` with 0/1 values)."""
    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise MetricError(f"result folder not found: {result_dir}")
    out = {}
    for p in sorted(result_dir.glob(f"{kind}_*_test.csv")):
        m = _RESULT_FILE.match(p.name)
        if not m or m["kind"] != kind:
            continue
        try:
            out[m["machine"]] = {k: (float(v) if kind == "anomaly_score" else int(v)) for k, v in read_rows(p).items()}
        except ValueError as err:
            raise MetricError(f"{p}: {err}") from None
    return out


def evaluate_dir(result_dir: str | Path, data_root: str | Path, machines: Iterable[str] | None = None,
                 eval_list: str | Path | None = None) -> dict:
    """The ``evaluate`` command: official metrics of a folder of result CSVs against a data root (eval ground
    truth from ``eval_list``, the baseline repo's single list, or the root's per-machine tables). Precision,
    recall and F1 come in for each split whose every machine has its ``decision_result_*`` file."""
    truth = ground_truth(data_root, machines, read_eval_list(eval_list) if eval_list else None)
    if not truth:
        raise MetricError(f"{data_root}: no test clips with known labels")
    return evaluate_scores(read_result_dir(result_dir), truth, read_result_dir(result_dir, "decision_result"))


_OVER_ALL = "over all machine types, sections, and domains"


def _mean_rows(label: str, perf: np.ndarray) -> list[list]:
    """The evaluator's four summary rows of a (5 x 2n) table (AUC, pAUC, precision, recall, F1 rows; the
    n source values, then the n target values)."""
    half = perf.shape[1] // 2
    floored = np.maximum(perf, EPS)
    suffix = f" {_OVER_ALL}" if label else ""
    return [[f"arithmetic mean{suffix}", "", *map(float, np.mean(perf, axis=1))],
            [f"harmonic mean{suffix}", "", *map(float, hmean(floored, axis=1))],
            [f"source harmonic mean{suffix}", "", *map(float, hmean(floored[:, :half], axis=1))],
            [f"target harmonic mean{suffix}", "", *map(float, hmean(floored[:, half:], axis=1))]]


def write_evaluator_result(path: str | Path, split: Mapping, section: str = "00") -> Path:
    """``<system>_result.csv`` as the official evaluator writes it for one split (``metrics.split_summary``
    output with decisions and the jackknife): per machine its row of ``EVALUATOR_COLUMNS`` and four means,
    then the means over all machines, the official score and its ci95. Values unrounded."""
    missing = [m for m, v in split["machines"].items() if any(k not in v for k in DECISION_KEYS)]
    if missing or "official_score_ci95" not in split:
        raise MetricError(f"the evaluator's result table needs decisions and pooled clips; missing for {missing}")
    header = ["", "", "AUC", "pAUC", "precision", "recall", "F1 score"]
    rows: list[list] = []
    machines = split["machines"]

    def perf(vs: list[Mapping]) -> np.ndarray:
        pairs = (("auc_source", "auc_target"), ("pauc", "pauc"), ("precision_source", "precision_target"),
                 ("recall_source", "recall_target"), ("f1_source", "f1_target"))
        return np.array([[v[a] for v in vs] + [v[b] for v in vs] for a, b in pairs], dtype=float)

    for machine, v in machines.items():
        rows += [[machine], ["section", *EVALUATOR_COLUMNS.values()], [section, *(v[k] for k in EVALUATOR_COLUMNS)],
                 header, *_mean_rows("", perf([v])), []]
    rows += [header, *_mean_rows("all", perf(list(machines.values()))), [],
             ["official score", "", split["official_score"]], ["official score ci95", "", split["official_score_ci95"]],
             []]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return path


def write_evaluator_results(out_dir: str | Path, metrics: Mapping, system: str) -> list[Path]:
    """``<out_dir>/evaluator/<split>/<system>_result.csv`` for every split whose table can be written."""
    paths = []
    for name, split in metrics.get("splits", {}).items():
        if all(all(k in v for k in DECISION_KEYS) for v in split["machines"].values()):
            paths.append(write_evaluator_result(Path(out_dir) / "evaluator" / name / f"{system}_result.csv", split))
    return paths
