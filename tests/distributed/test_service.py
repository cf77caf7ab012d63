"""The HTTP scoring service on Ray Serve (`asd-ray serve`): scores equal to the library's, every bad request
answered with its status and reason, the token, /normals persisted across a bank actor restart.

Serve is started once for the module (through the CLI, with `--set` overrides) and shut down after.
"""

import io
import json
import socket
import threading
import time
from collections import Counter
import urllib.error
import urllib.request
import uuid
from types import SimpleNamespace
from urllib.parse import urlencode

import numpy as np
import pytest
import soundfile as sf

from asd_ray.cli import main
from asd_ray.config import RunConfig, load_config
from asd_ray.data.audio import preprocess_clip
from asd_ray.data.layout import discover
from asd_ray.detect import reference_run
from asd_ray.detectors import load_detector
from asd_ray.distributed.bank_actors import actor_name
from asd_ray.distributed.service import stop
from asd_ray.models.backbones import load_backbone
from asd_ray.scoring.postprocess import StreamPostprocessor, calibrate

TOKEN = "s3cret-token"
LIMIT = 200_000  # serve.max_body_bytes here: a 2 s 16 kHz 16-bit clip is 64 kB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_session, tiny_corpus, tmp_path_factory):
    """Banks saved by a k = 3 run of the tiny corpus, served with --set bank.k=4 and a causal median of 3."""
    root = tmp_path_factory.mktemp("serve")
    namespace, port = f"t-{uuid.uuid4().hex[:8]}", _free_port()
    base = ["detector=knn", f"fleet.namespace={namespace}"]
    reference_run([tiny_corpus], load_config(RunConfig, None, base), root / "run")
    sets = base + ["bank.k=4", "post.median_window=3", f"serve.port={port}", f"serve.token={TOKEN}",
                   f"serve.max_body_bytes={LIMIT}", "serve.timeout_s=60", f"serve.app_name=test-{namespace}"]
    assert main(["serve", "--banks", str(root / "run" / "banks"), *[a for kv in sets for a in ("--set", kv)]]) == 0
    test_clips = sorted((r for r in discover([tiny_corpus]) if r.split == "test"), key=lambda r: r.filename)
    config = load_config(RunConfig, None, sets)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", banks=root / "run" / "banks", namespace=namespace,
                          config=config, clips=test_clips)
    assert stop(root / "run" / "banks", config)["banks"] == [actor_name(m) for m in ("ToyCar", "ToyPet", "valve")]


def http(service, method, path, body=None, content_type=None, token=TOKEN, authorization=None, **params):
    """-> (status, decoded JSON answer)."""
    url = service.url + path + ("?" + urlencode(params) if params else "")
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    if token or authorization:
        request.add_header("Authorization", authorization or f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:  # not the service's answer (Serve's own)
            return err.code, {"not_json": body.decode(errors="replace")[:300]}


def _clips(service, machine):
    return [r for r in service.clips if r.machine == machine]


def _embedding(path) -> np.ndarray:
    backbone = load_backbone(backbone="logmel")
    return backbone.embed([preprocess_clip(path).waveform])[0].astype(np.float32)


def test_scores_clips_and_embeddings_like_the_library(service):
    """WAV bodies and float32 bodies of one stream: raw scores equal the saved bank's (with k = 4 from --set),
    scores and decisions equal the same causal post-processing."""
    bank = load_detector(service.banks / "ToyCar").configure(k=4)
    stream = StreamPostprocessor(calibrate(bank.loo_scores(), 0.9), median_window=3)
    clips = _clips(service, "ToyCar")[:6]
    for i, clip in enumerate(clips):
        e = _embedding(clip.path)
        raw = float(bank.score(e[None])[0])
        if i % 2:
            status, got = http(service, "POST", "/score", e.tobytes(), "application/octet-stream", machine="ToyCar",
                               stream="line-1", clip=clip.filename, dim=e.shape[0])
        else:
            with open(clip.path, "rb") as fh:
                status, got = http(service, "POST", "/score", fh.read(), "audio/wav", machine="ToyCar",
                                   stream="line-1", clip=clip.filename)
        assert status == 200, got
        score, decision = stream.push(raw)
        assert got["raw_score"] == pytest.approx(raw, rel=1e-6)
        assert got["score"] == pytest.approx(score, rel=1e-6) and got["decision"] == decision
        assert got["threshold"] == pytest.approx(stream.threshold) and got["clip"] == clip.filename
        assert got["bank_version"] and got["machine"] == "ToyCar" and got["stream"] == "line-1"
    status, machines = http(service, "GET", "/machines")
    assert status == 200 and machines["machines"]["ToyCar"]["settings"]["bank.k"] == {"value": 4, "from": "config"}
    assert machines["machines"]["ToyCar"]["settings"]["bank.metric"] == {"value": "euclidean", "from": "saved bank"}


def test_a_two_channel_request_is_pre_processed_as_the_banks_clips_were(service):
    """A request carries a near/far pair as one two-channel body: the service cancels the far channel as the run
    that saved the banks did (``preprocess.channels=auto``, recorded beside each bank)."""
    assert json.loads((service.banks / "ToyCar" / "preprocess.json").read_text())["channels"] == "auto"
    bank = load_detector(service.banks / "ToyCar").configure(k=4)
    near, rate = sf.read(str(_clips(service, "ToyCar")[0].path), dtype="float32")
    far = 0.2 * np.roll(near, 11) + 0.05 * np.random.default_rng(3).standard_normal(len(near)).astype(np.float32)
    body = io.BytesIO()
    sf.write(body, np.stack([near, far], axis=1), rate, format="WAV", subtype="PCM_16")  # 128 kB: under LIMIT
    backbone = load_backbone(backbone="logmel")
    clip = preprocess_clip(body.getvalue())
    assert "cancelled:far" in clip.flags
    expected = float(bank.score(backbone.embed([clip.waveform])[0].astype(np.float32)[None])[0])
    mono = float(bank.score(_embedding(_clips(service, "ToyCar")[0].path)[None])[0])
    assert abs(expected - mono) > 1e-3  # the far channel matters: a service that dropped it would be caught
    status, got = http(service, "POST", "/score", body.getvalue(), "audio/wav", machine="ToyCar", stream="stereo-1")
    assert status == 200, got
    assert got["raw_score"] == pytest.approx(expected, rel=1e-6)


def _wav(samples, rate=16_000) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _flac_of_silence(seconds: int) -> bytes:
    out = io.BytesIO()
    with sf.SoundFile(out, "w", samplerate=16_000, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(np.zeros(16_000, np.int16))
    return out.getvalue()


def test_every_bad_request_gets_its_status_and_reason(service):
    e = np.ones(256, np.float32)
    tone = 0.1 * np.sin(np.arange(32_000) / 5.0)
    long_flac = _flac_of_silence(61)  # a few kB: far under serve.max_body_bytes, over serve.max_audio_seconds
    assert len(long_flac) < LIMIT // 10
    cases = [
        (dict(machine="pump", stream="s"), e.tobytes(), "application/octet-stream", 404, "no bank for machine 'pump'"),
        (dict(stream="s"), e.tobytes(), "application/octet-stream", 400, "missing query parameter 'machine'"),
        (dict(machine="ToyCar"), e.tobytes(), "application/octet-stream", 400, "missing query parameter 'stream'"),
        (dict(machine="ToyCar", stream="s"), b"", "audio/wav", 400, "empty body"),
        (dict(machine="ToyCar", stream="s"), b"RIFF....WAVEjunk", "audio/wav", 422,
         "audio body: cannot decode: Error in WAV file. No 'data' chunk marker."),
        (dict(machine="ToyCar", stream="s"), long_flac, "audio/flac", 422,
         "more than the decode limit of 60 s (960000 frames at 16000 Hz x 1 channels): its header says 976000"),
        (dict(machine="ToyCar", stream="s"), _wav(np.zeros(0)), "audio/wav", 422, "empty: no samples"),
        (dict(machine="ToyCar", stream="s"), _wav(tone[:4000]), "audio/wav", 422, "too short"),
        (dict(machine="ToyCar", stream="s", dim=10), e[:10].tobytes(), "application/octet-stream", 422,
         "dim=10: the ToyCar bank takes rows of 256 float32 values"),
        (dict(machine="ToyCar", stream="s", dim=1), e.tobytes(), "application/octet-stream", 422,
         "dim=1: the ToyCar bank takes rows of 256 float32 values"),
        (dict(machine="ToyCar", stream="s", dim=256), np.full(256, np.nan, np.float32).tobytes(),
         "application/octet-stream", 422, "finite: False"),
        (dict(machine="ToyCar", stream="s", dim=256), e.tobytes()[:-2], "application/octet-stream", 422,
         "not a whole number of float32 rows"),
        (dict(machine="ToyCar", stream="s"), e.tobytes(), "application/octet-stream", 400, "needs the query parameter 'dim'"),
        (dict(machine="ToyCar", stream="s", dim="x"), e.tobytes(), "application/octet-stream", 400, "dim='x'"),
        (dict(machine="ToyCar", stream="s"), b"x" * (LIMIT + 1), "audio/wav", 413, "over the limit"),
        (dict(machine="ToyCar", stream="s"), b"{}", "application/json", 415, "Content-Type application/json"),
    ]
    pid = http(service, "GET", "/healthz")[1]["replica_pid"]
    for params, body, kind, status, reason in cases:
        got_status, got = http(service, "POST", "/score", body, kind, **params)
        assert (got_status, reason in got.get("error", "")) == (status, True), (params, kind, got_status, got)
    assert http(service, "GET", "/nowhere")[0] == 404
    assert http(service, "GET", "/score")[0] == 405
    assert http(service, "POST", "/normals", e.tobytes(), "application/octet-stream", machine="ToyCar", dim=256)[1] \
        == {"error": "missing query parameter 'clip'"}
    status, got = http(service, "POST", "/normals", e[:10].tobytes(), "application/octet-stream", machine="ToyCar",
                       clip="c", dim=10)
    assert status == 422 and "dim=10: the ToyCar bank takes rows of 256" in got["error"], got
    status, got = http(service, "POST", "/normals", b"RIFF....WAVEjunk", "audio/wav", machine="ToyCar", clip="c")
    assert status == 422 and "cannot decode" in got["error"] and "object at 0x" not in got["error"], got
    status, got = http(service, "POST", "/normals", long_flac, "audio/flac", machine="ToyCar", clip="c")
    assert status == 422 and "more than the decode limit of 60 s" in got["error"], got
    status, health = http(service, "GET", "/healthz")
    assert status == 200 and health["replica_pid"] == pid  # the same replica answered all of them
    assert health["banks"] == {"ToyCar": "ok", "ToyPet": "ok", "valve": "ok"}
    assert health["by_status"]["/score 413"] >= 1 and health["errors"] >= len(cases)


def test_the_token_is_checked_on_every_request(service):
    for method, path in (("GET", "/healthz"), ("GET", "/machines"), ("POST", "/score"), ("GET", "/nowhere")):
        assert http(service, method, path, token=None) == (401, {"error": "missing bearer token (Authorization: "
                                                                          "Bearer <token>)"})
        assert http(service, method, path, token="wrong") == (401, {"error": "wrong bearer token"})
    assert http(service, "GET", "/healthz")[0] == 200
    for scheme in ("bearer", "BEARER", "Bearer  "):  # RFC 7235: the scheme is case-insensitive
        assert http(service, "GET", "/healthz", token=None, authorization=f"{scheme} {TOKEN}")[0] == 200, scheme
    assert http(service, "GET", "/healthz", token=None, authorization=f"Basic {TOKEN}")[0] == 401


def test_normals_persist_and_survive_a_bank_actor_restart(service, ray_session):
    """A target normal posted to /normals is in the bank (on disk before the reply), once only, and still
    there after the bank actor is killed and restarted."""
    clips = _clips(service, "valve")
    extra, probe = clips[0], clips[1]
    with open(extra.path, "rb") as fh:
        wav = fh.read()
    before = load_detector(service.banks / "valve")
    status, added = http(service, "POST", "/normals", wav, "audio/wav", machine="valve", clip="extra-1")
    assert status == 200 and added["added"] is True and added["size"] == before.size + 1, added
    on_disk = load_detector(service.banks / "valve")
    assert on_disk.size == before.size + 1 and on_disk.ids[-1] == "extra-1"
    assert http(service, "POST", "/normals", wav, "audio/wav", machine="valve", clip="extra-1")[1]["added"] is False
    assert load_detector(service.banks / "valve").size == before.size + 1  # idempotent by clip id

    expected = float(on_disk.configure(k=4).score(_embedding(probe.path)[None])[0])
    e = _embedding(probe.path)
    params = dict(machine="valve", stream="after-add", dim=e.shape[0])
    status, got = http(service, "POST", "/score", e.tobytes(), "application/octet-stream", **params)
    assert status == 200 and got["raw_score"] == pytest.approx(expected, rel=1e-6)
    assert got["bank_version"] == added["bank_version"]

    actor = ray_session.get_actor(actor_name("valve"), namespace=service.namespace)
    pid = ray_session.get(actor.stats.remote())["pid"]
    ray_session.kill(actor, no_restart=False)
    # ray.kill is asynchronous: the old process can still answer a call or two; wait for its successor
    deadline, stats = time.time() + 120, {"pid": pid}
    while stats["pid"] == pid and time.time() < deadline:
        try:
            stats = ray_session.get(actor.stats.remote(), timeout=30)
        except Exception:  # dying or restarting
            time.sleep(0.2)
    assert stats["pid"] != pid, "the bank actor was not restarted"
    status, got = http(service, "POST", "/score", e.tobytes(), "application/octet-stream", **params)
    assert status == 200 and got["raw_score"] == pytest.approx(expected, rel=1e-6)  # reloaded from disk
    assert stats["size"] == before.size + 1 and stats["version"] == added["bank_version"]


def test_counters_reach_rays_prometheus_endpoint(service, ray_session):
    """The replica's request counters and latencies, exported by Ray (names prefixed ray_) within seconds."""
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_asd_ray_requests_total", "ray_asd_ray_request_errors_total", "ray_asd_ray_request_seconds_bucket")
    deadline, found = time.time() + 60, set()
    while time.time() < deadline and len(found) < len(wanted):
        http(service, "GET", "/healthz")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        found = {name for name in wanted for line in text.splitlines()
                 if line.startswith(name + "{") and 'route="/score"' in line}
        time.sleep(2)
    assert found == set(wanted)


def test_a_bank_actor_and_the_replica_killed_under_load_lose_no_request(service, ray_session):
    """Requests from 6 client threads while the ToyCar bank actor is killed (Ray restarts it) and then the
    replica (Serve starts another). No request is lost: each ends with its score, equal to the library's. On
    the way a request may be answered 503 with the service's reason (a bank that failed or did not answer in
    time), or Serve's own plain 500 when its replica died with the request in flight (Serve's proxy does not
    re-send it); the client re-sends both, up to 10 times, and both are counted. Nothing else comes back (no
    500 of the service, no other status)."""
    from ray.serve._private.constants import SERVE_NAMESPACE  # where Serve names its replica actors

    bank = load_detector(service.banks / "ToyCar").configure(k=4)
    queries = np.stack([_embedding(c.path) for c in _clips(service, "ToyCar")[:8]])
    expected = bank.score(queries)
    answers, per_thread = [], 30
    resent: Counter = Counter()

    def client(i: int) -> None:
        for j in range(per_thread):
            q = (i + j) % len(queries)
            for attempt in range(10):
                try:
                    status, got = http(service, "POST", "/score", queries[q].tobytes(), "application/octet-stream",
                                       machine="ToyCar", stream=f"load-{i}", dim=queries.shape[1])
                except OSError as err:  # no answer at all
                    status, got = None, {"error": f"{type(err).__name__}: {err}"}
                if status == 503:
                    resent[f"503: {got.get('error', 'NO REASON')[:60]}"] += 1
                elif status == 500 and "not_json" in got:
                    resent["Serve's 500: its replica died with the request"] += 1
                else:
                    break
                time.sleep(0.2)
            answers.append((q, status, got, attempt))

    bank_actor = ray_session.get_actor(actor_name("ToyCar"), namespace=service.namespace)
    bank_pid = ray_session.get(bank_actor.stats.remote())["pid"]
    replica = http(service, "GET", "/healthz")[1]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for kill, after in ((lambda: ray_session.kill(bank_actor, no_restart=False), 30),
                        (lambda: ray_session.kill(ray_session.get_actor(replica["replica"], namespace=SERVE_NAMESPACE),
                                                  no_restart=False), 90)):
        deadline = time.time() + 120
        while len(answers) < after and time.time() < deadline:
            time.sleep(0.01)
        assert len(answers) >= after, answers[-3:]
        kill()
    for t in threads:
        t.join(timeout=300)

    assert len(answers) == 6 * per_thread
    lost = [a for a in answers if a[1] != 200]
    assert not lost, (resent, lost[:5])  # every request ended with a score
    assert not any("NO REASON" in kind for kind in resent), resent  # a 503 says why
    for q, _, got, _ in answers:
        assert got["raw_score"] == pytest.approx(float(expected[q]), rel=1e-6)
    assert ray_session.get(bank_actor.stats.remote())["pid"] != bank_pid  # the kills happened
    assert http(service, "GET", "/healthz")[1]["replica_pid"] != replica["replica_pid"]
    print(f"bank actor and replica killed under load: {len(answers)} requests, all answered with a score; "
          f"re-sent: {dict(resent) or 'none'}")


def _chunked_upload(url: str, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int | None, int]:
    """POST a chunked body of up to ``total`` bytes, stopping as soon as the server answers or closes.
    -> (the status answered, or None; bytes of body sent)."""
    import select
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    sent, piece, answer = 0, f"{chunk:x}\r\n".encode() + b"\0" * chunk + b"\r\n", b""
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(65536)
    except OSError:  # reset by a server that stopped reading
        pass
    finally:
        sock.close()
    return (int(answer.split()[1]) if answer.startswith(b"HTTP/") else None), sent


@pytest.mark.slow
def test_own_ray_bodies_cut_at_the_limit_and_a_restarted_replica_keeps_its_port(tmp_path):
    """`asd-ray serve` starting its own Ray (direct ingress on), in a subprocess stopped with SIGTERM at the end.
    - A chunked body far over serve.max_body_bytes is answered 413 once the limit is passed, through Serve's
      proxy and on the replica's direct port alike, and no more of it is read than the socket buffers hold
      (the proxy read all of it before: 64 MiB here, 200 MiB in the issue).
    - The replica's printed direct address is the address of its successor after the replica process is
      killed (Serve moved it to the next port before: clients of the old one were refused)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from asd_ray.bank.memory_bank import MemoryBank

    rng = np.random.default_rng(0)
    MemoryBank(k=3).fit(rng.standard_normal((50, 16)).astype(np.float32), [f"m{i}" for i in range(50)]).save(
        tmp_path / "banks" / "fan")
    port, namespace = _free_port(), f"d-{uuid.uuid4().hex[:8]}"
    from tiny import command_env

    env = command_env()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", "import sys; from asd_ray.cli import main; sys.exit(main())", "serve",
         "--banks", str(tmp_path / "banks"), "--port", str(port), "--set", f"fleet.namespace={namespace}",
         "--set", "ray.num_cpus=2", "--set", f"serve.token={TOKEN}", "--set", f"serve.max_body_bytes={LIMIT}",
         "--out", str(tmp_path / "serve")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline, direct = time.time() + 300, None
        while direct is None and time.time() < deadline and proc.poll() is None:
            found = [re.search(r"replicas answer directly .* at (http://\S+)", line) for line in list(lines)]
            direct = next((m.group(1) for m in found if m), None)
            time.sleep(1)
        assert direct, "".join(lines[-30:])
        at = SimpleNamespace(url=direct)
        q = np.ones(16, np.float32).tobytes()
        assert http(at, "POST", "/score", q, "application/octet-stream", machine="fan", stream="s", dim=16)[0] == 200

        total = 64 * 2**20
        for url in (f"http://127.0.0.1:{port}", direct):
            status, sent = _chunked_upload(url, "/score?machine=fan&stream=s", total)
            print(f"chunked body to {url}: {sent} bytes sent, answered {status}")
            assert sent < 16 * 2**20 and status in (413, None), (url, sent, status)
            declared = http(SimpleNamespace(url=url), "POST", "/score", b"x" * (LIMIT + 1), "audio/wav",
                            machine="fan", stream="s")
            assert declared[0] == 413 and "over the limit" in declared[1]["error"], declared
            assert http(SimpleNamespace(url=url), "POST", "/score", q, "application/octet-stream", machine="fan",
                        stream="s", dim=16)[0] == 200  # and the servers go on

        pid = http(at, "GET", "/healthz")[1]["replica_pid"]
        os.kill(pid, signal.SIGKILL)
        deadline, health = time.time() + 180, None
        while time.time() < deadline:
            try:
                status, health = http(at, "GET", "/healthz")
                if status == 200 and health["replica_pid"] != pid:
                    break
            except OSError:  # refused until the successor binds the port
                pass
            time.sleep(1)
        assert health and health["replica_pid"] != pid, (health, "".join(lines[-30:]))
        assert http(at, "POST", "/score", q, "application/octet-stream", machine="fan", stream="s", dim=16)[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    # a quiet console: Serve's and Ray's log lines in serve.log, a line when it stops (they flooded the console)
    reader.join(timeout=30)
    console = "".join(lines)
    assert f"scoring service 'asd-ray' stopped: Serve shut down" in console, console[-2000:]
    # the driver's own Serve lines ("INFO ... serve <pid> -- Started Serve ..."); a worker's batch that reports an
    # error (the replica killed above) still reaches the console, as every command shows one
    assert not re.search(r"^(\x1b\[\d+m)?INFO\b", console, flags=re.M), console[-3000:]
    assert "Started Serve" in (tmp_path / "serve" / "serve.log").read_text()
