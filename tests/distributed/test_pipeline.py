"""The Ray Data pipeline end to end equals the single-process reference run; rejects reconcile; cache reuse."""

import dataclasses

import importlib

import numpy as np
import pytest

from asd_ray.config import RunConfig, load_config
from asd_ray.data.layout import discover
from asd_ray.detect import plan_records, reference_run
from asd_ray.distributed.embed import embed_corpus
from asd_ray.distributed.run import ray_run
from tiny import NOT_FILES, TINY, entries_named_like_clips


def _config(tmp_path, *extra):
    return load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("detector", ["knn", "fusion", "fusion+noise"])
def test_ray_run_equals_reference_run(ray_local, tiny_corpus, tmp_path, detector, monkeypatch):
    from asd_ray.scoring import metrics

    monkeypatch.setattr(metrics, "LOO_CHUNK", 7)  # the jackknife of the tiny splits in several jobs (Ray tasks)
    noise = ["supplemental.noise_profile=true"] if detector.endswith("+noise") else []
    config = _config(tmp_path, f"detector={detector.removesuffix('+noise')}", *noise)
    ref = reference_run([tiny_corpus], config, tmp_path / "ref")
    got = ray_run([tiny_corpus], config, tmp_path / "ray")
    assert set(got.results) == set(ref.results) == {"ToyCar", "valve", "ToyPet"}
    for m, r in ref.results.items():
        assert got.results[m].filenames == r.filenames
        np.testing.assert_allclose(got.results[m].raw_scores, r.raw_scores, rtol=1e-6)
        assert got.results[m].decisions.tolist() == r.decisions.tolist()
        rows = (tmp_path / "ray" / f"anomaly_score_{m}_section_00_test.csv").read_text().splitlines()
        assert len(rows) == 4 * TINY["test_per_cell"] and rows[0].startswith("section_00_")
        assert len((tmp_path / "ray" / f"decision_result_{m}_section_00_test.csv").read_text().splitlines()) == len(rows)
    assert got.metrics["official_score"] == pytest.approx(ref.metrics["official_score"], rel=1e-9)
    # the jackknife's leave-one-out AUCs computed in Ray tasks, in jobs of LOO_CHUNK clips
    assert got.metrics["official_score_ci95"] == pytest.approx(ref.metrics["official_score_ci95"], rel=1e-9)
    assert (tmp_path / "ray" / "report.md").read_text().count("| ToyCar |") == 1
    for m in ref.results:  # drawn in Ray tasks, written by the driver
        assert (tmp_path / "ray" / f"plot_{m}.png").read_bytes() == (tmp_path / "ref" / f"plot_{m}.png").read_bytes()
    # the Ray run's wait for its warm workers is timed apart from its embedding stage; the reference has none
    assert got.timings["warm_up"] >= 0 and "warm_up" not in ref.timings
    assert got.timings["embed"] > 0 and got.timings["discover"] >= 0


@pytest.mark.parametrize("channels", ["near", "cancel", "subtract"])
def test_a_two_channel_corpus_scores_the_same_on_ray_and_in_one_process(ray_local, two_channel_corpus, tmp_path,
                                                                        channels):
    config = _config(tmp_path, "detector=pooled", f"preprocess.channels={channels}")
    ref = reference_run([two_channel_corpus], config)
    got = ray_run([two_channel_corpus], config)
    assert set(ref.results) == set(got.results) == {"valve"}
    np.testing.assert_allclose(got.results["valve"].raw_scores, ref.results["valve"].raw_scores, rtol=1e-6)
    flag = {"near": "channel", "cancel": "cancelled", "subtract": "subtracted"}[channels]  # none down-mixed, all flagged
    assert got.flags == ref.flags == {flag: got.clips_embedded}


def test_bad_clips_are_in_the_rejects_table_and_counts_reconcile(ray_local, tmp_path, request):
    root = request.getfixturevalue("corpus_with_bad_clips")
    report = ray_run([root], _config(tmp_path), tmp_path / "out")
    names = {r.path.rsplit("/", 1)[1]: r.reason for r in report.rejects}
    assert set(names) == {"section_00_source_train_normal_0900_spd_99_mic_1.wav",
                          "section_00_source_test_normal_0900_spd_99_mic_1.wav",
                          "section_00_target_test_anomaly_0901_spd_99_mic_2.wav"}
    assert all("cannot decode" in reason for reason in names.values())
    unused = {u.path.rsplit("/", 1)[1]: u.reason for u in report.unused}
    for name, reason in NOT_FILES.items():  # a directory named like a clip, a dangling link: listed, not lost
        assert reason in unused[name]
    assert report.clips_in == entries_named_like_clips(root)
    assert report.clips_in == report.clips_embedded + len(report.rejects) + len(report.unused)
    assert len(report.results["ToyCar"].filenames) == 4 * TINY["test_per_cell"]


def test_second_embedding_of_the_same_corpus_reads_the_cache(ray_local, tiny_corpus, tmp_path):
    records, _ = plan_records(discover([tiny_corpus], ["valve"]))
    config = _config(tmp_path)
    first = embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=tmp_path / "c")
    second = embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=tmp_path / "c")
    assert not first.from_cache and second.from_cache and second.path == first.path
    assert np.array_equal(first.embeddings, second.embeddings)
    other = load_config(RunConfig, None, ["preprocess.target_lufs=-20"])
    third = embed_corpus(records, embed=other.embed, preprocess=other.preprocess, cache_dir=tmp_path / "c")
    assert not third.from_cache and third.path != first.path


def test_ae_baseline_on_ray_trains_one_task_per_machine(ray_local, tiny_corpus, tmp_path):
    """Each machine's AE is trained in a Ray task of half a CPU (1 torch thread by Ray's default) while the
    reference trains in the driver (the session's 2 threads): the AE trains on one thread in both
    (``threads.one_thread``), so the weights are the same bit for bit, hence the losses and scores (before the pin
    the weights parted in the first epoch)."""
    config = _config(tmp_path, "detector=ae-maha", "ae.epochs=3", "ae.batch_size=128", "ray.detector_cpus=0.5")
    ref = reference_run([tiny_corpus], config, tmp_path / "ref")
    got = ray_run([tiny_corpus], config, tmp_path / "ray")
    assert set(got.results) == set(ref.results) == {"ToyCar", "valve", "ToyPet"}
    for m, r in ref.results.items():
        assert got.results[m].filenames == r.filenames
        assert (tmp_path / "ray" / f"anomaly_score_{m}_section_00_test.csv").is_file()
        assert got.results[m].train_losses == r.train_losses
        np.testing.assert_array_equal(got.results[m].raw_scores, r.raw_scores)
        saved = [torch_state(tmp_path / run / "banks" / m / "model.pt") for run in ("ref", "ray")]
        assert saved[0].keys() == saved[1].keys()
        assert all(np.array_equal(saved[0][k], saved[1][k]) for k in saved[0])


def torch_state(path) -> dict:
    import torch

    return {k: v.numpy() for k, v in torch.load(path).items()}


@pytest.fixture(scope="module")
def compared_runs(tiny_corpus, tmp_path_factory):
    """compared_runs(name) -> (reference report, Ray report) of ``asd-ray compare``'s detector ``name`` on the
    tiny corpus; each path embeds the corpus once for all detectors and fits the AE once for both AE scores (as
    ``compare`` does: the second adopts the first's fit, on Ray from a task's result). The AE trains 5
    epochs: scores far from perfect (the tiny corpus' AE AUCs are 0.1-0.9), and the Ray task's AE parts from
    the driver's within the first epoch when the thread counts differ."""
    from asd_ray.cli import DETECTORS

    cache = tmp_path_factory.mktemp("compare_cache")
    features, fits = {"ref": {}, "ray": {}}, {"ref": {}, "ray": {}}
    done = {}

    def get(name):
        if name not in done:
            config = load_config(RunConfig, None, [f"ray.cache_dir={cache}", "ae.epochs=5", "ae.batch_size=128",
                                                   *DETECTORS[name]])
            done[name] = (reference_run([tiny_corpus], config, feature_cache=features["ref"], fits=fits["ref"]),
                          ray_run([tiny_corpus], config, feature_cache=features["ray"], fits=fits["ray"]))
            if name.startswith("ae-"):  # one fit per machine for both AE scores, on either path
                for path in ("ref", "ray"):
                    ae = [key for by_machine in fits[path].values() for shared in by_machine.values()
                          for key in shared if key[0] == "AEDetector"]
                    assert len(ae) == 3, path
        return done[name]

    return get


def _compare_names():
    from asd_ray.cli import DETECTORS

    return list(DETECTORS)


@pytest.mark.parametrize("name", _compare_names())
def test_every_compared_detector_scores_the_same_on_ray_and_in_one_process(ray_local, compared_runs, name):
    ref, got = compared_runs(name)
    assert set(got.results) == set(ref.results) == {"ToyCar", "valve", "ToyPet"}
    for m, r in ref.results.items():
        assert got.results[m].filenames == r.filenames
        if name.startswith("ae-"):  # the same weights bit for bit: the same scores
            assert got.results[m].train_losses == r.train_losses
            np.testing.assert_array_equal(got.results[m].raw_scores, r.raw_scores)
        else:
            np.testing.assert_allclose(got.results[m].raw_scores, r.raw_scores, rtol=1e-6)
        assert got.results[m].decisions.tolist() == r.decisions.tolist()
    assert got.metrics["official_score"] == pytest.approx(ref.metrics["official_score"], rel=1e-9)
    aucs = [v[f"auc_{d}"] for split in ref.metrics["splits"].values() for v in split["machines"].values()
            for d in ("source", "target")]
    assert min(aucs) < 0.9  # a comparison on scores that rank the clips perfectly would show little


def test_preprocessing_tasks_feed_embedding_actors_started_before_the_pipeline(ray_local, tiny_corpus,
                                                                              tiny_hubert, tmp_path):
    """The pool's actors are started (and warm) before any pipeline runs, and every pipeline of the driver uses
    those same processes; Ray Data runs only the pre-processing, in tasks of its own."""
    import ray

    from asd_ray.distributed.embed_pool import EmbeddingPool
    from asd_ray.distributed.pipeline import embedded_tables

    records, _ = plan_records(discover([tiny_corpus], ["valve"]))
    config = load_config(RunConfig, None, [f"embed.backbone={tiny_hubert}", "embed.device=cpu", "embed.batch_size=3"])
    pool = EmbeddingPool(config.embed, use_gpu=False, num_actors=1, actor_cpus=0.5)
    try:
        [pid] = pool.ready()
        rows = [r.to_row() for r in records[:8]]
        tables = list(embedded_tables(rows, embed=config.embed, preprocess=config.preprocess, pool=pool, use_gpu=False))
        assert sum(t.num_rows for t in tables) == 8 and all(t.num_rows <= 3 for t in tables)
        got = {p: e for t in tables for p, e in zip(t.column("path").to_pylist(), t.column("embedding").to_pylist())}
        assert set(got) == {r["path"] for r in rows} and all(len(e) == 32 for e in got.values())
        table = embed_corpus(records[:8], embed=config.embed, preprocess=config.preprocess,
                             cache_dir=tmp_path / "c", pool=pool)  # a second pipeline: the same actor
        assert pool.ready() == [pid] and not table.rejects and len(table.records) == 8
        np.testing.assert_allclose(table.embeddings, [got[r.path] for r in table.records], rtol=1e-6)
        assert ray.get(pool.actors[0].ready.remote()) == pid
        other = dataclasses.replace(config.embed, layer="0")  # not what the actors embed: an error, not wrong rows
        with pytest.raises(ValueError, match="embedding pool was started for"):
            embed_corpus(records[:8], embed=other, preprocess=config.preprocess, cache_dir=tmp_path / "d", pool=pool)
    finally:
        pool.close()


def test_pool_embeds_with_the_actors_that_started_when_another_cannot_be_scheduled(ray_local, tiny_corpus,
                                                                                   tiny_hubert):
    """Two actors of 1.5 CPUs on a 2-CPU Ray (as two GPU actors on a one-GPU node): the one that started embeds
    everything; none of the work waits on the one that never will."""
    from asd_ray.distributed.embed_pool import EmbeddingPool
    from asd_ray.distributed.pipeline import embedded_tables

    records, _ = plan_records(discover([tiny_corpus], ["valve"]))
    config = load_config(RunConfig, None, [f"embed.backbone={tiny_hubert}", "embed.device=cpu", "embed.batch_size=4"])
    pool = EmbeddingPool(config.embed, use_gpu=False, num_actors=2, actor_cpus=1.5)
    try:
        tables = list(embedded_tables([r.to_row() for r in records[:12]], embed=config.embed,
                                      preprocess=config.preprocess, pool=pool, use_gpu=False))
        assert sum(t.num_rows for t in tables) == 12
    finally:
        pool.close()


def test_an_actor_that_cannot_load_its_backbone_fails_the_pool_in_one_line(ray_local, tmp_path):
    from asd_ray.distributed.embed_pool import EmbeddingPool
    from asd_ray.errors import BackboneError

    config = load_config(RunConfig, None, [f"embed.backbone={tmp_path / 'missing'}", "embed.device=cpu"])
    pool = EmbeddingPool(config.embed, use_gpu=False)
    try:
        with pytest.raises(BackboneError) as err:
            pool.ready()
        assert "missing" in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)
    finally:
        pool.close()


def test_ray_run_starts_its_embedding_actors_before_the_pipeline_and_ends_them(ray_local, tiny_corpus, tiny_hubert,
                                                                              tmp_path, monkeypatch):
    """The run starts the actors before discovery (before Ray Data plans anything), feeds the pipeline to those
    very actors and ends them with the run; when the cache holds every clip, it ends them after discovery."""
    import ray

    from asd_ray import detect
    from asd_ray.distributed import embed as embed_module
    from asd_ray.distributed import pipeline as pipeline_module
    from asd_ray.distributed import run as run_module

    events, pools = [], []

    class WatchedPool(run_module.EmbeddingPool):
        def __init__(self, *args, **kwargs):
            events.append("pool")
            pools.append(self)
            super().__init__(*args, **kwargs)
            self.handles = list(self.actors)

    preprocessed, discover_ = pipeline_module.preprocessed, detect.discover

    def spy_pipeline(*args, **kwargs):
        events.append("pipeline")
        return preprocessed(*args, **kwargs)

    def spy_discover(*args, **kwargs):
        events.append("discover")
        return discover_(*args, **kwargs)

    for module in (run_module, embed_module):  # the run's pool, and any embed_corpus would start of its own
        monkeypatch.setattr(module, "EmbeddingPool", WatchedPool)
    monkeypatch.setattr(pipeline_module, "preprocessed", spy_pipeline)
    monkeypatch.setattr(detect, "discover", spy_discover)
    config = _config(tmp_path, f"embed.backbone={tiny_hubert}", "embed.device=cpu", "detector=knn")
    first = ray_run([tiny_corpus], config, machines=["valve"])
    assert events == ["pool", "discover", "pipeline"]  # one pool, and the pipeline took it
    second = ray_run([tiny_corpus], config, machines=["valve"])  # cached embeddings: no pipeline
    assert events == ["pool", "discover", "pipeline", "pool", "discover"]
    for pool in pools:  # closed: after the first run, and after the second's discovery
        assert pool.actors == [] and len(pool.handles) == 1
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(pool.handles[0].ready.remote(), timeout=60)
    np.testing.assert_allclose(second.results["valve"].raw_scores, first.results["valve"].raw_scores, rtol=1e-6)


def test_weight_free_logmel_embeds_inside_the_preprocessing_tasks(ray_local, tiny_corpus):
    from asd_ray.distributed.pipeline import embedded_tables

    records, _ = plan_records(discover([tiny_corpus], ["valve"]))
    config = load_config(RunConfig, None, [])
    tables = list(embedded_tables([r.to_row() for r in records[:8]], embed=config.embed,
                                  preprocess=config.preprocess, pool=None, use_gpu=False))
    assert sum(t.num_rows for t in tables) == 8
    assert all(len(e) == 256 for t in tables for e in t.column("embedding").to_pylist())


@pytest.mark.parametrize("family", ["hubert", "audio-spectrogram-transformer"])
def test_encoder_pipeline_embeds_mixed_length_batches_as_clip_by_clip(ray_local, tiny_encoder, family, tmp_path):
    """Trimmed clips of many lengths share padded batches (tensor columns; one forward pass per batch, of the
    clips or of their 1 s windows) and still get the embedding each has alone; a bad clip in the batch is a
    reject, not a zero row."""
    import soundfile as sf

    from asd_ray.data.audio import preprocess_clip
    from asd_ray.models.backbones import load_backbone

    test = tmp_path / "data" / "dev_data" / "raw" / "fan" / "test"
    test.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i, seconds in enumerate((1.0, 2.3, 1.7, 3.1, 1.2, 2.0)):
        sf.write(test / f"section_00_source_test_normal_{i:04d}_a_1.wav",
                 0.1 * rng.standard_normal(int(seconds * 16_000)), 16_000, subtype="FLOAT")
    (test / "section_00_source_test_anomaly_0009_a_1.wav").write_bytes(b"RIFF-not-audio")
    records, _ = plan_records(discover([tmp_path / "data"]))
    checkpoint = tiny_encoder(family)
    config = load_config(RunConfig, None, [f"embed.backbone={checkpoint}", "embed.batch_size=4", "embed.device=cpu"])
    table = embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=tmp_path / "c")
    assert [r["path"].rsplit("/", 1)[1] for r in table.rejects] == ["section_00_source_test_anomaly_0009_a_1.wav"]
    backbone = load_backbone(str(checkpoint), device="cpu")
    assert len(table.records) == 6
    for rec, got in zip(table.records, table.embeddings):
        alone = backbone.embed([preprocess_clip(rec.path).waveform])[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_padded_samples_reads_rows_of_blocks_padded_to_different_widths():
    from asd_ray.distributed.batches import batch_waveforms, object_array, padded_samples

    rows = object_array([np.arange(5, dtype=np.float32), np.ones(3, dtype=np.float32)])  # widths 5 and 3
    batch = {"samples": rows, "length": np.array([4, 2])}
    samples, lengths = padded_samples(batch)
    assert samples.shape == (2, 4) and lengths.tolist() == [4, 2]
    assert samples[0].tolist() == [0, 1, 2, 3] and samples[1].tolist() == [1, 1, 0, 0]
    assert [w.tolist() for w in batch_waveforms(batch)] == [[0, 1, 2, 3], [1, 1]]


@pytest.mark.parametrize("detector", ["knn", "fusion"])
def test_warm_up_runs_the_pipeline_tasks_stages_on_a_dummy_clip(ray_local, detector):
    import ray

    from asd_ray.distributed.run import pipeline_tasks, warm_pipeline

    config = load_config(RunConfig, None, [f"detector={detector}"])
    then, cpus, batch_size = pipeline_tasks(config)
    assert batch_size == 16  # embed.batch_size, for clip embeddings and frames alike
    assert cpus == 1.0 and [fn.__name__ for fn, _ in then] == ["embed_in_task" if detector == "knn" else "frames_batch"]
    assert ray.get(warm_pipeline(config), timeout=120) == ["", ""]  # one per CPU of the session's two


def test_warm_up_reports_a_failing_stage_instead_of_raising():
    from asd_ray.distributed.pipeline import warm_batch

    def broken(batch):
        raise RuntimeError("no mel bank")

    assert warm_batch([(broken, {})], 16_000) == "RuntimeError: no mel bank"


def test_tasks_take_half_a_cpu_only_beside_embedding_actors_on_the_cpus():
    from asd_ray.distributed.pipeline import clip_tasks

    hubert = load_config(RunConfig, None, ["embed.backbone=/some/checkpoint"]).embed
    assert clip_tasks(hubert, use_gpu=False) == ([], 0.5)
    assert clip_tasks(hubert, use_gpu=True) == ([], 1.0)
    assert clip_tasks(hubert, use_gpu=False, preprocess_cpus=0.25) == ([], 0.25)


def test_pipeline_tasks_run_side_by_side_on_every_cpu(ray_local):
    """Ray Data's executor noticed a finished task up to 0.1 s late and the CPUs it may use up to a second late;
    with tasks this short each next task went to the worker that had just finished, and the two CPUs' tasks ran
    one after the other, all on one worker. Asserted on what the scheduler did, as the tasks recorded it (which
    worker ran each, from when to when): tasks on both workers, and tasks of the two workers in flight at once.
    No share of the time is asserted, so a loaded machine that stretches every task cannot fail it."""
    import ray

    from asd_ray.distributed.pipeline import prompt_ray_data, start_ray_data_actors

    def timed_batch(batch, seconds):  # defined here: Ray pickles it by value (workers cannot import tests)
        import os
        import time

        start = time.time()
        time.sleep(seconds)
        return {"pid": np.full(len(batch["id"]), os.getpid()), "start": np.full(len(batch["id"]), start),
                "end": np.full(len(batch["id"]), time.time())}

    start_ray_data_actors()
    assert prompt_ray_data()
    for _ in range(2):  # the first execution on a cluster waits for Ray Data's coordinator: the second is checked
        ds = ray.data.from_items([{"id": i} for i in range(24)]).map_batches(
            timed_batch, fn_kwargs={"seconds": 0.12}, batch_size=2, num_cpus=1)
        rows = {(int(b["pid"][0]), float(b["start"][0]), float(b["end"][0]))
                for b in ds.iter_batches(batch_size=None, batch_format="numpy")}
    assert len(rows) == 12 and len({pid for pid, _, _ in rows}) == 2, sorted(rows)
    side_by_side = [(a, b) for a in rows for b in rows if a[0] < b[0] and max(a[1], b[1]) < min(a[2], b[2])]
    assert side_by_side, sorted(rows)  # two workers' tasks whose intervals overlap: both CPUs in use at once


def test_tasks_that_do_all_the_work_take_a_few_batches_each_but_every_cpu_gets_several():
    from asd_ray.distributed.pipeline import task_blocks

    assert task_blocks(1610, 16, 2) == 26  # 4 batches of 16 per task (62 clips)
    assert task_blocks(18_000, 16, 16) == 282
    assert task_blocks(200, 16, 16) == 13  # 4 tasks per CPU wanted, but never less than a batch per task
    assert task_blocks(40, 16, 2) == 3 and task_blocks(0, 16, 2) == 1


def test_ray_datas_executor_polls_every_5_ms_for_one_batch_tasks_and_at_rays_own_pace_for_longer_ones(ray_local):
    """Its poll (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``) is set anew for each pipeline, up and down, never above
    Ray's own 0.1 s: 5 ms where a task holds one batch, Ray's 0.1 s where it holds several (a frames pipeline's
    tasks of 4 batches), for a task's new output wakes the executor anyway (``wake_ray_data_on_first_output``: its
    module's ``ray`` is the stand-in, whose logic ``test_private_apis`` checks; every Ray Data test here runs with it)."""
    from asd_ray.config import PreprocessConfig
    from asd_ray.distributed.pipeline import COMPLETION_POLL_S, TASKS_POLL_S, preprocessed, prompt_ray_data
    from asd_ray.private_apis import RAY_DATA_CONSTANTS, _constant_owner, _FirstReadyRay

    module, owner, name = RAY_DATA_CONSTANTS[0]
    rows = [{"path": f"/nowhere/{i}.wav"} for i in range(640)]
    try:
        ds = preprocessed(rows, PreprocessConfig(), batch_size=16, num_cpus=1, task_batches=4)
        assert getattr(_constant_owner(module, owner), name) == pytest.approx(TASKS_POLL_S) == pytest.approx(0.1)
        assert isinstance(importlib.import_module(module).ray, _FirstReadyRay)
        assert sorted(ds.select_columns(["path"]).to_pandas()["path"]) == sorted(r["path"] for r in rows)
        preprocessed(rows, PreprocessConfig(), batch_size=16, num_cpus=1, blocks=40)
        assert getattr(_constant_owner(module, owner), name) == pytest.approx(COMPLETION_POLL_S)
        prompt_ray_data(poll_s=60.0)
        assert getattr(_constant_owner(module, owner), name) == pytest.approx(0.1)
    finally:
        prompt_ray_data()


def test_the_driver_loads_ray_datas_executor_while_workers_warm_without_a_printout(ray_local, capsys, monkeypatch):
    """``load_ray_data_executor`` (called by ``warm_workers``) plans a pipeline and runs one that needs no task, so
    that the real pipeline's start pays no imports: the executor is loaded after it, and it printed nothing
    (``explain`` prints the plans). Once per process: a second call does nothing."""
    import sys

    from asd_ray.config import PreprocessConfig
    from asd_ray.distributed import pipeline

    monkeypatch.setattr(pipeline, "_executor_loaded", False)  # an earlier test's run may have loaded it
    pipeline.load_ray_data_executor(PreprocessConfig(), batch_size=16, num_cpus=1)
    assert capsys.readouterr().out == "" and pipeline._executor_loaded
    assert "ray.data._internal.execution.streaming_executor" in sys.modules


def test_embedding_actors_take_ray_datas_default_scheduling_when_it_is_not_loaded():
    """``EmbeddingPool`` reads Ray Data's scheduling strategy only when Ray Data is loaded (``ray_run`` starts the
    actors before importing it) and otherwise assumes its default: that default must still be SPREAD."""
    import ray.data

    assert ray.data.DataContext().scheduling_strategy == "SPREAD"
