"""The service's request checks without Ray: the bearer scheme in any case, writes refused without a token
unless allowed on a loopback host (and the CLI refusing the flag elsewhere before Ray starts), dim against
the bank."""

import numpy as np
import pytest

from asd_ray.bank.memory_bank import MemoryBank
from asd_ray.cli import main
from asd_ray.distributed.http_requests import Access, HttpError, check_write_access, embedding


def _status(access: Access, method: str, path: str, authorization: str = "") -> int:
    try:
        access.check(method, path, authorization)
    except HttpError as err:
        return err.status
    return 200


def test_the_bearer_scheme_is_case_insensitive():
    access = Access("tok")
    assert [_status(access, "GET", "/healthz", f"{scheme} tok") for scheme in ("Bearer", "bearer", "BEARER")] \
        == [200, 200, 200]
    assert _status(access, "GET", "/healthz", "Bearer  tok ") == 200
    assert [_status(access, "GET", "/healthz", a) for a in ("", "Bearer", "Basic tok", "Bearer other", "tok")] \
        == [401] * 5


def test_writes_need_a_token_unless_unauthenticated_writes_are_allowed():
    closed, open_ = Access(""), Access("", allow_unauthenticated_writes=True)
    with pytest.raises(HttpError, match=r"POST /normals writes to the banks: .*serve.token.*"
                                        r"--allow-unauthenticated-writes on a loopback host") as info:
        closed.check("POST", "/normals", "")
    assert info.value.status == 403
    assert _status(closed, "POST", "/score") == 200 and _status(closed, "GET", "/machines") == 200
    assert _status(open_, "POST", "/normals") == 200
    assert _status(Access("tok"), "POST", "/normals", "Bearer tok") == 200
    assert _status(Access("tok", allow_unauthenticated_writes=True), "POST", "/normals") == 401


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_unauthenticated_writes_are_allowed_on_loopback(host):
    check_write_access("", True, host)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_unauthenticated_writes_are_refused_elsewhere(host):
    with pytest.raises(ValueError, match="for a loopback host"):
        check_write_access("", True, host)
    check_write_access("tok", True, host)  # a token covers the writes
    check_write_access("", False, host)  # no writes at all without a token


def test_serve_refuses_unauthenticated_writes_on_a_public_host_before_ray_starts(tmp_path, capsys):
    MemoryBank(k=3).fit(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"]).save(tmp_path / "fan")
    code = main(["serve", "--banks", str(tmp_path), "--host", "0.0.0.0", "--allow-unauthenticated-writes"])
    err = capsys.readouterr().err
    assert code == 2 and "for a loopback host (127.0.0.1) only; serve.host is '0.0.0.0'" in err, err


def test_dim_must_be_the_banks():
    body = np.ones(256, np.float32).tobytes()
    assert embedding(body, "256", 256, "fan").shape == (1, 256)
    for dim in ("1", "128"):
        with pytest.raises(HttpError, match=f"dim={dim}: the fan bank takes rows of 256") as info:
            embedding(body, dim, 256, "fan")
        assert info.value.status == 422


def test_body_limit_stops_reading_at_the_limit_and_answers_413():
    """BodyLimit (Serve's proxy and direct-ingress servers): a chunked body is read no further than the first
    chunk past the limit, the application sees a disconnect, the client gets 413; a declared length over the
    limit is answered before any body is read; a body within it passes through whole."""
    import asyncio

    from asd_ray.distributed.http_requests import BodyLimit

    async def run(headers, chunks: int):
        pulled, sent, seen = [0], [], []

        async def receive():
            pulled[0] += 1
            return {"type": "http.request", "body": b"x" * 1000, "more_body": pulled[0] < chunks}

        async def send(message):
            sent.append(message)

        async def app(scope, receive, send):
            while True:
                message = await receive()
                seen.append(message["type"])
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200 if seen[-1] != "http.disconnect" else 499})
            await send({"type": "http.response.body", "body": b"ok"})

        await BodyLimit(app, limit=5000)({"type": "http", "headers": headers}, receive, send)
        return pulled[0], [m.get("status") for m in sent if m["type"] == "http.response.start"], seen

    pulled, statuses, seen = asyncio.run(run([], chunks=10_000))
    assert (pulled, statuses, seen[-1]) == (6, [413], "http.disconnect")
    assert asyncio.run(run([(b"content-length", b"9000")], chunks=9))[:2] == (0, [413])
    assert asyncio.run(run([], chunks=5))[:2] == (5, [200])
