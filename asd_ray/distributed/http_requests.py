"""What the HTTP scoring service (``service.py``) reads off a request before the router sees it: who may
call (the bearer token; writes without one), the query parameters, and the body (bounded, decoded to an
embedding when it is one). Every refusal is an ``HttpError`` with its status and a reason that names the
parameter or the body, never a Python object."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os

import numpy as np

EMBEDDING_TYPE = "application/octet-stream"
BODY_LIMIT_ENV = "ASD_RAY_MAX_BODY_BYTES"  # the limit of BodyLimit in Serve's HTTP servers (body_limit_env)
WRITE_ROUTES = {("POST", "/normals")}  # routes that change a bank


class HttpError(Exception):
    """A request answered with ``status`` and ``{"error": reason}``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def is_loopback(host: str) -> bool:
    """True for 127.x, ::1 and ``localhost``: addresses only this machine's processes reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def check_write_access(token: str, allow_unauthenticated_writes: bool, host: str) -> None:
    """Refuse (ValueError naming the settings) unauthenticated writes on an address other machines can reach."""
    if allow_unauthenticated_writes and not token and not is_loopback(host):
        raise ValueError(f"serve.allow_unauthenticated_writes (--allow-unauthenticated-writes) is for a loopback "
                         f"host (127.0.0.1) only; serve.host is {host!r}: set serve.token instead")


class Access:
    """The bearer token (``Authorization: Bearer <token>``; the scheme in any case, RFC 7235), checked on every
    request when set. Without one, routes that write to a bank are refused unless unauthenticated writes
    were allowed (on a loopback host only: ``check_write_access``)."""

    def __init__(self, token: str, allow_unauthenticated_writes: bool = False):
        self.token, self.allow_writes = token, allow_unauthenticated_writes

    def check(self, method: str, path: str, authorization: str) -> None:
        if not self.token:
            if (method, path) in WRITE_ROUTES and not self.allow_writes:
                raise HttpError(403, f"{method} {path} writes to the banks: the service needs a token for it "
                                     f"(serve.token), or --allow-unauthenticated-writes on a loopback host")
            return
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise HttpError(401, "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            raise HttpError(401, "wrong bearer token")


def param(request, name: str, default: str | None = None) -> str:
    value = request.query_params.get(name, default)
    if not value:
        raise HttpError(400, f"missing query parameter {name!r}")
    return value


def content_kind(request) -> str:
    """The body's media type: ``EMBEDDING_TYPE`` or ``audio/*``; anything else is refused (415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != EMBEDDING_TYPE and not kind.startswith("audio/"):
        raise HttpError(415, f"Content-Type {kind or 'missing'}: send a sound file (audio/wav, audio/flac) or "
                             f"a float32 embedding ({EMBEDDING_TYPE} with ?dim=N)")
    return kind


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as more than ``limit`` bytes have come (a declared
    Content-Length over it before any), or when empty (400)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HttpError(413, f"a body of {length} bytes is over the limit of {limit} (serve.max_body_bytes)")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"a body of more than {limit} bytes is over the limit (serve.max_body_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went, or BodyLimit cut the body (and answers 413 itself)
        raise HttpError(400, f"the body ended after {size} bytes: the connection closed") from None
    if not size:
        raise HttpError(400, "empty body: send a sound file (audio/wav) or a float32 embedding "
                             f"({EMBEDDING_TYPE} with ?dim=N)")
    return b"".join(chunks)


def embedding(body: bytes, dim: str | None, bank_dim: int, machine: str) -> np.ndarray:
    """A binary body of little-endian float32 values -> (rows x dim) array; ``dim`` (the query parameter)
    must be the bank's own (its clip embeddings' size, or its frames' n_mels)."""
    if dim is None:
        raise HttpError(400, f"an {EMBEDDING_TYPE} body needs the query parameter 'dim' (float32 values per row)")
    if not dim.isdigit() or int(dim) < 1:
        raise HttpError(400, f"dim={dim!r}: a positive whole number of float32 values per row")
    if int(dim) != bank_dim:
        raise HttpError(422, f"dim={dim}: the {machine} bank takes rows of {bank_dim} float32 values "
                             f"(GET /machines gives each bank's dim)")
    row = 4 * int(dim)
    if len(body) % row:
        raise HttpError(422, f"a body of {len(body)} bytes is not a whole number of float32 rows of dim {dim} "
                             f"({row} bytes each)")
    return np.frombuffer(body, dtype="<f4").reshape(-1, int(dim))


def _over_limit(limit: int, size: str) -> list[dict]:
    body = json.dumps({"error": f"a body of {size} bytes is over the limit of {limit} (serve.max_body_bytes)"})
    return [{"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body.encode()}]


class BodyLimit:
    """ASGI middleware for Serve's own HTTP servers (its proxy, and each replica's under direct ingress): a body
    declared or found to be over ``limit`` bytes is answered 413 as soon as the limit is passed; no more of it
    is read, and the application behind sees the client as gone (http.disconnect). Without it Serve's proxy
    reads a chunked body whole into its queue, whatever the replica answers (200 MiB seen), and hands it on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            for message in _over_limit(self.limit, length.decode()):
                await send(message)
            return
        state = {"size": 0, "over": False, "started": False}

        async def limited_receive() -> dict:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                if state["size"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"] and not state["started"]:
                return  # the answer to a body cut short: the 413 goes instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if state["over"] and not state["started"]:
            for message in _over_limit(self.limit, f"more than {self.limit}"):
                await send(message)


def body_limit_env(max_body_bytes: int) -> None:
    """``BodyLimit`` in Serve's HTTP servers of a Ray started after this call: Serve calls the function named
    by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH in each proxy and direct-ingress replica for their middlewares;
    the limit travels in ASD_RAY_MAX_BODY_BYTES. A local Ray takes both from its driver's environment (on a
    cluster: set them for ``ray start``)."""
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = f"{__name__}.serve_middlewares"
    os.environ[BODY_LIMIT_ENV] = str(max_body_bytes)


def serve_middlewares() -> list:
    """The middlewares of Serve's HTTP servers (see ``body_limit_env``)."""
    from starlette.middleware import Middleware

    limit = int(os.environ.get(BODY_LIMIT_ENV) or 0)
    return [Middleware(BodyLimit, limit=limit)] if limit > 0 else []
