"""The Starlette app of ``islkeras serve``: both protocols' routes on one ``ServingApp``, request bodies read
within the size limit and the request deadline, every error as a JSON body.

* TF Serving REST: every path outside ``/v2`` goes to ``ServingApp.handle`` (its routes have ``:verb``
  suffixes and TF Serving's own error wording);
* KServe V2: ``/v2/...`` routes to ``islkeras.serving.kserve.KServeV2``.

Bodies: ``Content-Length`` is required on POST (411; chunked bodies too), checked against ``max_body_mb``
before any byte is read (413 -- so a client that sent ``Expect: 100-continue`` never uploads it), and must
arrive by the request's deadline: ``request_timeout_s`` after its first byte (the time the HTTP layer,
``islkeras.serving.http``, puts in ``scope["state"]``; headers count too), else 408. Error replies sent
before the body was read close the connection only where the client cannot be reading on; otherwise the
server discards the rest of the body (still under the deadline) and the connection stays usable.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from islkeras.serving.app import Reply, ServingApp
from islkeras.serving.kserve import KServeV2, decode_body
from islkeras.serving.protocol import HTTPError

T0_KEY = "islkeras.request_t0"  #: scope["state"] key: time.monotonic() of the request's first byte
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
V2_ROUTES = ("/v2, /v2/health/live, /v2/health/ready, /v2/models/<name>[/versions/<v>][/ready|/infer]")


class _Close(HTTPError):
    """An error reply after which the connection is closed (the request body was left unread)."""


def error_reply(e: HTTPError) -> Reply:
    headers = {"Connection": "close"} if isinstance(e, _Close) else None
    return Reply(e.status, "application/json", json.dumps({"error": e.message}).encode(), headers)


async def read_body(request: Request, app: ServingApp) -> bytes:
    """The request body, within ``max_body_mb`` and the request deadline (411/413/408 otherwise)."""
    o, headers = app.options, request.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HTTPError(411, "chunked request bodies are not supported; send a Content-Length")
    raw = headers.get("content-length")
    if raw is None:
        if request.method == "POST":
            raise HTTPError(411, "POST needs a Content-Length header")
        return b""
    n = int(raw)  # h11 has checked it is digits
    if n > o.max_body_bytes:
        msg = (f"request body of {n} bytes exceeds the limit of {o.max_body_bytes} bytes (--max-body-mb "
               f"{o.max_body_mb:g}); send smaller batches, or whole fields to :predict_tiff")
        # the body is discarded as it arrives, so the client reads this reply -- unless it waits for
        # 100-continue (it will never send the body) or the body is huge (not worth receiving)
        expect = "100-continue" in headers.get("expect", "").lower()
        raise (_Close if expect or n > max(4 * o.max_body_bytes, 16 << 20) else HTTPError)(413, msg)
    if n == 0:
        return b""
    t0 = request.scope.get("state", {}).get(T0_KEY, time.monotonic())
    chunks, got = [], 0
    try:
        async with asyncio.timeout_at(t0 + o.request_timeout_s):  # the loop's clock is time.monotonic()
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    raise _Close(400, f"client disconnected after {got} of {n} body bytes")
                chunks.append(msg.get("body", b""))
                got += len(chunks[-1])
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise _Close(408, f"request not received within {o.request_timeout_s:g} s (headers and body; "
                          f"--request-timeout): {got} of {n} body bytes arrived") from None
    return b"".join(chunks)


def _endpoint(handler, app: ServingApp, methods: Optional[tuple] = None):
    """A Starlette endpoint: read the body, check the method, run ``handler(request, body) -> Reply``, and
    turn every error into a JSON reply (a crash into a 500 with its message; the server carries on)."""

    async def endpoint(request: Request) -> Response:
        try:
            body = await read_body(request, app)
            if methods and request.method not in methods:
                raise HTTPError(405, f"{request.method} {request.url.path}: expected {' or '.join(methods)}")
            reply = await handler(request, body)
        except HTTPError as e:
            reply = error_reply(e)
        except Exception as e:  # noqa: BLE001 -- never let a request take the server down
            traceback.print_exc(file=sys.stderr)
            reply = error_reply(HTTPError(500, f"{type(e).__name__}: {e}"))
        return Response(reply.body, reply.status, reply.headers, reply.content_type)

    return endpoint


def build_asgi_app(app: ServingApp) -> Starlette:
    v2 = KServeV2(app)

    def p(request: Request, key: str) -> Optional[str]:
        return request.path_params.get(key)

    async def tf_serving(request: Request, body: bytes) -> Reply:
        query = request.scope.get("query_string", b"").decode("latin-1")
        return await app.handle(request.method, request.url.path + ("?" + query if query else ""), body)

    async def v2_unknown(request: Request, body: bytes) -> Reply:
        raise HTTPError(404, f"no route for {request.method} {request.url.path}; expected {V2_ROUTES} (KServe V2) "
                             "or /v1/models/<name>[/versions/<v>][/metadata|:predict|:predict_tiff] (TF Serving)")

    handlers = [
        ("/v2", ("GET",), lambda r, b: v2.server_metadata()),
        ("/v2/", ("GET",), lambda r, b: v2.server_metadata()),
        ("/v2/health/live", ("GET",), lambda r, b: v2.live()),
        ("/v2/health/ready", ("GET",), lambda r, b: v2.ready()),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        handlers += [
            (base, ("GET",), lambda r, b: v2.model_metadata(p(r, "name"), p(r, "version"))),
            (base + "/ready", ("GET",), lambda r, b: v2.model_ready(p(r, "name"), p(r, "version"))),
            (base + "/infer", ("POST",), lambda r, b: v2.infer(
                p(r, "name"), p(r, "version"),
                decode_body(b, r.headers.get("content-encoding"), app.options.max_body_bytes),
                r.headers.get("inference-header-content-length"))),
        ]
    routes = [Route(path, _endpoint(h, app, m), methods=METHODS) for path, m, h in handlers]
    routes += [Route("/v2/{rest:path}", _endpoint(v2_unknown, app), methods=METHODS),
               Route("/{rest:path}", _endpoint(tf_serving, app), methods=METHODS)]
    return Starlette(routes=routes)

