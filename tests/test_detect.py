"""The single-process reference run: official files, clip accounting with bad clips, bank strategies."""

import csv
import errno
import json
import shutil

import numpy as np
import pytest
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

from asd_ray.cli import main
from asd_ray.config import ConfigError, RunConfig, load_config
from asd_ray.data.layout import LayoutError, ground_truth_paths
from asd_ray.detect import reference_run
from asd_ray.distributed.sweep import load_space
from tiny import NOT_FILES, TINY, entries_named_like_clips


def test_reference_run_writes_official_files(tiny_corpus, tmp_path):
    report = reference_run([tiny_corpus], RunConfig(), tmp_path)
    assert set(report.results) == {"ToyCar", "valve", "ToyPet"}
    for m in report.results:
        rows = (tmp_path / f"anomaly_score_{m}_section_00_test.csv").read_text().splitlines()
        assert len(rows) == 4 * TINY["test_per_cell"]
        assert rows[0].startswith("section_00_") and not rows[0].startswith("filename")
        scores = np.array([float(r.split(",")[1]) for r in rows])
        res = report.results[m]  # min-max on the bank's leave-one-out train range: the fleet's and service's scale
        assert np.median(scores[res.decisions == 0]) < 1.0 < np.max(scores)
        assert ((scores > res.threshold) == res.decisions.astype(bool)).all()
        decisions = (tmp_path / f"decision_result_{m}_section_00_test.csv").read_text().splitlines()
        assert {d.split(",")[1] for d in decisions} <= {"0", "1"} and len(decisions) == len(rows)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["splits"]["dev_data"]["machines"]) == {"ToyCar", "valve"}
    assert set(metrics["splits"]["eval_data"]["machines"]) == {"ToyPet"}
    assert 0.0 <= metrics["official_score"] <= 1.0
    assert load_config(RunConfig, tmp_path / "config.yaml") == RunConfig()
    for split in ("dev_data", "eval_data"):
        assert (tmp_path / "evaluator" / split / f"{tmp_path.name}_result.csv").is_file()
    report_md = (tmp_path / "report.md").read_text()
    assert "## dev_data" in report_md and "## eval_data" in report_md
    assert f"(evaluator/dev_data/{tmp_path.name}_result.csv)" in report_md  # F1 and the rest of the wide table
    assert "This is `official_score` at the top of `metrics.json`; eval_data is scored apart" in report_md


def _official_score_by_hand(out, machines, truth):
    """The official evaluator's computation from the CSVs a run wrote: per machine, AUC on each domain's
    normals plus all anomalies and pAUC (max_fpr 0.1) on all clips; h-mean over the machines' values."""
    values = []
    for machine in machines:
        rows = [line.split(",") for line in (out / f"anomaly_score_{machine}_section_00_test.csv").read_text().split()]
        y = np.array([truth[machine][name][0] for name, _ in rows])
        target = np.array([truth[machine][name][1] for name, _ in rows])
        s = np.array([float(v) for _, v in rows])
        values += [roc_auc_score(y[(target == 0) | (y == 1)], s[(target == 0) | (y == 1)]),
                   roc_auc_score(y[(target == 1) | (y == 1)], s[(target == 1) | (y == 1)]),
                   roc_auc_score(y, s, max_fpr=0.1)]
    return hmean(values)


def test_dev_and_eval_scores_are_each_the_official_computation(tiny_corpus, tmp_path):
    reference_run([tiny_corpus], load_config(RunConfig, None, ["detector=knn"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # dev truth from the file names; eval truth from the evaluator's tables the synthetic root carries
    dev = {m: {p.name: (int("_anomaly_" in p.name), int("_target_" in p.name))
               for p in (tiny_corpus / "dev_data/raw" / m / "test").iterdir()} for m in TINY["dev_machines"]}
    eval_truth = {}
    for m in TINY["eval_machines"]:
        labels, domains, _ = ground_truth_paths(tiny_corpus, m)
        domain_of = dict(csv.reader(domains.open()))
        eval_truth[m] = {name: (int(lab), int(domain_of[name])) for name, lab in csv.reader(labels.open())}
    dev_score = _official_score_by_hand(tmp_path, TINY["dev_machines"], dev)
    eval_score = _official_score_by_hand(tmp_path, TINY["eval_machines"], eval_truth)
    assert metrics["splits"]["dev_data"]["official_score"] == pytest.approx(dev_score, abs=1e-9)
    assert metrics["splits"]["eval_data"]["official_score"] == pytest.approx(eval_score, abs=1e-9)
    assert abs(dev_score - eval_score) > 1e-3  # the two differ, so a mix-up would show
    assert metrics["official_score"] == metrics["splits"]["dev_data"]["official_score"]
    assert metrics["headline_split"] == "dev_data"
    with pytest.raises(LayoutError, match="eval list not found"):  # before anything is embedded
        reference_run([tiny_corpus], load_config(RunConfig, None, [f"eval_list={tmp_path / 'none.csv'}"]))


def test_bad_clips_are_rejected_with_reasons_and_counts_reconcile(corpus_with_bad_clips, tmp_path):
    report = reference_run([corpus_with_bad_clips], RunConfig(), tmp_path)
    reasons = {r.path.rsplit("/", 1)[1]: r.reason for r in report.rejects}
    assert "cannot decode" in reasons["section_00_source_train_normal_0900_spd_99_mic_1.wav"]
    assert "cannot decode" in reasons["section_00_source_test_normal_0900_spd_99_mic_1.wav"]
    assert "cannot decode" in reasons["section_00_target_test_anomaly_0901_spd_99_mic_2.wav"]
    unused = {u.path.rsplit("/", 1)[1]: u.reason for u in report.unused}
    assert "matches no DCASE naming form" in unused["clip recorded tuesday.wav"]
    for name, reason in NOT_FILES.items():  # a directory named like a clip, a dangling link: listed, not lost
        assert reason in unused[name]
    assert report.clips_in == entries_named_like_clips(corpus_with_bad_clips)
    assert report.clips_in == report.clips_embedded + len(report.rejects) + len(report.unused)
    unused_csv = (tmp_path / "unused.csv").read_text()
    assert all(name in unused_csv for name in NOT_FILES)
    assert len(report.results["ToyCar"].filenames) == 4 * TINY["test_per_cell"]  # the good clips are scored
    rejects_csv = (tmp_path / "rejects.csv").read_text()
    assert "section_00_source_test_normal_0900_spd_99_mic_1.wav" in rejects_csv
    assert "ToyCar/section_00_source_test_normal_0900_spd_99_mic_1.wav" in report.metrics["excluded_test_clips"]


def test_domain_aware_option_runs_against_seed(tiny_corpus):
    seed = reference_run([tiny_corpus], load_config(RunConfig, None, ["detector=knn"]))
    aware = reference_run([tiny_corpus], load_config(RunConfig, None, ["detector=knn", "bank.strategy=domain_aware"]))
    assert seed.metrics["official_score"] != aware.metrics["official_score"]
    for m in seed.results:
        assert seed.results[m].filenames == aware.results[m].filenames
        assert aware.results[m].bank_size == seed.results[m].bank_size


def test_hubert_backbone_through_the_run(tiny_corpus, tiny_hubert, tmp_path, capsys):
    assert main(["run", "--data", str(tiny_corpus), "--backbone", str(tiny_hubert), "--out", str(tmp_path),
                 "--machines", "valve", "--detector", "knn", "--set", "bank.metric=cosine"]) == 0
    assert "official score" in capsys.readouterr().out
    assert (tmp_path / "anomaly_score_valve_section_00_test.csv").is_file()
    assert main(["run", "--data", str(tiny_corpus), "--out", str(tmp_path), "--set", "bank.k=zero"]) == 2
    assert "bank.k" in capsys.readouterr().err


def test_machine_without_a_bank_is_listed_and_the_others_go_on(tiny_corpus, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_corpus, root)
    valve = root / "dev_data/raw/valve"
    usable, *unreadable = sorted((valve / "train").iterdir())
    for p in unreadable:
        p.write_bytes(b"")  # all but one valve train clip unreadable
    shutil.copytree(valve / "train", root / "dev_data/raw/fan/train")  # a machine with train clips only
    report = reference_run([root], RunConfig(), tmp_path / "out")
    assert "valve" not in report.results and {"ToyCar", "ToyPet"} <= set(report.results)
    unscored = {u.path: u.reason for u in report.unscored}
    # valve's test clips and its one usable train clip: embedded, scored nowhere, so listed with the reason
    assert len(unscored) == 4 * TINY["test_per_cell"] + 1 + 1
    assert unscored[str(usable)] == "machine valve: 1 usable normal train clip(s); a bank needs at least 2"
    assert all(unscored[str(p)] == unscored[str(usable)] for p in (valve / "test").iterdir())
    assert unscored[str(root / "dev_data/raw/fan/train" / usable.name)] == (
        "machine fan: no test clips to score, so no bank is fitted")
    table = (tmp_path / "out/unscored.csv").read_text()
    assert str(usable) in table and "machine fan" in table
    # every clip of a machine without a bank is listed somewhere, with its reason
    listed = set(unscored) | {r.path for r in report.rejects} | {u.path for u in report.unused}
    assert {str(p) for m in ("valve", "fan") for p in (root / "dev_data/raw" / m).rglob("*.wav")} <= listed
    assert report.clips_in == report.clips_embedded + len(report.rejects) + len(report.unused)


def test_a_clip_that_cannot_be_opened_for_lack_of_permission_is_rejected_saying_so(tiny_corpus, tmp_path,
                                                                                    monkeypatch):
    """Tests run as root, whom chmod 000 does not stop: the decoder's own open is refused for one clip instead,
    as the kernel refuses it to a user without read permission."""
    from asd_ray.data import audio

    locked = str(sorted((tiny_corpus / "dev_data/raw/valve/train").iterdir())[0])

    def refuse(path, *args, **kwargs):
        if str(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(audio, "open", refuse, raising=False)
    report = reference_run([tiny_corpus], load_config(RunConfig, None, ["detector=knn"]), tmp_path, ["valve"])
    assert [(r.path, r.reason) for r in report.rejects] == [(locked, f"permission denied: {locked}")]
    with open(tmp_path / "rejects.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [[locked, f"permission denied: {locked}"]]
    assert report.clips_in == report.clips_embedded + len(report.rejects) + len(report.unused)


def test_a_frame_detector_over_an_encoder_checkpoint_eats_its_frames(tiny_corpus, tiny_hubert, tmp_path, capsys):
    """The default detector with ``--backbone`` a transformers encoder (it refused one before): its banks hold the
    encoder's frames (20 ms, the hidden size wide) through Ray; the log-mel settings are refused as unread."""
    from asd_ray.detectors import load_detector

    args = ["run", "--data", str(tiny_corpus), "--backbone", str(tiny_hubert), "--machines", "valve",
            "--detector", "fusion", "--set", f"ray.cache_dir={tmp_path / 'cache'}"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert load_detector(tmp_path / "run" / "banks" / "valve").dim == 32  # the tiny HuBERT's hidden size
    assert main([*args, "--out", str(tmp_path / "bad"), "--set", "frames.n_mels=64"]) == 2
    assert "frames.n_mels is not read by detector fusion" in capsys.readouterr().err


def test_a_batch_run_refuses_the_median_filter(tiny_corpus, tmp_path, capsys):
    """DCASE file names group a machine's test clips by domain and label: a median filter over them in that order
    would smooth within labels. Batch runs and sweep spaces refuse it; streams keep it (test_fleet, test_service)."""
    assert main(["run", "--local", "--data", str(tiny_corpus), "--out", str(tmp_path), "--machines", "valve",
                 "--set", "post.median_window=3"]) == 2
    assert "post.median_window=3: a batch run's test clips have no time order" in capsys.readouterr().err
    assert not (tmp_path / "anomaly_score_valve_section_00_test.csv").exists()
    space = tmp_path / "space.yaml"
    space.write_text("grid:\n  bank.k: [1, 3]\n  post.median_window: [1, 3]\n")
    with pytest.raises(ConfigError, match="median_window=3"):
        load_space(space)
