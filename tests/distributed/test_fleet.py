"""Bank actors and the router: exact scores, add(), a killed actor mid-stream, unknown machines, clip streams."""

import asyncio
import csv
import dataclasses
import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asd_ray.bank.memory_bank import MemoryBank
from asd_ray.bank.saved import write_preprocess
from asd_ray.detectors import load_detector
from asd_ray.config import FleetConfig, PostConfig, PreprocessConfig, RunConfig, load_config
from asd_ray.detect import reference_run
from asd_ray.distributed.bank_actors import actor_name, start_banks
from asd_ray.distributed.fleet import BAD_INPUT, UNKNOWN_MACHINE, Request, Router, score_requests
from asd_ray.distributed.streams import score_streams, stream_requests
from asd_ray.scoring.postprocess import StreamPostprocessor, calibrate
from tiny import NOT_FILES, TINY

DIM = 48


@pytest.fixture
def fleet(ray_local, tmp_path):
    """Two saved random banks and their actors in a namespace of this test only (killed after)."""
    rng = np.random.default_rng(0)
    banks = {}
    for i, machine in enumerate(("fan", "valve")):
        bank = MemoryBank(k=3).fit(rng.standard_normal((300, DIM)).astype(np.float32) + i,
                                   [f"m{j}" for j in range(300)])
        write_preprocess(bank.save(tmp_path / "banks" / machine), {**dataclasses.asdict(PreprocessConfig()),
                                                                    "channels": "near"})
        banks[machine] = bank
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    actors = start_banks(tmp_path / "banks", namespace=namespace)
    yield banks, actors, namespace, tmp_path / "banks"
    for handles in actors.values():
        for a in handles:
            ray_local.kill(a, no_restart=True)


def _queries(n, seed=1, shift=0.0):
    return (np.random.default_rng(seed).standard_normal((n, DIM)) * 1.2 + shift).astype(np.float32)


def test_actor_scores_equal_memory_bank_and_router_keeps_order(fleet, ray_local):
    banks, actors, namespace, _ = fleet
    q = _queries(200)
    for machine, bank in banks.items():
        got = ray_local.get(actors[machine][0].score.remote(q))
        assert np.array_equal(got, bank.score(q))  # the same FAISS call: bit-identical
    named = ray_local.get_actor(actor_name("fan"), namespace=namespace)
    assert ray_local.get(named.stats.remote())["size"] == 300

    post = PostConfig(median_window=3)
    router = Router(actors, post=post, fleet=FleetConfig(max_batch=32))
    machines = ["fan" if i % 3 else "valve" for i in range(200)]
    results = score_requests(router, [Request(m, f"s-{m}", embedding=q[i]) for i, m in enumerate(machines)])
    assert [r.machine for r in results] == machines and not any(r.error for r in results)
    for machine, bank in banks.items():
        idx = [i for i, m in enumerate(machines) if m == machine]
        raw = np.array([results[i].raw_score for i in idx])
        np.testing.assert_allclose(raw, bank.score(q[idx]), rtol=1e-6)  # FAISS may batch differently
        stream = StreamPostprocessor(calibrate(bank.loo_scores(), post.threshold_quantile), median_window=3)
        expected = [stream.push(s) for s in raw]
        assert [(results[i].score, results[i].decision) for i in idx] == expected


def test_add_changes_scores_and_persists(fleet, ray_local):
    banks, actors, _, bank_root = fleet
    router = Router(actors)
    new = _queries(5, seed=3, shift=4.0)  # far from both banks
    before = score_requests(router, [Request("fan", "s", embedding=e) for e in new])
    stats = router.add("fan", new, [f"new{i}" for i in range(5)])
    assert stats["size"] == 305
    after = score_requests(router, [Request("fan", "s2", embedding=e) for e in new])
    reference = banks["fan"].add(new, [f"new{i}" for i in range(5)])
    np.testing.assert_allclose([r.raw_score for r in after], reference.score(new), rtol=1e-6)
    assert all(a.raw_score < b.raw_score for a, b in zip(after, before))
    assert router.add("fan", new, [f"new{i}" for i in range(5)])["size"] == 305  # a retried add is not doubled
    assert load_detector(bank_root / "fan").size == 305  # persisted: a restart reloads it
    # how its clips were pre-processed stays with the bank it persisted
    assert json.loads((bank_root / "fan" / "preprocess.json").read_text())["channels"] == "near"


def test_add_recalibrates_running_streams(fleet):
    """Normals added mid-stream re-calibrate that stream too; results carry the threshold and bank version."""
    banks, actors, _, _ = fleet
    router = Router(actors)
    q, new = _queries(3), _queries(40, seed=11, shift=1.0)
    before = score_requests(router, [Request("fan", "line", embedding=e) for e in q])
    assert router.add("fan", new, [f"n{i}" for i in range(40)])["added"] == 40
    after = score_requests(router, [Request("fan", "line", embedding=e) for e in q])
    bank = banks["fan"].add(new, [f"n{i}" for i in range(40)])
    stream = StreamPostprocessor(calibrate(bank.loo_scores()))
    assert [(r.score, r.decision) for r in after] == [stream.push(s) for s in bank.score(q)]
    assert after[0].threshold == stream.threshold != before[0].threshold
    assert after[0].bank_version != before[0].bank_version != ""


def test_a_second_router_follows_normals_added_through_the_first(fleet):
    """Serve replicas each hold a router: one that did not take the /normals request catches up by version."""
    _, actors, _, _ = fleet
    first, second = Router(actors), Router(actors)
    first.add("valve", _queries(30, seed=12, shift=1.0), [f"n{i}" for i in range(30)])
    assert asyncio.run(second.follow_versions()) == ["valve"]
    assert second.calibrations["valve"] == first.calibrations["valve"]
    assert second.stats["valve"]["version"] == first.stats["valve"]["version"]
    assert asyncio.run(second.follow_versions()) == []


def test_killed_bank_actor_loses_no_request(fleet, ray_local):
    banks, actors, _, _ = fleet
    q = _queries(2000, seed=5)
    pid_before = ray_local.get(actors["fan"][0].stats.remote())["pid"]
    router = Router(actors, fleet=FleetConfig(max_batch=64, max_in_flight=2))

    async def stream():
        futures = [router.submit(Request("fan", "line-1", embedding=e)) for e in q[:1000]]
        await asyncio.sleep(0.01)  # batches of the first half are in flight now
        ray_local.kill(actors["fan"][0], no_restart=False)
        futures += [router.submit(Request("fan", "line-1", embedding=e)) for e in q[1000:]]
        return await asyncio.gather(*futures)

    results = asyncio.run(stream())
    assert len(results) == 2000 and not [r.error for r in results if r.error]
    np.testing.assert_allclose([r.raw_score for r in results], banks["fan"].score(q), rtol=1e-6)
    stats = ray_local.get(actors["fan"][0].stats.remote())
    assert stats["pid"] != pid_before and stats["size"] == 300
    assert np.array_equal(ray_local.get(actors["fan"][0].score.remote(q[:100])), banks["fan"].score(q[:100]))


def test_unknown_machine_and_bad_embedding_do_not_disturb_others(fleet):
    banks, actors, _, _ = fleet
    router = Router(actors)
    q = _queries(6)
    requests = [Request("fan", "a", embedding=q[0]), Request("nope", "b", embedding=q[1]),
                Request("fan", "a", embedding=q[2][:10]), Request("valve", "c", embedding=q[3]),
                Request("fan", "a", embedding=np.full(DIM, np.nan, np.float32)), Request("fan", "a", embedding=q[5])]
    results = score_requests(router, requests)
    assert "no bank for machine 'nope'" in results[1].error and "fan" in results[1].error
    assert "size 10" in results[2].error and "finite: False" in results[4].error
    assert [r.failure for r in results] == ["", UNKNOWN_MACHINE, BAD_INPUT, "", BAD_INPUT, ""]
    ok = [0, 3, 5]
    assert all(not results[i].error and results[i].score is not None for i in ok)
    np.testing.assert_allclose([results[0].raw_score, results[5].raw_score], banks["fan"].score(q[[0, 5]]), rtol=1e-6)


def test_missing_bank_is_a_clear_error(fleet):
    _, _, _, bank_root = fleet
    with pytest.raises(FileNotFoundError, match="no saved bank for \\['pump'\\]"):
        start_banks(bank_root, machines=["pump"])


def test_clip_streams_equal_the_batch_run(ray_local, corpus_with_bad_clips, tmp_path):
    config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "fleet.max_batch=8",
                                           "detector=knn"])
    ref = reference_run([corpus_with_bad_clips], config, tmp_path / "ref")
    results = score_streams(tmp_path / "ref" / "banks", config, tmp_path / "fleet", roots=[corpus_with_bad_clips])
    scored = {}
    for r in results:
        if not r.error:
            scored.setdefault(r.machine, {})[r.path.rsplit("/", 1)[1]] = r.raw_score
    for machine, res in ref.results.items():
        np.testing.assert_allclose([scored[machine][f] for f in res.filenames], res.raw_scores, rtol=1e-6)
    with open(tmp_path / "fleet" / "rejects.csv") as fh:
        rejects = {row["path"].rsplit("/", 1)[1]: row["reason"] for row in csv.DictReader(fh)}
    assert "section_00_source_test_normal_0900_spd_99_mic_1.wav" in rejects  # the empty test clip
    assert "section_00_target_test_anomaly_0901_spd_99_mic_2.wav" in rejects  # the truncated one
    for name, reason in NOT_FILES.items():  # the test folder's directory named like a clip, its dangling link
        assert "_train_" in name or reason in rejects[name]
    with open(tmp_path / "fleet" / "streams.csv") as fh:
        rows = list(csv.DictReader(fh))
    n_test = 4 * TINY["test_per_cell"] * 3
    assert len(rows) + len(rejects) == n_test + 2 + 2
    assert (tmp_path / "fleet" / "anomaly_score_valve_section_00_test.csv").is_file()
    ray = ray_local
    for machine in ref.results:
        ray.kill(ray.get_actor(actor_name(machine), namespace=config.fleet.namespace), no_restart=True)


def test_two_channel_clip_streams_equal_the_batch_run(ray_local, two_channel_corpus, tmp_path):
    """DCASE 2026's near/far clips through the fleet: pre-processed as the batch run did (``auto``: the far channel
    cancelled from the near one), recorded with the banks, scored alike."""
    config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "detector=knn"])
    ref = reference_run([two_channel_corpus], config, tmp_path / "ref")
    clips = ref.clips["valve"]["train"] + ref.clips["valve"]["test"]
    assert ref.flags.get("cancelled") == clips and "downmixed" not in ref.flags
    record = json.loads((tmp_path / "ref" / "banks" / "valve" / "preprocess.json").read_text())
    assert record["channels"] == "auto"
    results = score_streams(tmp_path / "ref" / "banks", config, tmp_path / "fleet", roots=[two_channel_corpus])
    assert not [r.error for r in results if r.error]
    scored = {r.path.rsplit("/", 1)[1]: r.raw_score for r in results}
    res = ref.results["valve"]
    np.testing.assert_allclose([scored[f] for f in res.filenames], res.raw_scores, rtol=1e-6)
    ray_local.kill(ray_local.get_actor(actor_name("valve"), namespace=config.fleet.namespace), no_restart=True)


def test_every_entry_of_a_clip_folder_is_a_request_or_listed_with_its_reason(tmp_path, make_tone):
    """serve-fleet --clips: sub-folders (one named like a clip), dangling links and other files are listed."""
    folder = tmp_path / "fan-line-3"
    folder.mkdir()
    for i in range(3):
        sf.write(str(folder / f"clip_{i}.wav"), make_tone(), 16_000)
    (folder / "clip_3.wav").mkdir()
    (folder / "clip_4.wav").symlink_to(tmp_path / "gone.wav")
    (folder / "notes.txt").write_text("x")
    (folder / "archive").mkdir()
    requests, skipped = stream_requests(clips=folder, machine="fan")
    assert [Path(r.path).name for r in requests] == ["clip_0.wav", "clip_1.wav", "clip_2.wav"]
    assert {r.machine for r in requests} == {"fan"} and {r.stream_id for r in requests} == {"fan-line-3"}
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons == {"clip_3.wav": "a directory named like a clip, not a sound file",
                       "clip_4.wav": f"broken symbolic link (points to {tmp_path / 'gone.wav'})",
                       "notes.txt": "not an audio file (.txt)", "archive": "a folder"}


def test_replicas_share_the_load_and_every_add(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    bank = MemoryBank(k=3).fit(rng.standard_normal((200, DIM)).astype(np.float32), [f"m{j}" for j in range(200)])
    bank.save(tmp_path / "banks" / "pump")
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    actors = start_banks(tmp_path / "banks", replicas=2, namespace=namespace)
    try:
        assert len(actors["pump"]) == 2
        assert ray_local.get_actor(actor_name("pump", 1), namespace=namespace) is not None
        router = Router(actors, fleet=FleetConfig(max_batch=16, max_in_flight=1))
        q = _queries(300, seed=9)
        results = score_requests(router, [Request("pump", f"s{i % 7}", embedding=e) for i, e in enumerate(q)])
        np.testing.assert_allclose([r.raw_score for r in results], bank.score(q), rtol=1e-6)
        lane = router.lanes["pump"]
        assert lane.in_flight == [0, 0] and min(lane.calls) > 0  # both replicas took batches
        router.add("pump", q[:3], ["a", "b", "c"])
        assert [s["size"] for s in ray_local.get([a.stats.remote() for a in actors["pump"]])] == [203, 203]
    finally:
        for a in actors["pump"]:
            ray_local.kill(a, no_restart=True)


def test_local_feature_bank_actors_score_like_the_library(ray_local, tiny_corpus, tmp_path):
    """A saved local-feature bank served by the fleet: clip streams (log-mel frames embedded on the way) and
    requests carrying frame matrices score exactly as the library's bank and the batch run."""
    config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "detector=local",
                                           "local.bank_size=300"])
    ref = reference_run([tiny_corpus], config, tmp_path / "ref")
    results = score_streams(tmp_path / "ref" / "banks", config, tmp_path / "fleet", roots=[tiny_corpus])
    assert not [r.error for r in results if r.error]
    scored = {(r.machine, r.path.rsplit("/", 1)[1]): r.raw_score for r in results}
    for machine, res in ref.results.items():
        assert res.detector == "LocalFeatureBank"
        np.testing.assert_allclose([scored[machine, f] for f in res.filenames], res.raw_scores, rtol=1e-6)
    actors = {m: [ray_local.get_actor(actor_name(m), namespace=config.fleet.namespace)] for m in ref.results}
    bank = load_detector(tmp_path / "ref" / "banks" / "valve")
    mats = [np.random.default_rng(i).standard_normal((30, 128)).astype(np.float32) - 60 for i in range(3)]
    assert np.array_equal(ray_local.get(actors["valve"][0].score.remote(mats)), bank.score(mats))
    router = Router(actors, fleet=FleetConfig(max_batch=2))
    got = score_requests(router, [Request("valve", "v", embedding=m) for m in mats]
                         + [Request("valve", "v", embedding=mats[0][:, :64])])
    np.testing.assert_allclose([r.raw_score for r in got[:3]], bank.score(mats), rtol=1e-6)
    assert "(frames x 128) matrices" in got[3].error
    with pytest.raises(Exception, match="takes no added normals"):
        router.add("valve", mats[0], ["x"])
    for machine in ref.results:
        ray_local.kill(ray_local.get_actor(actor_name(machine), namespace=config.fleet.namespace), no_restart=True)


def test_a_simulated_fleet_of_the_default_frame_detector_sends_real_test_clips(ray_local, tiny_corpus, tmp_path):
    """serve-fleet --simulate over fusion banks (log-mel frames): the queries are the log-mel matrices of the
    roots' test clips, and every simulated request is scored as the batch run scored that clip."""
    from asd_ray.bank.memory_bank import BankError
    from asd_ray.distributed.streams import simulate

    config = load_config(RunConfig, None, [f"fleet.namespace=t-{uuid.uuid4().hex[:8]}", "fleet.max_batch=8"])
    assert config.detector == "fusion"
    ref = reference_run([tiny_corpus], config, tmp_path / "ref", ["ToyCar", "valve"])
    with pytest.raises(BankError, match="give --data ROOT"):
        simulate(tmp_path / "ref" / "banks", config, streams=2, rate_hz=1, seconds=1)
    with pytest.raises(ValueError):  # it failed before starting any bank actor
        ray_local.get_actor(actor_name("ToyCar"), namespace=config.fleet.namespace)
    stats = simulate(tmp_path / "ref" / "banks", config, tmp_path / "sim", streams=4, rate_hz=2, seconds=2,
                     roots=[tiny_corpus])
    assert (stats.requests, stats.errors) == (16, 0)
    with open(tmp_path / "sim" / "streams.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {r["machine"] for r in rows} == {"ToyCar", "valve"}
    for r in rows:  # each is one of the machine's test clips, scored exactly as the batch run scored it
        batch = ref.results[r["machine"]].raw_scores
        assert np.min(np.abs(batch - float(r["raw_score"])) / np.abs(batch)) < 1e-6, r
    for machine in ref.results:
        ray_local.kill(ray_local.get_actor(actor_name(machine), namespace=config.fleet.namespace), no_restart=True)


def test_config_k_changes_fleet_scores_as_it_changes_run_scores(ray_local, tiny_corpus, tmp_path, caplog, capsys):
    """`serve-fleet --set bank.k=5` over banks saved with k = 3 scores as `asd-ray run --set bank.k=5` does,
    and says which settings came from the config and which from the saved bank."""
    from asd_ray.cli import main

    namespace = f"t-{uuid.uuid4().hex[:8]}"
    base = ["detector=knn", f"fleet.namespace={namespace}"]
    k3 = reference_run([tiny_corpus], load_config(RunConfig, None, base), tmp_path / "k3")
    k5 = reference_run([tiny_corpus], load_config(RunConfig, None, base + ["bank.k=5"]), tmp_path / "k5")
    caplog.set_level("INFO", logger="asd_ray")
    sets = [a for kv in base + ["bank.k=5", "bank.density=true"] for a in ("--set", kv)]
    assert main(["serve-fleet", "--banks", str(tmp_path / "k3" / "banks"), "--data", str(tiny_corpus),
                 "--out", str(tmp_path / "fleet"), *sets]) == 0
    with open(tmp_path / "fleet" / "streams.csv") as fh:
        rows = {(r["machine"], r["clip"].rsplit("/", 1)[1]): r for r in csv.DictReader(fh)}
    bars = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith(("fleet", "scoring"))]
    assert bars[-1].startswith("scoring") and f"{len(rows)}/{len(rows)}" in bars[-1]  # a bar while it scores
    for machine, res in k5.results.items():
        got = np.array([float(rows[machine, f]["raw_score"]) for f in res.filenames])
        np.testing.assert_allclose(got, res.raw_scores, rtol=1e-6)
        assert not np.allclose(got, k3.results[machine].raw_scores, rtol=1e-3)  # k = 5 did change them
        assert [int(rows[machine, f]["decision"]) for f in res.filenames] == res.decisions.tolist()
        # and the final scores of the run's CSVs: one post-processor on the bank's calibration
        np.testing.assert_allclose([float(rows[machine, f]["score"]) for f in res.filenames], res.scores, rtol=1e-6)
    # the command's own log file: caplog's handler on the root logger missed these lines in some full-suite orders
    log = (tmp_path / "fleet" / "run.log").read_text()
    assert "bank.k=5 (config)" in log and "bank.metric=euclidean (saved bank)" in log
    assert "post.median_window=1 (default)" in log
    assert "not applied: bank.density, detector (fixed when the banks were fitted" in log
    for machine in k5.results:
        ray_local.kill(ray_local.get_actor(actor_name(machine), namespace=namespace), no_restart=True)


def test_a_simulated_fleet_of_clip_banks_queries_their_members_without_clips(fleet, tmp_path):
    """serve-fleet --simulate without --data over clip banks: each machine's queries are its members plus noise."""
    from asd_ray.distributed.streams import simulate

    _, _, namespace, bank_root = fleet
    config = load_config(RunConfig, None, [f"fleet.namespace={namespace}", "detector=knn"])
    stats = simulate(bank_root, config, tmp_path / "sim", streams=2, rate_hz=2, seconds=1)
    assert (stats.requests, stats.errors) == (4, 0)
    with open(tmp_path / "sim" / "streams.csv") as fh:
        assert {r["machine"] for r in csv.DictReader(fh)} <= {"fan", "valve"}
    with pytest.raises(FileNotFoundError, match="bank folder not found"):
        simulate(tmp_path / "no-banks", config, streams=1, rate_hz=1, seconds=1)


def test_banks_started_again_right_after_their_handles_were_dropped(ray_local, tmp_path):
    """A driver that drops its last handles (two fleets started one after the other) and starts the same banks
    again: ``get_if_exists`` may find the actors Ray is ending; they are started anew, not reported as dead."""
    bank = MemoryBank(k=3).fit(np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32),
                               [f"m{j}" for j in range(50)])
    bank.save(tmp_path / "banks" / "fan")
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    for _ in range(8):
        start_banks(tmp_path / "banks", namespace=namespace)  # its handles dropped at once
    actors = start_banks(tmp_path / "banks", namespace=namespace)
    assert ray_local.get(actors["fan"][0].stats.remote())["size"] == 50
    ray_local.kill(actors["fan"][0], no_restart=True)


def test_banks_running_with_other_settings_are_an_error(fleet):
    _, _, namespace, bank_root = fleet
    with pytest.raises(Exception, match="already runs .* with settings \\{\\}.*use another fleet.namespace"):
        start_banks(bank_root, namespace=namespace, settings={"bank.k": 5})


@pytest.mark.parametrize("command", [["serve"], ["serve-fleet", "--clips", "CLIPS", "--machine", "fan"],
                                     ["serve-fleet", "--simulate", "2"]])
def test_a_folder_without_banks_is_an_error_before_ray_starts(command, tmp_path, monkeypatch, capsys):
    """The run's folder given for its banks/ (a fleet over it would serve nothing), one machine's bank folder
    (its domain banks would pass for machines), an empty folder and a missing one: each a one-line error naming
    the folder, and Ray is not started for it."""
    from asd_ray.cli import main
    from asd_ray.distributed import fleet, service, session

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(service, "start_ray", no_ray)
    monkeypatch.setattr(session, "ensure_ray", no_ray)
    monkeypatch.setattr(fleet, "ensure_ray", no_ray)
    bank = MemoryBank(k=3).fit(np.random.default_rng(0).standard_normal((20, DIM)).astype(np.float32),
                               [f"m{j}" for j in range(20)])
    bank.save(tmp_path / "run" / "banks" / "fan")
    (tmp_path / "empty").mkdir()
    (tmp_path / "clips").mkdir()
    args = [str(tmp_path / "clips") if a == "CLIPS" else a for a in command[1:]]
    run, fan = tmp_path / "run", tmp_path / "run" / "banks" / "fan"
    for folder, says in [(run, f"no saved bank in {run}: did you mean {run / 'banks'}?"),
                         (fan, f"{fan} is one machine's bank: give the folder that holds a folder per machine"),
                         (tmp_path / "empty", f"no saved bank in {tmp_path / 'empty'} (asd-ray run saves them"),
                         (tmp_path / "gone", f"bank folder not found: {tmp_path / 'gone'}")]:
        assert main([command[0], "--banks", str(folder), *args]) == 2
        assert says in capsys.readouterr().err
