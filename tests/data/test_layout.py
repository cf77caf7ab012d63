"""The DCASE layout reader on the synthetic tree and on other namings."""

from collections import Counter

import pytest

from asd_ray.data.layout import LayoutError, attribute_dict, discover, read_attributes_csv, summarise
from tiny import TINY


def test_counts_match_what_was_generated(tiny_corpus):
    records = discover([tiny_corpus])
    c = Counter((r.dataset, r.machine, r.split, r.domain, r.label) for r in records)
    for m in TINY["dev_machines"]:
        assert c[("dev", m, "train", "source", "normal")] == TINY["train_source"]
        assert c[("dev", m, "train", "target", "normal")] == TINY["train_target"]
        for d in ("source", "target"):
            for lab in ("normal", "anomaly"):
                assert c[("dev", m, "test", d, lab)] == TINY["test_per_cell"]
    (ev,) = TINY["eval_machines"]
    assert c[("eval", ev, "train", "source", "normal")] == TINY["train_source"]
    assert c[("eval", ev, "test", "unknown", "unknown")] == 4 * TINY["test_per_cell"]
    assert summarise(records)["unlabeled"] == 4 * TINY["test_per_cell"]
    assert all(r.section == "00" for r in records)


def test_attributes_from_names_and_csv_agree(tiny_corpus):
    records = [r for r in discover([tiny_corpus], ["ToyCar"]) if r.split == "train"]
    table = read_attributes_csv(tiny_corpus / "dev_data/raw/ToyCar/attributes_00.csv")
    for r in records:
        assert table[r.filename] == r.attributes
    assert set(attribute_dict(records[0].attributes)) == {"spd", "mic"}
    assert attribute_dict("noAttribute") == {}


def test_unparsed_names_are_records_listed_in_summary(tiny_corpus, tmp_path):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny_corpus / "dev_data/raw/valve", root / "dev_data/raw/valve")
    bad = root / "dev_data/raw/valve/train/recording 17.wav"
    bad.write_bytes(b"")
    wrong_split = root / "dev_data/raw/valve/train/section_00_source_test_normal_0001_x.wav"
    wrong_split.write_bytes(b"")
    records = discover([root])
    s = summarise(records)
    reasons = {u["path"]: u["reason"] for u in s["unparsed"]}
    assert "matches no DCASE naming form" in reasons[str(bad)]
    assert "split 'test'" in reasons[str(wrong_split)]
    trusted = discover([root], normals_only_roots=[root])
    assert {r.label for r in trusted if r.path == str(bad)} == {"normal"}


def test_missing_root_and_machine_are_clear_errors(tiny_corpus, tmp_path):
    with pytest.raises(LayoutError, match="data root not found"):
        discover([tmp_path / "nope"])
    with pytest.raises(LayoutError, match="not found: \\['fridge'\\]"):
        discover([tiny_corpus], ["ToyCar", "fridge"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="no DCASE"):
        discover([tmp_path / "empty"])


def test_dcase2020_and_mimii_namings(tmp_path):
    d2020 = tmp_path / "y2020/dev_data/fan/train"
    d2020.mkdir(parents=True)
    for name in ("normal_id_00_00000000.wav", "anomaly_id_02_00000001.wav"):
        (d2020 / name).write_bytes(b"")
    recs = {r.filename: r for r in discover([tmp_path / "y2020"])}
    assert recs["normal_id_00_00000000.wav"].is_normal_train
    assert recs["anomaly_id_02_00000001.wav"].label == "anomaly"
    assert not recs["anomaly_id_02_00000001.wav"].is_normal_train
    for label in ("normal", "abnormal"):
        d = tmp_path / f"mimii/pump/id_04/{label}"
        d.mkdir(parents=True)
        (d / "00000000.wav").write_bytes(b"")
    mimii = {r.label: r for r in discover([tmp_path / "mimii"])}
    assert mimii["normal"].is_normal_train and mimii["normal"].section == "04"
    assert mimii["anomaly"].split == "test"


def test_entries_named_like_clips_that_are_no_files_are_listed_with_a_reason(tiny_corpus, tmp_path):
    """A dangling link and a directory named like a clip become records with a reason (unused.csv),
    never vanish: every entry named *.wav is accounted for."""
    import shutil

    from asd_ray.detect import plan_records

    root = tmp_path / "data"
    shutil.copytree(tiny_corpus, root)
    test = root / "dev_data" / "raw" / "ToyCar" / "test"
    on_disk = len(list(test.iterdir()))
    (test / "section_00_source_test_normal_0902_spd_99_mic_1.wav").mkdir()
    (test / "section_00_source_test_normal_0903_spd_99_mic_1.wav").symlink_to(tmp_path / "gone.wav")
    records = [r for r in discover([root], ["ToyCar"]) if r.split == "test"]
    assert len(records) == on_disk + 2
    _, unused = plan_records(records)
    reasons = {u.path.rsplit("/", 1)[1]: u.reason for u in unused}
    assert "directory" in reasons["section_00_source_test_normal_0902_spd_99_mic_1.wav"]
    assert "broken symbolic link" in reasons["section_00_source_test_normal_0903_spd_99_mic_1.wav"]
    assert not any(r.is_normal_train for r in records if r.parse_error)
