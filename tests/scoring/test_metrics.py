"""Official metrics on fixed tables, and the result files / evaluate step."""

import csv
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import scipy.stats
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

from asd_ray.cli import main
from asd_ray.data.layout import LayoutError, discover
from asd_ray.data.synth import eval_list_name
from asd_ray.scoring.files import (ClipTruth, decision_path, evaluate_dir, evaluate_scores, ground_truth, read_eval_list, read_rows,
                                   score_path, write_evaluator_result, write_results)
from asd_ray.scoring import metrics
from asd_ray.scoring.metrics import (EVALUATOR_COLUMNS, MetricError, decision_metrics, jackknife,
                                     leave_one_out_auc, leave_one_out_aucs, machine_metrics, official_score, score_ci95)

# 4 source normals, 4 target normals, 2 source anomalies, 2 target anomalies
LABELS = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
DOMAINS = ["source"] * 4 + ["target"] * 4 + ["source", "source", "target", "target"]
SCORES = [0.1, 0.2, 0.3, 0.9, 0.5, 0.6, 0.7, 0.8, 0.85, 0.95, 0.4, 0.75]


def test_auc_per_domain_uses_that_domains_normals_and_all_anomalies():
    m = machine_metrics(LABELS, DOMAINS, SCORES)
    # source: normals .1 .2 .3 .9 vs anomalies .85 .95 .4 .75 -> pairs won: 3+4+3+3 = 13 of 16
    assert m["auc_source"] == pytest.approx(13 / 16)
    # target: normals .5 .6 .7 .8 vs anomalies -> .85:4 .95:4 .4:0 .75:3 = 11 of 16
    assert m["auc_target"] == pytest.approx(11 / 16)


def test_pauc_is_mcclish_corrected_standardised_partial_auc():
    # perfect ranking -> 1; reversed -> 0.5 floor of McClish's correction (min area / max area)
    assert machine_metrics([0, 0, 1, 1], ["source", "target", "source", "target"], [0, 0.1, 0.8, 0.9])["pauc"] == 1.0
    m = machine_metrics(LABELS, DOMAINS, SCORES)
    # hand computation: FPR <= 0.1 over 8 normals only reaches FPR 0 -> ... compare with the definition
    y, s = np.array(LABELS), np.array(SCORES)
    order = np.argsort(-s)
    tpr = np.concatenate([[0], np.cumsum(y[order]) / y.sum()])
    fpr = np.concatenate([[0], np.cumsum(1 - y[order]) / (1 - y).sum()])
    stop = np.searchsorted(fpr, 0.1, "right")
    x = np.concatenate([fpr[:stop], [0.1]])
    t = np.concatenate([tpr[:stop], [np.interp(0.1, fpr, tpr)]])
    partial = np.trapezoid(t, x)
    min_area, max_area = 0.5 * 0.1**2, 0.1
    assert m["pauc"] == pytest.approx(0.5 * (1 + (partial - min_area) / (max_area - min_area)))


def test_official_score_is_hmean_of_all_values():
    per = {"a": {"auc_source": 0.8, "auc_target": 0.6, "pauc": 0.55}, "b": {"auc_source": 0.9, "auc_target": 0.5, "pauc": 0.7}}
    assert official_score(per) == pytest.approx(hmean([0.8, 0.6, 0.55, 0.9, 0.5, 0.7]))


def test_needs_both_classes():
    with pytest.raises(MetricError, match="both normal and anomalous"):
        machine_metrics([0, 0], ["source", "target"], [0.1, 0.2])


def test_result_files_have_no_header_and_round_trip(tmp_path):
    sp, dp = write_results(tmp_path, "fan", ["a.wav", "b.wav"], [0.25, 1.0], [0, 1])
    assert sp.name == "anomaly_score_fan_section_00_test.csv"
    assert dp.name == "decision_result_fan_section_00_test.csv"
    assert sp.read_text().splitlines() == ["a.wav,0.25", "b.wav,1.0"]
    assert dp.read_text().splitlines() == ["a.wav,0", "b.wav,1"]
    assert read_rows(sp) == {"a.wav": "0.25", "b.wav": "1.0"}


def _truth():
    return {"fan": {f"c{i}.wav": (LABELS[i], DOMAINS[i]) for i in range(12)}}


def test_evaluate_against_hand_made_tables():
    scores = {"fan": {f"c{i}.wav": SCORES[i] for i in range(12)}}
    out = evaluate_scores(scores, _truth())
    assert out["machines"]["fan"]["auc_source"] == pytest.approx(13 / 16)
    assert out["official_score"] == pytest.approx(hmean([13 / 16, 11 / 16, out["machines"]["fan"]["pauc"]]))


def test_file_name_mismatch_is_a_clear_error():
    scores = {"fan": {f"c{i}.wav": SCORES[i] for i in range(11)} | {"stray.wav": 0.3}}
    with pytest.raises(MetricError, match=r"fan: score file names do not match.*c11.wav.*stray.wav"):
        evaluate_scores(scores, _truth())


def test_missing_machine_is_a_clear_error():
    with pytest.raises(MetricError, match=r"no scores for machine\(s\) \['fan'\]"):
        evaluate_scores({"pump": {}}, _truth())


def _random_system(corpus, scores_dir):
    """A system folder with random scores and decisions for every test clip of ``corpus``."""
    rng = np.random.default_rng(0)
    test = [r for r in discover([corpus]) if r.split == "test"]
    for m in {r.machine for r in test}:
        names = sorted(r.filename for r in test if r.machine == m)
        write_results(scores_dir, m, names, rng.random(len(names)), rng.integers(0, 2, len(names)))
    return scores_dir


def test_evaluate_command_on_dev_and_eval_ground_truth(tiny_corpus, tmp_path, capsys):
    scores_dir = _random_system(tiny_corpus, tmp_path / "mysystem")
    out = evaluate_dir(scores_dir, tiny_corpus)
    assert set(out["splits"]) == {"dev_data", "eval_data"}
    assert set(out["splits"]["dev_data"]["machines"]) == {"ToyCar", "valve"}
    assert set(out["splits"]["eval_data"]["machines"]) == {"ToyPet"}  # from the eval ground-truth tables
    assert out["headline_split"] == "dev_data" and out["machines"] == out["splits"]["dev_data"]["machines"]
    assert out["official_score"] == out["splits"]["dev_data"]["official_score"]
    assert "f1_source" in out["machines"]["valve"]  # the decision files were read
    # the baseline repo's single eval list gives the same eval metrics as the per-machine tables
    listed = evaluate_dir(scores_dir, tiny_corpus, eval_list=tiny_corpus / eval_list_name())
    assert listed["splits"] == out["splits"]
    assert main(["evaluate", "--scores", str(scores_dir), "--data", str(tiny_corpus), "--out", str(tmp_path / "ev"),
                 "--eval-list", str(tiny_corpus / eval_list_name())]) == 0
    printed = capsys.readouterr().out
    assert "eval_data official score" in printed and "official score = the dev_data score" in printed
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["splits"] == out["splits"]
    for split in ("dev_data", "eval_data"):
        assert (tmp_path / "ev" / "evaluator" / split / "mysystem_result.csv").is_file()
    score_path(scores_dir, "valve").unlink()
    assert main(["evaluate", "--scores", str(scores_dir), "--data", str(tiny_corpus)]) == 2
    assert "no scores for machine(s) ['valve']" in capsys.readouterr().err


def test_auc_over_all_clips():
    # normals .1 .2 .3 .9 .5 .6 .7 .8; anomalies .85 (beats 7) .95 (8) .4 (3) .75 (6): 24 of 32 pairs
    assert machine_metrics(LABELS, DOMAINS, SCORES)["auc_all"] == pytest.approx(24 / 32)


def test_precision_recall_f1_per_domain_count_that_domains_clips_only():
    # source: normals 0-3 decide 0 0 1 0, anomalies 8 9 decide 1 0 -> tp 1, fp 1, fn 1
    # target: normals 4-7 all 0, anomalies 10 11 both 1 -> tp 2, fp 0, fn 0 (were they counted in the
    # source domain as AUC counts anomalies, source recall would be 3 / 4)
    decisions = [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    m = machine_metrics(LABELS, DOMAINS, SCORES, decisions)
    assert (m["precision_source"], m["recall_source"], m["f1_source"]) == (0.5, 0.5, 0.5)
    assert (m["precision_target"], m["recall_target"], m["f1_target"]) == (1.0, 1.0, 1.0)
    # no positive decision: precision 0 / eps = 0, recall 0, F1 0 (the evaluator's floors, no error)
    none = decision_metrics(LABELS, DOMAINS, [0] * 12)
    assert none["precision_source"] == none["recall_source"] == none["f1_source"] == 0.0
    # everything flagged: source p = 2 / 6, r = 1, F1 = 2 p r / (p + r) = 0.5
    flagged = decision_metrics(LABELS, DOMAINS, [1] * 12)
    assert flagged["precision_source"] == pytest.approx(2 / 6) and flagged["f1_source"] == pytest.approx(0.5)
    with pytest.raises(MetricError, match="0 or 1"):
        decision_metrics(LABELS, DOMAINS, [2] * 12)


def test_jackknife_matches_a_hand_computation():
    # mean of 1 2 3 4: leave-one-out means 3, 8/3, 7/3, 2 (their mean 2.5, squared deviations sum 5/9);
    # pseudo-values 4 * 2.5 - 3 * loo = 1 2 3 4 -> estimate 2.5; half-width t(0.975, 3) * sqrt(5/9 / (4 * 3))
    estimate, half = jackknife(2.5, np.array([3.0, 8 / 3, 7 / 3, 2.0]))
    assert estimate == pytest.approx(2.5)
    assert half == pytest.approx(3.182446305284263 * np.sqrt(5 / 9 / 12))
    # AUC of 3 normals (.1 .4 .35) and 2 anomalies (.8 .3): leave-one-out AUCs 2/4, 3/4, 3/4, 1/3, 3/3
    # (mean 2/3, squared deviations sum 19/72) -> half-width t(0.975, 4) * sqrt(19/72 / (5 * 4))
    y, s = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.3])
    np.testing.assert_allclose(leave_one_out_auc(y, s), [2 / 4, 3 / 4, 3 / 4, 1 / 3, 3 / 3])
    # the evaluator's "official score ci95": the mean of the AUC and pAUC half-widths over the pooled clips
    ci = score_ci95(y, s)
    assert ci["auc_ci95"] == pytest.approx(2.7764451051977987 * np.sqrt(19 / 72 / 20))
    assert ci["official_score_ci95"] == pytest.approx((ci["auc_ci95"] + ci["pauc_ci95"]) / 2)


@pytest.mark.parametrize("max_fpr", [None, 0.1, 0.35])
def test_leave_one_out_aucs_equal_sklearn_on_each_clip_left_out(max_fpr):
    """The leave-one-out values equal sklearn run N times to the last bit, ties and all (scores rounded to 0.1)."""
    rng = np.random.default_rng(3)
    for n in (5, 17, 60, 700):
        y = np.r_[0, 0, 1, 1, (rng.random(n - 4) < 0.4).astype(int)]
        s = np.round(rng.random(n) + 0.4 * y, 1)
        keep = ~np.eye(n, dtype=bool)
        kwargs = {} if max_fpr is None else {"max_fpr": max_fpr}
        brute = [roc_auc_score(y[keep[i]], s[keep[i]], **kwargs) for i in range(n)]
        np.testing.assert_array_equal(leave_one_out_auc(y, s, max_fpr), brute)


def test_the_jackknife_in_jobs_run_by_other_processes_is_bit_identical(monkeypatch):
    """The leave-one-out values computed in jobs of LOO_CHUNK clips by other processes (a Ray run's tasks) are
    sklearn on each clip left out, in the clips' order, ties included; the ci95 is the in-process one to the bit."""
    monkeypatch.setattr(metrics, "LOO_CHUNK", 64)  # several jobs of 150 clips
    rng = np.random.default_rng(5)
    y = (rng.random(150) < 0.4).astype(int)
    s = np.round(rng.random(150) + 0.4 * y, 2)  # ties: fewer distinct (label, score) pairs than clips
    calls = []

    def pool_map(fn, jobs):
        calls.append(len(jobs))
        with ProcessPoolExecutor(2) as pool:
            return list(pool.map(fn, *zip(*jobs)))

    loo_auc, loo_pauc = leave_one_out_aucs(y, s, (None, 0.1), pool_map)
    distinct = len(set(zip(y, s)))
    assert distinct < 150 and calls == [2 * -(-distinct // metrics.LOO_CHUNK)] and calls[0] > 2
    keep = ~np.eye(150, dtype=bool)
    np.testing.assert_array_equal(loo_auc, [roc_auc_score(y[keep[i]], s[keep[i]]) for i in range(150)])
    np.testing.assert_array_equal(loo_pauc, [roc_auc_score(y[keep[i]], s[keep[i]], max_fpr=0.1) for i in range(150)])
    assert score_ci95(y, s, task_map=pool_map) == score_ci95(y, s)


# the official evaluator's per-machine columns (its COLUMNS), in its order
EVALUATOR_HEADER = ["section", "AUC (all)", "AUC (source)", "AUC (target)", "pAUC", "precision (source)",
                    "precision (target)", "recall (source)", "recall (target)", "F1 score (source)",
                    "F1 score (target)"]


def test_result_csv_has_the_evaluators_rows_and_columns(tmp_path):
    rng = np.random.default_rng(1)
    truth, scores, decisions = {}, {}, {}
    for machine in ("fan", "ToyCar"):
        truth[machine] = {f"c{i}.wav": (LABELS[i], DOMAINS[i]) for i in range(12)}
        scores[machine] = {f"c{i}.wav": float(v) for i, v in enumerate(rng.random(12))}
        decisions[machine] = {f"c{i}.wav": int(v) for i, v in enumerate(rng.integers(0, 2, 12))}
    split = evaluate_scores(scores, truth, decisions)["splits"]["dev_data"]
    path = write_evaluator_result(tmp_path / "mysystem_result.csv", split)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["ToyCar"] and rows[1] == EVALUATOR_HEADER  # machines sorted as the evaluator sorts them
    assert rows[2][0] == "00" and [float(v) for v in rows[2][1:]] == [split["machines"]["ToyCar"][k]
                                                                       for k in EVALUATOR_COLUMNS]
    assert rows[3] == ["", "", "AUC", "pAUC", "precision", "recall", "F1 score"]
    assert [r[0] for r in rows[4:8]] == ["arithmetic mean", "harmonic mean", "source harmonic mean",
                                         "target harmonic mean"]
    v = split["machines"]["ToyCar"]
    assert float(rows[4][2]) == pytest.approx((v["auc_source"] + v["auc_target"]) / 2)
    assert float(rows[6][2]) == v["auc_source"] and float(rows[7][6]) == pytest.approx(v["f1_target"])
    assert rows[8] == [] and rows[9] == ["fan"]
    overall = {r[0]: r[2:] for r in rows[18:] if r}
    assert float(overall["arithmetic mean over all machine types, sections, and domains"][0]) == pytest.approx(
        split["mean_auc"])
    assert float(overall["source harmonic mean over all machine types, sections, and domains"][0]) == pytest.approx(
        split["hmean_source"])
    assert float(overall["official score"][0]) == split["official_score"]
    assert float(overall["official score ci95"][0]) == split["official_score_ci95"]
    assert path.read_text().endswith("\n\n") and "\r" not in path.read_text()


def test_eval_list_in_the_baseline_repos_format(tmp_path):
    listing = tmp_path / "eval_data_list_2025.csv"
    listing.write_text("AutoTrash\n"
                       "section_00_0000.wav,section_00_target_test_anomaly_0012_id_C1_spd_2_mic_2.wav\n"
                       "section_00_0001.wav,section_00_source_test_normal_0031_id_B2_spd_1_mic_2.wav\n"
                       "HomeCamera\n"
                       "section_00_0000.wav,section_00_source_test_anomaly_0037_id_A2_spd_2_mic_3.wav\n")
    assert read_eval_list(listing) == {"AutoTrash": {"section_00_0000.wav": (1, "target"),
                                                     "section_00_0001.wav": (0, "source")},
                                       "HomeCamera": {"section_00_0000.wav": (1, "source")}}
    # a root whose eval clips it names (empty files: ground truth reads names only)
    for name in ("section_00_0000.wav", "section_00_0001.wav"):
        path = tmp_path / "root/eval_data/raw/AutoTrash/test" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    truth = ground_truth(tmp_path / "root", eval_list=read_eval_list(listing))
    assert truth["AutoTrash"]["section_00_0000.wav"] == ClipTruth(1, "target", "eval_data")
    assert ground_truth(tmp_path / "root") == {}  # no tables, no list: no labels
    listing.write_text("AutoTrash\nsection_00_0000.wav,not_a_dcase_name.wav\n")
    with pytest.raises(LayoutError, match="eval_data_list_2025.csv:2"):
        read_eval_list(listing)


def _evaluators_ci95(y, s):
    """nttcslab/dcase2024_task2_evaluator @ b5d17f6, ``jackknife_estimate`` and its "official score ci95" line,
    transcribed (its steps 1, 2, 3, 6, 7): sklearn on every clip left out, then the half-width; the line is
    ``str(numpy.mean([auc_ci95, p_auc_ci95]))``."""
    def half_width(fn):
        n = len(y)
        loo = [fn(y[[j for j in range(n) if j != i]], s[[j for j in range(n) if j != i]]) for i in range(n)]
        mean = np.mean(loo)
        sigma = np.sqrt(np.sum([(v - mean) ** 2 for v in loo]) / (n * (n - 1)))
        return np.abs(scipy.stats.t.ppf((1 - 0.95) / 2, n - 1)) * sigma

    return str(np.mean([half_width(roc_auc_score), half_width(lambda a, b: roc_auc_score(a, b, max_fpr=0.1))]))


@pytest.mark.parametrize("seed", [0, 4])
def test_ci95_line_is_the_evaluators_to_the_last_digit(seed):
    """Seeds where leave-one-out AUCs from rank counts gave another last digit (...7432 08 against ...7432 023)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.5).astype(int)
    s = rng.random(200) + 0.3 * y
    assert str(score_ci95(y, s)["official_score_ci95"]) == _evaluators_ci95(y, s)


def test_a_missing_decision_file_drops_that_splits_table_only(tiny_corpus, tmp_path, capsys):
    """As the official evaluator: a dev machine without its decision file -> no dev table, the eval one written,
    and the message names the machine and the split."""
    scores_dir = _random_system(tiny_corpus, tmp_path / "mysystem")
    decision_path(scores_dir, "valve").unlink()
    assert main(["evaluate", "--scores", str(scores_dir), "--data", str(tiny_corpus), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "dev_data: no evaluator table: no decision_result_* file for valve" in printed
    assert not (tmp_path / "ev" / "evaluator" / "dev_data").exists()
    assert (tmp_path / "ev" / "evaluator" / "eval_data" / "mysystem_result.csv").is_file()
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["splits"]["dev_data"]["machines_without_decisions"] == ["valve"]
    assert "f1_source" not in metrics["splits"]["dev_data"]["machines"]["ToyCar"]
    assert "f1_source" in metrics["splits"]["eval_data"]["machines"]["ToyPet"]
