"""The AE baseline through the same run (CSVs, metrics, report) and `asd-ray compare` over several detectors."""

import json

import numpy as np

from asd_ray.cli import main
from asd_ray.cli_args import DETECTORS
from asd_ray.config import RunConfig, load_config
from asd_ray.detect import reference_run
from tiny import TINY

FAST_AE = ["ae.epochs=3", "ae.batch_size=128"]


def test_compare_writes_one_table(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--local", "--data", str(tiny_corpus), "--out", str(out), "--detectors", "knn",
                 "ae-maha", *[a for o in FAST_AE for a in ("--set", o)]]) == 0
    console = capsys.readouterr().err
    assert "compare: detector 1/2: knn" in console and "compare: detector 2/2: ae-maha" in console
    table = (out / "compare.md").read_text()
    assert "| knn |" in table and "| ae-maha |" in table and "| ToyCar | dev_data |" in table
    assert "| detector | dev_data official score |" in table and "eval_data official score" in table
    assert "| ToyPet | eval_data |" in table
    assert (out / "roc_ToyCar.png").is_file() and (out / "knn" / "metrics.json").is_file()
    scores = json.loads((out / "compare.json").read_text())
    assert set(scores) == {"knn", "ae-maha"}


def test_compare_trains_one_ae_for_both_ae_scores_and_each_scores_as_its_own_run(tiny_corpus, tmp_path, monkeypatch):
    """ae-mse and ae-maha are one AE (same parameters, same clips) scored two ways: compare trains it once per
    machine, and each detector's scores and files are those of its own run, bit for bit."""
    import asd_ray.models.autoencoder as ae

    trained, train = [], ae.train_autoencoder

    def counted(vectors, **kwargs):
        trained.append(len(vectors))
        return train(vectors, **kwargs)

    monkeypatch.setattr(ae, "train_autoencoder", counted)
    out = tmp_path / "cmp"
    assert main(["compare", "--local", "--data", str(tiny_corpus), "--out", str(out), "--detectors", "ae-mse",
                 "ae-maha", *[a for o in FAST_AE for a in ("--set", o)]]) == 0
    assert len(trained) == 3  # one AE per machine (ToyCar, valve, ToyPet), not two
    for detector in ("ae-mse", "ae-maha"):
        alone = reference_run([tiny_corpus], load_config(RunConfig, None, [f"detector={detector}", *FAST_AE]),
                              tmp_path / detector)
        assert set(alone.results) == {"ToyCar", "valve", "ToyPet"} and 0 < alone.metrics["official_score"] <= 1
        for m, r in alone.results.items():
            assert len(r.filenames) == 4 * TINY["test_per_cell"] and np.isfinite(r.raw_scores).all()
            assert set(r.decisions.tolist()) <= {0, 1} and len(r.train_losses) == 3
            rows = (tmp_path / detector / f"anomaly_score_{m}_section_00_test.csv").read_text().splitlines()
            assert len(rows) == len(r.filenames)
            name = f"anomaly_score_{m}_section_00_test.csv"
            assert (out / detector / name).read_bytes() == (tmp_path / detector / name).read_bytes(), (detector, m)
            name = f"decision_result_{m}_section_00_test.csv"
            assert (out / detector / name).read_bytes() == (tmp_path / detector / name).read_bytes(), (detector, m)
    assert len(trained) == 3 + 2 * 3
    mse, maha = (json.loads((out / d / "metrics.json").read_text()) for d in ("ae-mse", "ae-maha"))
    assert mse["machines"]["ToyCar"] != maha["machines"]["ToyCar"]  # two scores of one AE


def test_compare_fits_a_local_or_pooled_bank_once_for_every_detector_that_holds_it(tiny_corpus, tmp_path,
                                                                                   monkeypatch):
    """A fusion's members are the ``local`` and ``pooled`` detectors: compare fits each once per machine and
    each detector's files are those of its own run, bit for bit. A setting that changes a member's fit
    (fusion-max's ``local.domain_pick=min``) fits it again: the fusion fits its members itself."""
    from asd_ray.bank.local_bank import LocalFeatureBank
    from asd_ray.bank.pooling import PooledBank

    fitted = []
    for cls in (LocalFeatureBank, PooledBank):
        def counted(self, *args, _fit=cls.fit, **kwargs):
            fitted.append(self.kind)
            return _fit(self, *args, **kwargs)

        monkeypatch.setattr(cls, "fit", counted)
    names = ["fusion-mean", "local", "pooled", "fusion-max"]  # fusion-mean: local + pooled, mean
    out = tmp_path / "cmp"
    assert main(["compare", "--local", "--data", str(tiny_corpus), "--out", str(out), "--detectors", *names]) == 0
    # 3 machines: fusion-mean fits both, local and pooled adopt its members, fusion-max refits both
    assert fitted.count("LocalFeatureBank") == 2 * 3 and fitted.count("PooledBank") == 2 * 3
    for detector in names:
        alone = tmp_path / detector
        reference_run([tiny_corpus], load_config(RunConfig, None, DETECTORS[detector]), alone)
        for m in ("ToyCar", "valve", "ToyPet"):
            for kind in ("anomaly_score", "decision_result"):
                name = f"{kind}_{m}_section_00_test.csv"
                assert (out / detector / name).read_bytes() == (alone / name).read_bytes(), (detector, name)
    assert fitted.count("LocalFeatureBank") == 2 * 3 + 3 * 3  # the alone runs: fusion-mean, local, fusion-max


def test_ae_refuses_a_minimum_length_shorter_than_one_vector(tiny_corpus, tmp_path):
    import pytest

    from asd_ray.config import ConfigError

    config = load_config(RunConfig, None, ["detector=ae-mse", "preprocess.min_seconds=0.05"])
    with pytest.raises(ConfigError, match="at least 0.128 s"):
        reference_run([tiny_corpus], config, tmp_path / "x")


def test_compare_knows_every_detector_and_runs_the_new_ones(tiny_corpus, tmp_path, capsys):
    from asd_ray.cli import DETECTORS, build_parser
    from asd_ray.cli_args import detector_names

    assert detector_names(build_parser().parse_args(["compare", "--detectors", "all"]).detectors) == list(DETECTORS)
    out = tmp_path / "cmp"
    assert main(["compare", "--local", "--data", str(tiny_corpus), "--out", str(out), "--detectors", "pooled",
                 "local", "fusion"]) == 0
    printed = capsys.readouterr().out
    for name in ("pooled", "local", "fusion"):
        assert f"| {name} |" in printed
        assert (out / name / "banks" / "ToyCar" / "bank.json").is_file()
    kinds = {name: json.loads((out / name / "metrics.json").read_text())["detector"]["ToyCar"]
             for name in ("pooled", "local", "fusion")}
    assert kinds == {"pooled": "PooledBank", "local": "LocalFeatureBank", "fusion": "FusionDetector"}
