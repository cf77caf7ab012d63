"""Official result files and ground truth, and the ``evaluate`` step over a folder of them.

Result files, one pair per machine and section, no header, rows ``filename,value``:
``anomaly_score_<machine>_section_<ss>_test.csv`` and ``decision_result_<machine>_section_<ss>_test.csv``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Mapping

from asd_ray.data.layout import ClipRecord, LayoutError, discover, ground_truth_paths
from asd_ray.scoring.metrics import MetricError, machine_metrics, summary

_SCORE_FILE = re.compile(r"^anomaly_score_(?P<machine>.+)_section_(?P<section>\d{2})_test\.csv$")


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


def ground_truth(root: str | Path, machines: Iterable[str] | None = None) -> dict[str, dict[str, tuple[int, str]]]:
    """{machine: {test filename: (label 0/1, domain)}} for every machine with known test labels.

    Dev test clips carry label and domain in their names; eval test clips get them from the
    official evaluator's ``ground_truth_data`` / ``ground_truth_domain`` tables when present.
    """
    truth: dict[str, dict[str, tuple[int, str]]] = {}
    records: list[ClipRecord] = discover([root], machines)
    for r in records:
        if r.split != "test":
            continue
        if r.label in ("normal", "anomaly"):
            truth.setdefault(r.machine, {})[r.filename] = (int(r.label == "anomaly"), r.domain)
        elif r.dataset == "eval" and not r.parse_error:
            labels_csv, domains_csv, _ = ground_truth_paths(root, r.machine, r.section)
            if not labels_csv.is_file():
                continue
            table = truth.setdefault(r.machine, {})
            if not table:
                labels, domains = read_rows(labels_csv), read_rows(domains_csv)
                for name, lab in labels.items():
                    if name not in domains:
                        raise LayoutError(f"{domains_csv}: no domain for {name}")
                    table[name] = (int(lab), "target" if int(domains[name]) else "source")
            if r.filename not in table:
                raise LayoutError(f"{labels_csv}: no ground truth for {r.path}")
    return truth


def evaluate_scores(scores: Mapping[str, Mapping[str, float]], truth: Mapping[str, Mapping[str, tuple[int, str]]]
                    ) -> dict:
    """Metrics from {machine: {filename: score}} against ``ground_truth`` output.

    Every machine of ``truth`` must have scores for exactly its test files: a missing machine,
    a missing file or an extra file is a MetricError naming it.
    """
    missing = sorted(set(truth) - set(scores))
    if missing:
        raise MetricError(f"no scores for machine(s) {missing}")
    per_machine = {}
    for machine, table in sorted(truth.items()):
        got = scores[machine]
        absent, extra = sorted(set(table) - set(got)), sorted(set(got) - set(table))
        if absent or extra:
            raise MetricError(f"{machine}: score file names do not match ground truth: "
                              f"missing {absent[:5]}{'...' if len(absent) > 5 else ''}, "
                              f"unknown {extra[:5]}{'...' if len(extra) > 5 else ''}")
        names = sorted(table)
        per_machine[machine] = machine_metrics([table[n][0] for n in names], [table[n][1] for n in names],
                                               [got[n] for n in names])
    return summary(per_machine)


def read_score_dir(result_dir: str | Path) -> dict[str, dict[str, float]]:
    """{machine: {filename: score}} from every ``anomaly_score_*`` file of a folder."""
    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise MetricError(f"result folder not found: {result_dir}")
    out = {}
    for p in sorted(result_dir.glob("anomaly_score_*_test.csv")):
        m = _SCORE_FILE.match(p.name)
        if not m:
            continue
        try:
            out[m["machine"]] = {k: float(v) for k, v in read_rows(p).items()}
        except ValueError as err:
            raise MetricError(f"{p}: {err}") from None
    return out


def evaluate_dir(result_dir: str | Path, data_root: str | Path, machines: Iterable[str] | None = None) -> dict:
    """The ``evaluate`` command: official metrics of a folder of result CSVs against a data root."""
    truth = ground_truth(data_root, machines)
    if not truth:
        raise MetricError(f"{data_root}: no test clips with known labels")
    return evaluate_scores(read_score_dir(result_dir), truth)
