"""Saved banks are checked before anything serves them: `serve` and `serve-fleet` refuse a corrupt or mismatched
bank folder in one line naming the folder, the file and what is wrong, before Ray starts (issue 22, item 6)."""

import dataclasses
import json

import numpy as np
import pytest

from asd_ray.bank.local_bank import LocalFeatureBank
from asd_ray.bank.domain_bank import DomainAwareBank
from asd_ray.bank.memory_bank import MemoryBank
from asd_ray.bank.pooling import PooledBank
from asd_ray.bank.saved import write_preprocess
from asd_ray.config import PreprocessConfig
from asd_ray.detectors import FusionDetector, NoiseRemovedDetector, check_bank_folder, load_detector
from asd_ray.errors import BankFolderError
from asd_ray.models.autoencoder import AEDetector

DIM, N_MELS = 8, 16


def _clip_bank(root, metric="euclidean", machine="fan"):
    x = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32)
    return MemoryBank(k=3, metric=metric).fit(x, [f"m{j}" for j in range(30)]).save(root / machine)


def _fusion_bank(root):
    """A frame fusion (local-feature bank + pooled bank) of 8 clips of 16 mel bands, as `asd-ray run` saves one."""
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((20, N_MELS)).astype(np.float32) for _ in range(8)]
    domains = ["source"] * 6 + ["target"] * 2
    local = LocalFeatureBank(context=3, bank_size=30, candidates=200, pca_dim=6, projection_dim=0)
    FusionDetector([local, PooledBank(k=1)]).fit(clips, [f"c{i}" for i in range(8)], domains=domains) \
        .save(root / "valve")
    return root / "valve"


def _edit_json(path, **changes):
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, **changes}))


def _drop_key(path, key):
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _preprocessed(folder, **changes):
    write_preprocess(folder, {**dataclasses.asdict(PreprocessConfig()), **changes})


# corruption -> (bank kind, what to do in the machine's folder, the file named, words of the problem)
CORRUPTIONS = {
    "near channel only": ("clip", lambda d: _preprocessed(d, channels="near"), "preprocess.json",
                          "its clips were pre-processed with preprocess.channels=near (here auto): requests would be "
                          "turned into features of another kind (serve it with --set preprocess.channels=near)"),
    "no loudness normalisation": ("frames", lambda d: _preprocessed(d, loudness_normalise=False), "preprocess.json",
                                  "preprocess.loudness_normalise=false (here true)"),
    "garbage bank.json": ("clip", lambda d: (d / "bank.json").write_text("{'kind': MemoryBank"),
                          "bank.json", "not valid JSON"),
    "wrong dim": ("clip", lambda d: _edit_json(d / "bank.json", dim=DIM + 1),
                  "bank.json", f"'dim' is {DIM + 1} but index.faiss holds {DIM}-d vectors"),
    "metric changed": ("clip", lambda d: _edit_json(d / "bank.json", metric="cosine"),
                       "bank.json", "'metric' is 'cosine' but index.faiss was built for euclidean distances"),
    "metric unknown": ("clip", lambda d: _edit_json(d / "bank.json", metric="manhattan"),
                       "bank.json", "'metric' is 'manhattan': use one of ('euclidean', 'cosine')"),
    "truncated FAISS file": ("clip", lambda d: _truncate(d / "index.faiss"),
                             "index.faiss", "cannot be read: truncated or not a FAISS index"),
    "newer format": ("clip", lambda d: _edit_json(d / "bank.json", format=99),
                     "bank.json", "format version 99: this asd-ray reads version 1"),
    "fusion n_mels changed": ("frames", lambda d: _edit_json(d / "member_0/bank.json", n_mels=N_MELS - 4),
                              "member_0/bank.json", f"'n_mels' is {N_MELS - 4} (windows 3 x {N_MELS - 4} = 36 wide) "
                                                    f"but calibration.npz's mean is for {3 * N_MELS}-wide windows"),
    "local spreads lose a bank": ("frames", lambda d: _edit_json(d / "member_0/bank.json", spreads={"source": 1.0}),
                                  "member_0/bank.json", "'spreads' must give each domain bank of 'scales' a positive "
                                                        "number, got {'source': 1.0}"),
    # saved with domain_pick=nearest over two domain banks: the spreads are read; without them every clip's score
    # would be in units of 1, silently
    "local spreads missing": ("frames", lambda d: _drop_key(d / "member_0/bank.json", "spreads"),
                              "member_0/bank.json", "'spreads' must give each domain bank of 'scales' a positive "
                                                    "number, got None"),
    "calibration missing": ("frames", lambda d: (d / "member_0/calibration.npz").unlink(),
                            "member_0/calibration.npz", "missing (the bank's calibration)"),
    "truncated calibration": ("frames", lambda d: _truncate(d / "member_0/calibration.npz"),
                              "member_0/calibration.npz", "cannot be read"),
    "member index truncated": ("frames", lambda d: _truncate(d / "member_1/bank/index.faiss"),
                               "member_1/bank/index.faiss", "cannot be read: truncated"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_named_by_folder_file_and_problem(name, tmp_path):
    kind, corrupt, file, problem = CORRUPTIONS[name]
    folder = _clip_bank(tmp_path) if kind == "clip" else _fusion_bank(tmp_path)
    service = dataclasses.asdict(PreprocessConfig())  # the pre-processing a service with the defaults applies
    check_bank_folder(folder, n_mels=N_MELS, preprocess=service)  # sound as saved
    corrupt(folder)
    with pytest.raises(BankFolderError) as err:
        check_bank_folder(folder, n_mels=N_MELS, preprocess=service)
    assert (err.value.folder, err.value.file) == (str(folder), file)
    assert problem in err.value.what
    assert str(err.value) == f"saved bank {folder}: {file}: {err.value.what}" and "\n" not in str(err.value)


def test_a_frame_bank_fitted_on_other_bands_than_the_config_is_refused(tmp_path):
    folder = _fusion_bank(tmp_path)
    with pytest.raises(BankFolderError, match=f"bank.json: fitted on {N_MELS}-band log-mel frames but frames.n_mels "
                                              f"is 128: .*--set frames.n_mels={N_MELS}"):
        check_bank_folder(folder, n_mels=128)


def test_sound_banks_of_every_kind_pass_and_load_as_saved(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, DIM)).astype(np.float32)
    domains = ["source"] * 8 + ["target"] * 4
    DomainAwareBank(k=2).fit(x, domains=domains).save(tmp_path / "domain")
    cosine = _clip_bank(tmp_path / "cos", metric="cosine")
    clips = [rng.standard_normal((20, N_MELS)).astype(np.float32) for _ in range(6)]
    ae = AEDetector(context=3, hidden=8, bottleneck=2, layers=1, epochs=1, batch_size=32).fit(clips)
    ae.save(tmp_path / "ae")
    denoised = NoiseRemovedDetector(PooledBank(k=1)).fit(clips, noise=clips[:2]).save(tmp_path / "noise")
    for folder in (tmp_path / "domain", cosine, _fusion_bank(tmp_path), tmp_path / "ae", denoised):
        check_bank_folder(folder, n_mels=None if folder == cosine or folder.name == "domain" else N_MELS)
        assert load_detector(folder).size > 0
    np.testing.assert_array_equal(load_detector(tmp_path / "ae").score(clips), ae.score(clips))


def test_an_ae_whose_weights_do_not_fit_its_sizes_is_named(tmp_path):
    clips = [np.random.default_rng(4).standard_normal((20, N_MELS)).astype(np.float32) for _ in range(4)]
    folder = AEDetector(context=3, hidden=8, bottleneck=2, layers=1, epochs=1).fit(clips).save(tmp_path / "ae")
    _edit_json(folder / "bank.json", hidden=9)
    with pytest.raises(BankFolderError, match="ae: model.pt: does not fit bank.json's sizes"):
        check_bank_folder(folder)


def test_a_domain_bank_whose_sub_bank_changed_metric_is_named_from_the_machine_folder(tmp_path):
    x = np.random.default_rng(3).standard_normal((12, DIM)).astype(np.float32)
    folder = DomainAwareBank(k=2).fit(x, domains=["source"] * 8 + ["target"] * 4).save(tmp_path / "gearbox")
    _edit_json(folder / "target/bank.json", metric="cosine")
    with pytest.raises(BankFolderError) as err:
        check_bank_folder(folder)
    assert (err.value.folder, err.value.file) == (str(folder), "target/bank.json")


@pytest.mark.parametrize("command", [["serve"], ["serve-fleet", "--simulate", "2"],
                                     ["serve-fleet", "--clips", "CLIPS", "--machine", "fan"]])
@pytest.mark.parametrize("name", ["garbage bank.json", "wrong dim", "metric changed", "truncated FAISS file",
                                  "fusion n_mels changed", "calibration missing", "near channel only",
                                  "no loudness normalisation"])
def test_serve_and_serve_fleet_refuse_a_corrupt_bank_in_one_line_before_ray_starts(name, command, tmp_path,
                                                                                   monkeypatch, capsys):
    from asd_ray.cli import main
    from asd_ray.distributed import fleet, service, session

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(service, "start_ray", no_ray)
    monkeypatch.setattr(session, "ensure_ray", no_ray)
    monkeypatch.setattr(fleet, "ensure_ray", no_ray)
    kind, corrupt, file, problem = CORRUPTIONS[name]
    root = tmp_path / "banks"
    _clip_bank(root, machine="bearing")  # a sound bank before the corrupt one: every folder is checked
    folder = _clip_bank(root) if kind == "clip" else _fusion_bank(root)
    corrupt(folder)
    (tmp_path / "clips").mkdir()
    args = [str(tmp_path / "clips") if a == "CLIPS" else a for a in command[1:]]
    assert main([command[0], "--banks", str(root), *args, "--set", f"frames.n_mels={N_MELS}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"asd-ray {command[0]}: error: saved bank {folder.resolve()}: {file}: ")
    assert problem in err


def test_a_bank_whose_train_scores_give_no_threshold_is_named_by_the_router(tmp_path):
    """A sound bank whose leave-one-out train scores are all equal (duplicated normals): the fleet's calibration
    names the bank folder, not only the gamma fit."""
    from asd_ray.config import PostConfig
    from asd_ray.distributed.fleet import BankError, Router

    router = Router.__new__(Router)  # the calibration step alone, without bank actors
    router.stats, router.post, router.calibrations, router.streams = {"fan": {"bank_dir": "/b/fan"}}, PostConfig(), {}, {}
    with pytest.raises(BankError, match="saved bank /b/fan: no decision threshold from its leave-one-out train scores "
                                        r"\(a gamma fit needs at least 3 distinct train scores"):
        router._calibrate("fan", np.zeros(5))


def test_banks_saved_before_format_versions_still_load(tmp_path):
    folder = _clip_bank(tmp_path)
    meta = json.loads((folder / "bank.json").read_text())
    assert meta.pop("format") == 1
    (folder / "bank.json").write_text(json.dumps(meta))
    check_bank_folder(folder)
    assert load_detector(folder).size == 30


def test_a_bank_pre_processed_as_the_service_would_or_without_a_record_passes(tmp_path):
    """The record of how a bank's clips were pre-processed is checked against the service's settings: equal passes,
    a bank saved without one (by the library's ``save``) is taken as it is, a setting that only limits clip length
    (max_seconds) is the service's own."""
    folder = _clip_bank(tmp_path)
    preprocess = dataclasses.asdict(PreprocessConfig())
    check_bank_folder(folder, preprocess=preprocess)  # no record
    _preprocessed(folder, max_seconds=10.0)
    check_bank_folder(folder, preprocess=preprocess)
    with pytest.raises(BankFolderError, match=r"preprocess.channels=auto \(here cancel\)"):
        check_bank_folder(folder, preprocess={**preprocess, "channels": "cancel"})
