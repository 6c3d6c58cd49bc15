"""``islkeras serve``'s HTTP server: uvicorn (asyncio, h11) running the Starlette app of
``islkeras.serving.asgi``, ``make_server`` and the ``serve`` command.

uvicorn parses HTTP and keeps idle keep-alive connections cheap (no thread per connection); this module adds
what it leaves out, in a small subclass of its h11 protocol (``ServingProtocol``):

* a **whole-request deadline**: from a request's first byte, its headers and body must arrive within
  ``request_timeout_s`` (else 408 and the connection is closed) -- a client trickling a byte at a time
  cannot hold a connection, however regular its bytes (a per-read timeout never fires on it); a
  connection that sends nothing is closed after ``idle_timeout_s``;
* a **connection cap**: beyond ``max_connections`` a new connection gets a 503 and is closed at once;
* **JSON errors** for HTTP uvicorn itself rejects (a bad request line or header: 400 ``{"error": ...}``).

The deadline is one timer per connection (``loop.call_later``); its start goes to the app in
``scope["state"]`` so the body read (``asgi.read_body``) ends at the same moment.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Optional, Union

import click
import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from islkeras.serving.app import ServeOptions, ServingApp
from islkeras.serving.asgi import T0_KEY, build_asgi_app
from islkeras.serving.protocol import HTTPError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  #: the client's h11 states once its request is in


class ServingProtocol(H11Protocol):
    """uvicorn's h11 protocol plus the request deadline, the connection cap and JSON protocol errors."""

    options: ServeOptions = ServeOptions()  #: set per server (a subclass per ``ServingServer``)

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.app_state = dict(app_state)  # per connection: carries the request's start to the app
        self._timer = None
        self._active = False  #: a request is being received (else the connection is idle)

    # ---- the deadline timer
    def _arm(self, seconds: float, active: bool) -> None:
        self._cancel()
        self._active = active
        self._timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._active:  # idle: nothing of a request arrived
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
            return  # the app is reading this body with the same deadline and answers the 408 itself
        self.refuse(408, f"request not received within {self.options.request_timeout_s:g} s (headers and body; "
                         "--request-timeout)")

    def refuse(self, status: int, message: str) -> None:
        """Write a JSON error reply and close the connection (outside h11's bookkeeping: it ends here)."""
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self._cancel()
        self.transport.write(head + body)
        self.transport.close()

    # ---- asyncio.Protocol
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.options.max_connections:
            self.refuse(503, f"server busy: {self.options.max_connections} connections open (--max-connections); "
                             "retry later")
            return
        self._arm(self.options.idle_timeout_s, active=False)

    def data_received(self, data: bytes) -> None:
        if not self._active:  # the first bytes of a request: its deadline starts now
            now = time.monotonic()
            self.app_state[T0_KEY] = now
            self._arm(self.options.request_timeout_s, active=True)
        before = self.conn.their_state
        super().data_received(data)
        after = self.conn.their_state
        if after in _RECEIVED:  # the whole request is in: the app owns the rest
            self._cancel()
            self._active = False
        elif before is h11.SEND_BODY and after is h11.IDLE:  # the end of a body discarded after an early reply
            self._arm(self.options.idle_timeout_s, active=False)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # keep-alive: uvicorn's idle timer watches the connection now
            self._cancel()
            self._active = False

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this inside ``except h11.RemoteProtocolError``: say what h11 found, as JSON."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        detail = re.sub(r"bytearray\((b['\"].*?['\"])\)", r"\1", str(exc)) if exc else msg
        self.refuse(status if 400 <= status < 600 else 400,
                    f"Bad request: {detail} (expected HTTP/1.1: a request line 'METHOD /path HTTP/1.1', headers "
                    "with Host and Content-Length, then the body)")


# ------------------------------------------------------------------------------------------------ server
class ServingServer:
    """A bound server (models preloaded): ``serve_forever()`` runs uvicorn in the calling thread,
    ``shutdown()`` (from another thread) stops it, ``server_close()`` releases the socket."""

    def __init__(self, app: ServingApp, host: str, port: int):
        import uvicorn

        self.app = app
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(1024)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        o = app.options
        protocol = type("ServingProtocol", (ServingProtocol,), {"options": o})
        config = uvicorn.Config(build_asgi_app(app), http=protocol, loop="asyncio", lifespan="off", log_config=None,
                                access_log=o.access_log, timeout_keep_alive=o.idle_timeout_s, server_header=False,
                                proxy_headers=False, timeout_graceful_shutdown=5, backlog=1024)
        if o.access_log:
            import logging

            log = logging.getLogger("uvicorn.access")
            log.addHandler(logging.StreamHandler(sys.stderr))
            log.setLevel(logging.INFO)
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:  # poll_interval: http.server's signature
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(base: Union[str, Path], host: str = "127.0.0.1", port: int = 8501,
                options: Optional[ServeOptions] = None, **kwargs) -> ServingServer:
    """A ready (bound, models preloaded) server; run it with ``serve_forever()``, stop with ``shutdown()``.

    ``port=0`` picks a free port (see ``server.server_address``). Keyword arguments override ``options``.
    """
    options = options or ServeOptions()
    for k, v in kwargs.items():
        if not hasattr(options, k):
            raise TypeError(f"make_server: unknown option {k!r}")
        setattr(options, k, v)
    app = ServingApp(base, options)
    app.repo.preload(options.preload)
    return ServingServer(app, host, port)


# ------------------------------------------------------------------------------------------------ CLI
@click.command("serve")
@click.argument("model_base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; loopback by default. 0.0.0.0 opens it to the network (no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True, help="TCP port (0 = any free).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=2, show_default=True,
              help="Model calls running at once.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a model slot; more get 503.")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="Connections open at once; more get 503.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Request body limit in MiB; larger bodies get 413.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a request's headers and body may take to arrive; slower ones get 408.")
@click.option("--preload", type=click.Choice(["latest", "all", "none"]), default="latest", show_default=True,
              help="Versions loaded at start (others load on their first request).")
@click.option("--tile", type=click.IntRange(min=32), default=None, help=":predict_tiff tile size [default: predict's].")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help=":predict_tiff tile overlap [default: predict's].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help=":predict_tiff tiles per model call.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def serve_command(model_base: Path, host: str, port: int, max_concurrent: int, max_queue: int, max_connections: int,
                  max_body_mb: float, request_timeout: float, preload: str, tile, overlap, batch, access_log: bool):
    """Serve the models of MODEL_BASE (MODEL_BASE/<name>/<version>/) over the TF Serving REST API and the
    Open Inference Protocol (KServe V2: Triton's and KServe's clients, tritonclient).

    \b
    TF Serving REST:
      GET  /v1/models/<name>[/versions/<v>]             version status
      GET  /v1/models/<name>[/versions/<v>]/metadata    signatures + islkeras metadata
      POST /v1/models/<name>[/versions/<v>]:predict     {"instances": ...} or {"inputs": ...}
      POST /v1/models/<name>[/versions/<v>]:predict_tiff  TIFF bytes in, float32 TIFF out
    KServe V2:
      GET  /v2/health/live, /v2/health/ready
      GET  /v2/models/<name>[/versions/<v>][/ready]     metadata (inputs, outputs), readiness
      POST /v2/models/<name>[/versions/<v>]/infer       JSON or binary tensors

    \b
    Examples:
      islkeras serve models/
      curl http://127.0.0.1:8501/v1/models/nuclei
      curl --data-binary @field.tif -o pred.tif http://127.0.0.1:8501/v1/models/nuclei:predict_tiff
      curl http://127.0.0.1:8501/v2/models/nuclei
    """
    from islkeras.errors import UserError
    from islkeras.utils import keep_large_buffers

    keep_large_buffers()  # MB-sized JSON/TIFF buffers from the heap, not fresh pages each request
    options = ServeOptions(max_concurrent=max_concurrent, max_queue=max_queue, max_connections=max_connections,
                           max_body_mb=max_body_mb, request_timeout_s=request_timeout, preload=preload,
                           access_log=access_log, tile=tile, overlap=overlap, batch=batch)
    t0 = time.monotonic()
    try:
        server = make_server(model_base, host, port, options)
    except HTTPError as e:
        raise UserError(e.message) from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    repo = server.app.repo
    if not repo.names():
        click.echo(f"warning: no models under {repo.base} yet (expected <name>/<version>/saved_model.pb); "
                   "new exports are picked up while serving", err=True)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: reachable from other machines, without authentication", err=True)
    for name in repo.names():
        vs = repo.versions(name)
        click.echo(f"model {name}: versions {', '.join(map(str, sorted(vs)))} (newest {max(vs)} serves by default)",
                   err=True)
    click.echo(f"serving {repo.base} on {server.url} (ready in {time.monotonic() - t0:.1f} s; TF Serving REST "
               "/v1, KServe V2 /v2; Ctrl-C stops)", err=True)

    def _stop(signum, frame):  # uvicorn shuts down gracefully on SIGTERM, then re-raises it here
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        click.echo("stopped", err=True)
