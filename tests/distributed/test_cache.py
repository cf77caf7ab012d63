"""The feature cache (clip embeddings, log-mel frames): writers that never mix, caches checked against their clips
when read back, a second run that reads its features back."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asd_ray.distributed.cache import verify_rows
from tiny import command_env

# Both `asd-ray run`s meet twice: after each has looked for the cache and begun to embed, and after each has
# embedded every clip, before either publishes. So their writes overlap on any machine, however loaded, and the
# test never depends on how fast a Ray starts.
RACE = """
import os, sys, time
from pathlib import Path

import asd_ray.distributed.embed as embed
from asd_ray.cli import main

meet = Path(sys.argv[1])
tables = embed.embedded_tables


def barrier(name):
    (meet / f"{name}-{os.getpid()}").touch()
    waited = 0.0
    while len(list(meet.glob(f"{name}-*"))) < 2:
        if waited > 300:  # a guard against a hang, not a measure: the other run died or never embedded
            sys.exit(f"the other run never reached {name!r}")
        time.sleep(0.05)
        waited += 0.05


def met(*args, **kwargs):
    barrier("embed")
    yield from tables(*args, **kwargs)
    barrier("publish")


embed.embedded_tables = met
sys.exit(main(sys.argv[2:]))
"""


def _run_args(corpus, out, cache):
    return ["run", "--data", str(corpus), "--out", str(out), "--machines", "valve", "--detector", "knn",
            "--set", f"ray.cache_dir={cache}"]


def _scores(out):
    return [(out / f"{kind}_valve_section_00_test.csv").read_text() for kind in ("anomaly_score", "decision_result")]


@pytest.mark.slow
def test_two_runs_started_together_on_one_cache_folder_both_score_as_a_clean_run(ray_local, tiny_corpus, tmp_path):
    """Two `asd-ray run` processes (each its own Ray) on one cache folder; the clean run, on a cache of its own, is
    the same Ray run in the session's Ray (as a third `asd-ray run` process it cost 25-30 s more)."""
    from asd_ray.config import RunConfig, load_config

    meet = tmp_path / "meet"
    meet.mkdir()
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(meet),
                              *_run_args(tiny_corpus, tmp_path / f"run{i}", cache)],
                             env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    done = [run.communicate(timeout=500) for run in runs]
    for run, (_, err) in zip(runs, done):
        assert run.returncode == 0, err[-3000:]
    assert len(list(meet.iterdir())) == 4  # both embedded, side by side

    config = load_config(RunConfig, None, ["detector=knn", f"ray.cache_dir={tmp_path / 'clean-cache'}"])
    expected = _ray_scores(tiny_corpus, config, tmp_path / "clean")
    assert _scores(tmp_path / "run0") == expected and _scores(tmp_path / "run1") == expected

    # one cache left, whole: every valve clip once (the 2 supplemental clips are not embedded by knn)
    (folder,) = cache.iterdir()
    paths = pq.read_table(folder, columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 36 and all("/valve/" in p for p in paths)
    assert (folder / "_COMPLETE").is_file()


def _valve(tiny_corpus):
    from asd_ray.data.layout import discover
    from asd_ray.detect import plan_records

    return plan_records(discover([tiny_corpus], ["valve"]))[0]


def _ray_scores(tiny_corpus, config, out):
    from asd_ray.distributed.run import ray_run

    ray_run([tiny_corpus], config, out, machines=["valve"])
    return _scores(out)


def _remove_a_part(folder):
    sorted(folder.glob("part-*.parquet"))[0].unlink()
    return "1"  # a part holds at least one clip


def _repeat_a_test_row(folder):
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part)
        rows = [i for i, p in enumerate(table.column("path").to_pylist()) if "/test/" in p]
        if rows:
            pq.write_table(pa.concat_tables([table, table.slice(rows[0], 1)]), part)
            return table.column("path")[rows[0]].as_py()
    raise AssertionError("no test clip in the cache")


@pytest.mark.parametrize("detector, damage, words", [("knn", _remove_a_part, "missing"),
                                                     ("knn", _repeat_a_test_row, "in more than one row"),
                                                     ("fusion", _repeat_a_test_row, "in more than one row")])
def test_a_damaged_cache_is_reported_and_embedded_again(ray_local, tiny_corpus, tmp_path, caplog, detector, damage,
                                                        words):
    """Clip embeddings (knn) and log-mel frames (fusion, the default detector) alike."""
    from asd_ray.config import RunConfig, load_config

    config = load_config(RunConfig, None, [f"detector={detector}", f"ray.cache_dir={tmp_path / 'cache'}"])
    clean = _ray_scores(tiny_corpus, config, tmp_path / "clean")
    (folder,) = (tmp_path / "cache").iterdir()
    named = damage(folder)

    with caplog.at_level("WARNING", logger="asd_ray"):
        assert _ray_scores(tiny_corpus, config, tmp_path / "again") == clean
    (warning,) = [r.getMessage() for r in caplog.records if "does not match its clips" in r.getMessage()]
    assert str(folder) in warning and words in warning and (named in warning or named == "1")

    # embedded again and published in its place, whole: the next run reads it back without a word
    from asd_ray.distributed.cache import check_folder, clip_identities

    feature = "embedding" if detector == "knn" else "logmel"
    columns, problem = check_folder(folder, clip_identities(_valve(tiny_corpus)), feature=feature)
    assert columns is not None and problem == ""
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def _columns(paths, identities):
    return {"path": list(paths), "embedding": [[0.0]] * len(paths), "error": [""] * len(paths),
            "flags": [""] * len(paths), "size": [identities.get(p, (1, 1))[0] for p in paths],
            "mtime_ns": [identities.get(p, (1, 1))[1] for p in paths]}


def test_verify_rows_names_what_does_not_match_the_clips():
    ids = {"/d/a.wav": (10, 100), "/d/b.wav": (20, 200), "/d/c.wav": (30, 300)}
    assert verify_rows(_columns(["/d/a.wav", "/d/b.wav", "/d/c.wav"], ids), ids) == ""
    assert verify_rows(_columns(["/d/a.wav", "/d/b.wav"], ids), ids) == "2 rows for 3 clips; 1 clip(s) missing (/d/c.wav)"
    twice = verify_rows(_columns(["/d/a.wav", "/d/b.wav", "/d/b.wav"], ids), ids)
    assert "1 clip(s) in more than one row (/d/b.wav)" in twice and "missing (/d/c.wav)" in twice
    other = verify_rows(_columns(["/d/a.wav", "/d/b.wav", "/d/x.wav"], ids), ids)
    assert "1 row(s) of clips not in this run (/d/x.wav)" in other
    changed = _columns(["/d/a.wav", "/d/b.wav", "/d/c.wav"], ids)
    changed["mtime_ns"][1] = 201  # b.wav rewritten since the key was made
    assert verify_rows(changed, ids) == "1 clip(s) whose size or mtime differ from the key's (/d/b.wav)"
    # a clip listed twice (a root given twice) has two rows
    assert verify_rows(_columns(["/d/a.wav", "/d/b.wav", "/d/b.wav", "/d/c.wav"], ids), ids, {"/d/b.wav": 2}) == ""
    old = {k: v for k, v in _columns(list(ids), ids).items() if k not in ("size", "mtime_ns")}
    assert "no size, mtime_ns column(s)" in verify_rows(old, ids)


def _write_rows(writer, paths, ids):
    writer.write(0, pa.table(_columns(paths, ids)))


def test_a_writer_keeps_a_good_cache_published_before_it_and_replaces_a_bad_one(tmp_path, caplog):
    from asd_ray.distributed.cache import COMPLETE, CacheWriter, read_cached

    clips = [tmp_path / f"{n}.wav" for n in "abc"]
    for i, clip in enumerate(clips):
        clip.write_bytes(b"x" * (i + 1))
    ids = {str(c): (c.stat().st_size, c.stat().st_mtime_ns) for c in clips}
    folder = tmp_path / "cache" / "key"

    first, second = CacheWriter(folder), CacheWriter(folder)  # two writers at once: a folder each
    assert first.partial != second.partial and first.partial.parent == second.partial.parent == folder.parent
    _write_rows(first, list(ids), ids)
    _write_rows(second, list(ids), ids)
    assert first.publish({}, ids)["path"] == list(ids)
    assert second.publish({}, ids)["path"] == list(ids)  # the first one's, kept
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"] and read_cached(folder, ids) is not None

    bad = folder / "part-00000.parquet"  # a cache with a clip missing, published by someone
    pq.write_table(pa.table(_columns(list(ids)[:2], ids)), bad)
    third = CacheWriter(folder)
    _write_rows(third, list(ids), ids)
    with caplog.at_level("INFO", logger="asd_ray"):
        assert third.publish({"clips": 3}, ids)["path"] == list(ids)
    assert "replacing it" in caplog.text and str(folder) in caplog.text
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"] and read_cached(folder, ids) is not None
    assert (folder / COMPLETE).read_text() == '{"clips": 3}'


def test_a_writer_whose_rows_are_not_the_clips_publishes_nothing(tmp_path):
    from asd_ray.distributed.cache import CacheWriter

    clip = tmp_path / "a.wav"
    clip.write_bytes(b"x")
    ids = {str(clip): (1, clip.stat().st_mtime_ns), str(tmp_path / "b.wav"): (-1, -1)}
    writer = CacheWriter(tmp_path / "cache" / "key")
    _write_rows(writer, [str(clip)], ids)
    with pytest.raises(RuntimeError, match="lost or repeated clips: 1 rows for 2 clips"):
        writer.publish({}, ids)
    assert list((tmp_path / "cache").iterdir()) == []


def test_folders_of_writers_that_ended_are_removed_and_those_of_running_ones_kept(tmp_path):
    from asd_ray.distributed.cache import _HOST, CacheWriter

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    cache = tmp_path / "cache"
    cache.mkdir()
    names = {"dead": f"k1.partial-{_HOST}-{dead_pid}-0123abcd",
             "alive": f"k2.partial-{_HOST}-{os.getpid()}-0123abcd",
             "old": f"k3.partial-{_HOST}-{os.getpid()}-4567abcd", "other_host": "k4.partial-elsewhere-1-89abcdef",
             "old_style": "k5.partial", "moved_aside": f"k6.stale-{_HOST}-{dead_pid}-0123abcd", "cache": "k7"}
    for name in names.values():
        (cache / name).mkdir()
    two_days_ago = (cache / names["old"]).stat().st_mtime - 2 * 24 * 3600
    for key in ("old", "old_style", "cache"):
        os.utime(cache / names[key], (two_days_ago, two_days_ago))
    CacheWriter(cache / "k8")  # a writer cleans up as it starts
    left = {p.name for p in cache.iterdir()}
    assert left == {names["alive"], names["other_host"], names["cache"]} | {
        p for p in left if p.startswith("k8.partial-")}


def _counting_pipeline(monkeypatch) -> list[int]:
    """The clips each frames pipeline of ``asd_ray.distributed.embed`` is started for, as it starts."""
    from asd_ray.distributed import embed

    started, pipeline = [], embed.preprocessed

    def counted(rows, *args, **kwargs):
        started.append(len(rows))
        return pipeline(rows, *args, **kwargs)

    monkeypatch.setattr(embed, "preprocessed", counted)
    return started


def test_a_second_run_of_the_default_detector_reads_its_log_mel_frames_from_the_cache(ray_local, tiny_corpus,
                                                                                    tmp_path, monkeypatch):
    """The default detector (fusion) eats log-mel frames: the second run over the same clips computes none of
    them (no pipeline starts) and scores exactly as the first."""
    import numpy as np

    from asd_ray.config import RunConfig, load_config
    from asd_ray.distributed.run import ray_run

    config = load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}"])
    assert config.detector == "fusion"
    started = _counting_pipeline(monkeypatch)
    first = ray_run([tiny_corpus], config, tmp_path / "first", machines=["valve"])
    assert started == [first.clips_embedded + len(first.rejects)] and started[0] > 0
    second = ray_run([tiny_corpus], config, tmp_path / "second", machines=["valve"])
    assert len(started) == 1  # nothing computed the second time
    assert second.clips_embedded == first.clips_embedded and second.rejects == first.rejects
    r1, r2 = first.results["valve"], second.results["valve"]
    assert r2.filenames == r1.filenames
    np.testing.assert_array_equal(r2.raw_scores, r1.raw_scores)
    np.testing.assert_array_equal(r2.scores, r1.scores)
    assert r2.decisions.tolist() == r1.decisions.tolist()
    assert _scores(tmp_path / "second") == _scores(tmp_path / "first")
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "_COMPLETE").is_file()


def test_frames_cached_under_other_log_mel_settings_are_not_used(ray_local, tiny_corpus, tmp_path, monkeypatch):
    """n_mels (like every log-mel or pre-processing setting) is part of the frames' key: a change misses the
    cache and computes matrices of the new size; the old settings still find theirs."""
    from asd_ray.config import RunConfig, load_config
    from asd_ray.distributed.run import frames_table

    records = _valve(tiny_corpus)
    started = _counting_pipeline(monkeypatch)
    base = [f"ray.cache_dir={tmp_path / 'cache'}"]
    table = frames_table(records, load_config(RunConfig, None, base))
    assert not table.from_cache and {m.shape[1] for m in table.embeddings} == {128}
    other = frames_table(records, load_config(RunConfig, None, [*base, "frames.n_mels=64"]))
    assert not other.from_cache and {m.shape[1] for m in other.embeddings} == {64}
    assert started == [len(records), len(records)] and len(list((tmp_path / "cache").iterdir())) == 2
    again = frames_table(records, load_config(RunConfig, None, base))
    assert again.from_cache and len(started) == 2
    assert all((a == b).all() for a, b in zip(again.embeddings, table.embeddings))


def _matrices():
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((5, 3)).astype(np.float32), np.zeros((0, 0), np.float32),
            rng.standard_normal((1, 3)).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)]


def test_log_mel_matrices_go_to_parquet_as_raw_float32_bytes_and_come_back_equal(tmp_path):
    """Each row's matrix is one binary value (its float32 bytes): written and read back whole, in parts, and from
    a slice of a column (a view with an offset, as Arrow hands out blocks), every value is the one written."""
    import numpy as np

    from asd_ray.distributed.cache import CacheWriter, matrix_column, matrix_rows, read_columns

    mats = _matrices()
    column = matrix_column(mats)
    assert column.type == pa.large_binary() and len(column) == 4
    table = pa.table({"path": [f"c{i}" for i in range(4)], "logmel": column})
    writer = CacheWriter(tmp_path / "key")
    writer.write(0, table.slice(0, 2))
    writer.write(1, table.slice(2))
    rows = read_columns(writer.partial)["logmel"]
    assert [r.dtype for r in rows] == [np.float32] * 4
    assert [r.tobytes() for r in rows] == [m.tobytes() for m in mats]
    assert [r.tobytes() for r in matrix_rows(column.slice(1, 3))] == [m.tobytes() for m in mats[1:]]


def test_a_frames_cache_of_list_columns_written_by_an_older_asd_ray_reads_back_the_same(tmp_path):
    """asd-ray wrote the matrices as list<float> before: such a cache reads back to the same arrays."""
    import numpy as np

    from asd_ray.distributed.cache import read_columns

    mats = _matrices()
    offsets = np.concatenate([[0], np.cumsum([m.size for m in mats])]).astype(np.int32)
    old = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([m.ravel() for m in mats])))
    pq.write_table(pa.table({"path": [f"c{i}" for i in range(4)], "logmel": old}), tmp_path / "part-00000.parquet")
    rows = read_columns(tmp_path)["logmel"]
    assert [r.tobytes() for r in rows] == [m.tobytes() for m in mats]
