"""The synthetic corpus: exact DCASE layout, determinism, and fairness as a test of detectors."""

import csv

import numpy as np
import pytest
import soundfile as sf

from asd_ray.cli import main
from asd_ray.config import PostConfig, PreprocessConfig, RunConfig
from asd_ray.data.audio import preprocess_clip
from asd_ray.data.layout import EVAL_MACHINES, discover, ground_truth_paths, read_attributes_csv, summarise
from asd_ray.data.synth import eval_list_name, generate_corpus
from asd_ray.detect import detect, embed_records, plan_records
from asd_ray.detectors import make_detector
from asd_ray.models.backbones import load_backbone
from asd_ray.scoring.files import read_eval_list
from asd_ray.scoring.metrics import machine_metrics
from tiny import TINY


def test_layout_and_names_are_dcase_2025(tiny_corpus):
    train = sorted(p.name for p in (tiny_corpus / "dev_data/raw/ToyCar/train").iterdir())
    assert train[0].startswith("section_00_source_train_normal_0000_spd_")
    assert any(n.startswith("section_00_target_train_normal_0003_") for n in train)
    test = sorted(p.name for p in (tiny_corpus / "dev_data/raw/valve/test").iterdir())
    assert len(test) == 4 * TINY["test_per_cell"]
    assert {n.split("_")[4] for n in test} == {"normal", "anomaly"}
    eval_test = sorted(p.name for p in (tiny_corpus / "eval_data/raw/ToyPet/test").iterdir())
    assert eval_test[:2] == ["section_00_0000.wav", "section_00_0001.wav"]
    sup = sorted(p.name for p in (tiny_corpus / "dev_data/raw/ToyCar/supplemental").iterdir())
    assert any("supplemental_noise" in n for n in sup) and any("supplemental_clean" in n for n in sup)
    labels_csv, domains_csv, _ = ground_truth_paths(tiny_corpus, "ToyPet")
    rows = list(csv.reader(labels_csv.open()))
    assert len(rows) == 4 * TINY["test_per_cell"] and {r[1] for r in rows} == {"0", "1"}
    assert {r[0] for r in rows} == set(eval_test)
    assert {r[1] for r in csv.reader(domains_csv.open())} == {"0", "1"}
    info = sf.info(str(tiny_corpus / "dev_data/raw/ToyCar/train" / train[0]))
    assert (info.samplerate, info.channels, info.frames) == (16_000, 1, 32_000)


def _table(path):
    return dict(csv.reader(path.open()))


def test_official_evaluator_tables_for_every_machine(tiny_corpus):
    """ground_truth_{data,domain,attributes} for eval and dev machines (the evaluator skips a system silently
    without the attributes table), and the eval labels also in the baseline repo's single-list format."""
    listing = list(csv.reader((tiny_corpus / eval_list_name()).open()))
    assert listing[0] == ["ToyPet"] and len(listing) == 1 + 4 * TINY["test_per_cell"]
    listed = dict(listing[1:])
    for dataset, machines in (("dev", TINY["dev_machines"]), ("eval", TINY["eval_machines"])):
        for machine in machines:
            labels, domains, attributes = (_table(p) for p in ground_truth_paths(tiny_corpus, machine, dataset=dataset))
            test = sorted(p.name for p in (tiny_corpus / f"{dataset}_data/raw/{machine}/test").iterdir())
            assert list(labels) == list(domains) == list(attributes) == test  # sorted, as the evaluator reads them
            for name in test:
                labelled = attributes[name] + ".wav"  # the evaluator maps f"{row[1]}.wav" -> row[0]
                if dataset == "dev":
                    assert labelled == name
                else:
                    assert listed[name] == labelled
                assert labels[name] == str(int("_anomaly_" in labelled))
                assert domains[name] == str(int("_target_" in labelled))


def test_synth_command_eval_machines_flag(tmp_path):
    small = ["--machines", "fan", "--train-source", "1", "--train-target", "1", "--test-per-cell", "1",
             "--supplemental", "0", "--seconds", "1", "--workers", "1"]
    assert main(["synth", "--out", str(tmp_path / "all"), *small, "--eval-machines"]) == 0
    assert sorted(p.name for p in (tmp_path / "all/eval_data/raw").iterdir()) == sorted(EVAL_MACHINES)
    assert main(["synth", "--out", str(tmp_path / "two"), *small, "--eval-machines", "ToyPet", "Polisher"]) == 0
    assert sorted(p.name for p in (tmp_path / "two/eval_data/raw").iterdir()) == ["Polisher", "ToyPet"]
    assert main(["synth", "--out", str(tmp_path / "none"), *small]) == 0  # eval machines only when asked
    assert not (tmp_path / "none/eval_data").exists() and not (tmp_path / "none" / eval_list_name()).exists()
    assert [p.name for p in (tmp_path / "none/dev_data/raw").iterdir()] == ["fan"]


def test_deterministic_per_seed(tmp_path):
    kw = dict(dev_machines=("fan",), eval_machines=(), train_source=2, train_target=1, test_per_cell=1,
              supplemental=0, seconds=1.0)
    a = generate_corpus(tmp_path / "a", seed=3, **kw)
    b = generate_corpus(tmp_path / "b", seed=3, **kw)
    c = generate_corpus(tmp_path / "c", seed=4, **kw)
    rel = "dev_data/raw/fan/test"
    names = sorted(p.name for p in (a / rel).iterdir())
    assert names == sorted(p.name for p in (b / rel).iterdir())
    for n in names:
        assert (a / rel / n).read_bytes() == (b / rel / n).read_bytes()
    assert [(a / rel / n).read_bytes() for n in names] != [p.read_bytes() for p in sorted((c / rel).iterdir())]


@pytest.fixture(scope="module")
def fairness_corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("fair"), dev_machines=("ToyCar", "fan", "valve", "ToyTrain"),
                           eval_machines=(), train_source=60, train_target=10, test_per_cell=20,
                           supplemental=0, seconds=3.0, seed=11, workers=2)


def _per_machine(records, scores):
    out = {}
    for m in sorted({r.machine for r in records}):
        idx = [i for i, r in enumerate(records) if r.machine == m]
        out[m] = machine_metrics([int(records[i].label == "anomaly") for i in idx],
                                 [records[i].domain for i in idx], [scores[i] for i in idx])
    return out


def _mean(per_machine, key):
    return float(np.mean([v[key] for v in per_machine.values()]))


def _trivial_and_knn(corpus, knn_by_file: dict | None = None):
    """Per-machine metrics of loudness-normalised RMS (both signs), random scores and log-mel k-NN (seed bank);
    ``knn_by_file`` gets the k-NN's raw score of every test clip, by (machine, file name)."""
    records, _ = plan_records(discover([corpus]))
    test = [r for r in records if r.split == "test"]
    rms = [float(np.sqrt(np.mean(preprocess_clip(r.path).waveform ** 2))) for r in test]
    random = np.random.default_rng(0).random(len(test))
    emb, kept, rejects, _ = embed_records(records, load_backbone("logmel"), PreprocessConfig())
    assert not rejects
    knn = detect(emb, kept, detector=lambda: make_detector(RunConfig(), "knn"), post=PostConfig())
    knn_scores = {f: s for r in knn.values() for f, s in zip(r.filenames, r.raw_scores)}
    if knn_by_file is not None:
        knn_by_file.update({(m, f): s for m, r in knn.items() for f, s in zip(r.filenames, r.raw_scores)})
    per = {"rms": _per_machine(test, rms), "-rms": _per_machine(test, -np.array(rms)),
           "random": _per_machine(test, random),
           "knn": _per_machine(test, [knn_scores[r.filename] for r in test])}
    print({n: {k: round(_mean(v, k), 3) for k in ("auc_source", "auc_target", "pauc")} for n, v in per.items()})
    return per


def test_trivial_detectors_land_near_chance_and_logmel_knn_clearly_above(fairness_corpus):
    per = _trivial_and_knn(fairness_corpus)
    for name in ("rms", "-rms", "random"):
        for key in ("auc_source", "auc_target", "pauc"):
            assert 0.35 <= _mean(per[name], key) <= 0.65, (name, key, per[name])
    assert _mean(per["knn"], "auc_source") >= 0.75, per["knn"]
    assert _mean(per["knn"], "auc_target") >= 0.55, per["knn"]
    assert _mean(per["knn"], "pauc") >= 0.58, per["knn"]
    # the target domain is harder: only 10 target normals are in the bank
    assert _mean(per["knn"], "auc_target") < _mean(per["knn"], "auc_source")


# Style B: other sound models and anomaly kinds in the same layout (asd_ray/data/synth_b.py).

@pytest.fixture(scope="module")
def tiny_corpus_b(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("tiny_b") / "data", style="B", **TINY)


def test_style_b_is_laid_out_like_style_a_and_sounds_different(tiny_corpus, tiny_corpus_b):
    a, b = summarise(discover([tiny_corpus])), summarise(discover([tiny_corpus_b]))
    assert b["counts"] == a["counts"] and b["clips"] == a["clips"]
    assert not b["unparsed"] and b["unlabeled"] == a["unlabeled"]
    for machine in TINY["dev_machines"]:
        mdir = tiny_corpus_b / "dev_data/raw" / machine
        names = {p.name for p in mdir.glob("*/*.wav")}
        assert set(read_attributes_csv(mdir / "attributes_00.csv")) == names
    assert any("_rpm_" in n and n.endswith("_room_B.wav") for n in
               (p.name for p in (tiny_corpus_b / "dev_data/raw/ToyCar/train").iterdir()))
    eval_test = sorted(p.name for p in (tiny_corpus_b / "eval_data/raw/ToyPet/test").iterdir())
    labels_csv, domains_csv, _ = ground_truth_paths(tiny_corpus_b, "ToyPet")
    assert {r[0] for r in csv.reader(labels_csv.open())} == set(eval_test)
    assert {r[1] for r in csv.reader(domains_csv.open())} == {"0", "1"}
    clip_a = sorted((tiny_corpus / "dev_data/raw/valve/test").iterdir())[0]
    clip_b = sorted((tiny_corpus_b / "dev_data/raw/valve/test").iterdir())[0]
    info = sf.info(str(clip_b))
    assert (info.samplerate, info.channels, info.frames) == (16_000, 1, 32_000)
    assert not np.allclose(sf.read(str(clip_a))[0], sf.read(str(clip_b))[0])


def test_unknown_style_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus style"):
        generate_corpus(tmp_path / "c", style="D")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def fairness_corpus_b(tmp_path_factory):
    # one machine of each of style B's five families
    return generate_corpus(tmp_path_factory.mktemp("fair_b"),
                           dev_machines=("ToyCar", "ToyTrain", "fan", "bearing", "gearbox"), eval_machines=(),
                           train_source=60, train_target=10, test_per_cell=20, supplemental=0, seconds=3.0,
                           seed=11, workers=2, style="B")


def test_style_b_trivial_detectors_land_near_chance_and_logmel_knn_above_on_source(fairness_corpus_b):
    per = _trivial_and_knn(fairness_corpus_b)
    for name in ("rms", "-rms", "random"):
        for key in ("auc_source", "auc_target", "pauc"):
            assert 0.38 <= _mean(per[name], key) <= 0.62, (name, key, per[name])
    assert _mean(per["knn"], "auc_source") >= 0.75, per["knn"]
    assert _mean(per["knn"], "pauc") >= 0.55, per["knn"]
    # target normals sound unlike source normals: a seed bank with only 10 of them scores them high
    assert _mean(per["knn"], "auc_target") <= _mean(per["knn"], "auc_source") - 0.2, per["knn"]


# Style C: rhythms, with anomalies in timing and in narrow bands (asd_ray/data/synth_c.py).

@pytest.fixture(scope="module")
def fairness_corpus_c(tmp_path_factory):
    # one machine of each of style C's four families
    return generate_corpus(tmp_path_factory.mktemp("fair_c"), dev_machines=("valve", "ToyTrain", "ToyCar", "fan"),
                           eval_machines=(), train_source=60, train_target=10, test_per_cell=20, supplemental=0,
                           seconds=4.0, seed=11, workers=2, style="C")


def test_style_c_hides_its_timing_anomalies_from_a_spectral_detector_and_not_its_narrow_bands(fairness_corpus_c):
    """Loudness says nothing (trivial detectors near chance); a k-NN on each clip's log-mel mean and std finds the
    narrow-band anomalies (a line, a band of noise) but not those in timing (irregular spacing, a sorter's pattern in
    another order, a bounce after each strike), which change when events come, not the spectrum."""
    from sklearn.metrics import roc_auc_score

    from asd_ray.data.synth_c import RhythmProfile

    knn: dict = {}
    per = _trivial_and_knn(fairness_corpus_c, knn)
    for name in ("rms", "-rms", "random"):
        for key in ("auc_source", "auc_target", "pauc"):
            assert 0.35 <= _mean(per[name], key) <= 0.65, (name, key, per[name])
    by_kind: dict = {}
    for machine in ("valve", "ToyTrain", "ToyCar", "fan"):
        kinds = RhythmProfile.draw(machine, 11).anomaly_kinds  # the generator's order: test anomaly i is kind i % 4
        scores = {f: v for (m, f), v in knn.items() if m == machine}
        normal = [v for f, v in scores.items() if "_source_test_normal_" in f]
        for f, v in scores.items():
            if "_source_test_anomaly_" in f:
                by_kind.setdefault(kinds[int(f.split("_anomaly_")[1][:4]) % 4], {}).setdefault(machine, []).append(v)
        for kind, found in by_kind.items():
            if machine in found:
                found[machine] = roc_auc_score([0] * len(normal) + [1] * len(found[machine]), normal + found[machine])
    timing = [auc for k in ("irregular", "reordered", "double") for auc in by_kind[k].values()]
    narrow = [auc for k in ("tone", "hiss") for auc in by_kind[k].values()]
    assert 0.3 <= np.mean(timing) <= 0.62 and np.mean(narrow) >= 0.8, by_kind


# DCASE 2026's set-up: two channels, near and far (asd_ray/data/synth_2026.py).

def test_a_2026_corpus_is_two_channel_and_cancelling_the_far_channel_beats_the_near_one_and_the_down_mix(tmp_path):
    from asd_ray.config import load_config
    from asd_ray.data.synth_2026 import SECONDS
    from asd_ray.detect import reference_run

    root = generate_corpus(tmp_path / "y26", dev_machines=("valveEmu", "fan"), eval_machines=("ToothBrush",),
                           train_source=4, train_target=2, test_per_cell=2, seed=3, workers=2, year=2026)
    for dataset, machine in (("dev", "valveEmu"), ("dev", "fan"), ("eval", "ToothBrush")):
        mdir = root / f"{dataset}_data" / "raw" / machine
        assert sorted(p.name for p in mdir.iterdir()) == ["attributes_00.csv", "test", "train"]  # no supplemental
        info = sf.info(str(next((mdir / "test").iterdir())))
        assert (info.channels, info.samplerate, info.frames) == (2, 16_000, int(SECONDS[machine] * 16_000))
    assert not summarise(discover([root]))["unparsed"]
    # the eval labels as the baseline repo lists them for 2026, read by --eval-list with the 2026 attribute names
    listed = read_eval_list(root / eval_list_name(2026))
    assert list(listed) == ["ToothBrush"] and sorted(listed["ToothBrush"]) == sorted(
        p.name for p in (root / "eval_data/raw/ToothBrush/test").iterdir())
    labels = _table(ground_truth_paths(root, "ToothBrush", dataset="eval")[0])
    assert {name: str(label) for name, (label, _) in listed["ToothBrush"].items()} == labels
    dev = tmp_path / "dev"  # the dev machines alone, at 4 s: what the detectors are compared on
    generate_corpus(dev, dev_machines=("valveEmu", "fan"), eval_machines=(), train_source=40, train_target=6,
                    test_per_cell=12, seconds=4.0, seed=3, workers=2, year=2026)
    got = {}
    for channels in ("near", "mix", "auto"):
        report = reference_run([dev], load_config(RunConfig, None, ["detector=pooled", f"preprocess.channels={channels}"]))
        got[channels] = report.metrics["official_score"]
        flag = {"near": "channel", "mix": "downmixed", "auto": "cancelled"}[channels]
        assert report.flags == {flag: report.clips_embedded}  # every clip, flagged with what was done to it
    # measured here: near 0.572, mix 0.526, auto (cancel) 0.669: the factory both microphones hear goes
    assert got["auto"] >= got["near"] + 0.05 and got["near"] > got["mix"], got


def test_the_diffuse_noise_style_makes_the_two_microphones_hear_the_factory_less_alike(tmp_path):
    """``noise="diffuse"``: a reverberant hall whose noise the far microphone cannot predict at the near one as well
    as in the ``direct`` style (what cancelling relies on); other years and unknown styles are refused."""
    from scipy.signal import coherence

    coherent = {}
    for noise in ("direct", "diffuse"):
        root = generate_corpus(tmp_path / noise, dev_machines=("fan",), eval_machines=(), train_source=4,
                               train_target=2, test_per_cell=1, seconds=3.0, seed=5, year=2026, noise=noise)
        clips = sorted((root / "dev_data/raw/fan/train").iterdir())
        pairs = [sf.read(str(p))[0] for p in clips]
        assert all(pair.shape == (48_000, 2) for pair in pairs)
        coherent[noise] = [float(coherence(p[:, 0], p[:, 1], fs=16_000, nperseg=1024)[1].mean()) for p in pairs]
    # measured here: mean coherence direct 0.69 (0.30-0.85 per clip), diffuse 0.31 (0.17-0.41)
    assert np.mean(coherent["diffuse"]) < np.mean(coherent["direct"]) - 0.2, coherent
    with pytest.raises(ValueError, match="a 2025 corpus is mono"):
        generate_corpus(tmp_path / "x", dev_machines=("fan",), eval_machines=(), noise="diffuse")
    with pytest.raises(ValueError, match="unknown noise style 'hall'"):
        generate_corpus(tmp_path / "y", dev_machines=("fan",), eval_machines=(), year=2026, noise="hall")
