"""``islkeras serve``'s HTTP layer (``http.server``): connections, bodies and replies around ``ServingApp``,
``make_server`` and the ``serve`` command."""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Union

import click

from islkeras.serving.app import ServeOptions, ServingApp
from islkeras.serving.protocol import HTTPError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ------------------------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "islkeras-serve"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall on keep-alive
    server: "ServingHTTPServer"

    def setup(self):
        self.timeout = self.server.app.options.idle_timeout_s
        self._linger = 0  # bytes of an unread request body to drain before closing (see finish)
        super().setup()

    def finish(self):
        """Lingering close: after an error reply sent before the body was read (413, 411...), stop writing and
        drain what the client is still sending, so its kernel does not reset the connection before it read
        the reply."""
        try:
            super().finish()
        finally:
            if self._linger:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(1.0)
                    left, deadline = self._linger, time.monotonic() + 5.0
                    while left > 0 and time.monotonic() < deadline:
                        chunk = self.connection.recv(min(1 << 16, left))
                        if not chunk:
                            break
                        left -= len(chunk)

    def _content_length(self) -> Optional[int]:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {raw!r}") from None
        return n

    def _too_large(self, n: int) -> HTTPError:
        o = self.server.app.options
        return HTTPError(413, f"request body of {n} bytes exceeds the limit of {o.max_body_bytes} bytes (--max-body-mb "
                              f"{o.max_body_mb:g}); send smaller batches, or whole fields to :predict_tiff")

    def handle_expect_100(self):
        """``Expect: 100-continue`` (curl, for large bodies): refuse a too-large body before it is sent."""
        try:
            n = self._content_length()
            if n is not None and n > self.server.app.options.max_body_bytes:
                raise self._too_large(n)
        except HTTPError as e:
            self._reply(e.status, "application/json", json.dumps({"error": e.message}).encode(), close=True)
            return False
        return super().handle_expect_100()

    def log_message(self, format, *args):  # noqa: A002 -- BaseHTTPRequestHandler's signature
        if self.server.app.options.access_log:
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method...) as JSON too."""
        with contextlib.suppress(OSError):
            self._reply(code, "application/json", json.dumps({"error": message or HTTPStatus(code).phrase}).encode(),
                        close=True)

    def _reply(self, status: int, ctype: str, data: bytes, close: bool = False, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
            if not self._linger and self.command in ("POST", "PUT", "PATCH"):
                self._linger = 1 << 20
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked request bodies are not supported; send a Content-Length")
        n = self._content_length()
        if n is None:
            if self.command == "POST":
                raise HTTPError(411, "POST needs a Content-Length header")
            return b""
        limit = self.server.app.options.max_body_bytes
        if n > limit:
            self._linger = n if n <= max(4 * limit, 16 << 20) else 0  # drain moderately large bodies, drop huge ones
            raise self._too_large(n)
        body = self.rfile.read(n)
        if len(body) != n:
            raise HTTPError(400, f"request body ended after {len(body)} of {n} bytes")
        return body

    def _dispatch(self):
        body_read, headers = False, None
        try:
            body = self._read_body()
            body_read = True
            reply = self.server.app.handle(self.command, self.path, body)
            status, ctype, data, headers = reply.status, reply.content_type, reply.body, reply.headers
        except HTTPError as e:
            status, ctype, data = e.status, "application/json", json.dumps({"error": e.message}).encode()
        except Exception as e:  # noqa: BLE001 -- never let a request take the server down
            traceback.print_exc(file=sys.stderr)
            status, ctype, data = 500, "application/json", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        self._reply(status, ctype, data, close=not body_read, headers=headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class ServingHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections handled at once (more get a 503 and are closed)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app: ServingApp):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self._connections = threading.BoundedSemaphore(app.options.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            body = json.dumps({"error": f"server busy: {self.app.options.max_connections} connections open "
                                        "(--max-connections); retry later"}).encode()
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(base: Union[str, Path], host: str = "127.0.0.1", port: int = 8501,
                options: Optional[ServeOptions] = None, **kwargs) -> ServingHTTPServer:
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
    return ServingHTTPServer((host, port), app)


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
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Connections handled at once; more get 503.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Request body limit in MiB; larger bodies get 413.")
@click.option("--preload", type=click.Choice(["latest", "all", "none"]), default="latest", show_default=True,
              help="Versions loaded at start (others load on their first request).")
@click.option("--tile", type=click.IntRange(min=32), default=None, help=":predict_tiff tile size [default: predict's].")
@click.option("--overlap", type=click.IntRange(min=0), default=None, help=":predict_tiff tile overlap [default: predict's].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help=":predict_tiff tiles per model call.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def serve_command(model_base: Path, host: str, port: int, max_concurrent: int, max_queue: int, max_connections: int,
                  max_body_mb: float, preload: str, tile, overlap, batch, access_log: bool):
    """Serve the models of MODEL_BASE (MODEL_BASE/<name>/<version>/) over the TF Serving REST API.

    \b
    Endpoints:
      GET  /v1/models/<name>[/versions/<v>]             version status
      GET  /v1/models/<name>[/versions/<v>]/metadata    signatures + islkeras metadata
      POST /v1/models/<name>[/versions/<v>]:predict     {"instances": ...} or {"inputs": ...}
      POST /v1/models/<name>[/versions/<v>]:predict_tiff  TIFF bytes in, float32 TIFF out

    \b
    Examples:
      islkeras serve models/
      curl http://127.0.0.1:8501/v1/models/nuclei
      curl --data-binary @field.tif -o pred.tif http://127.0.0.1:8501/v1/models/nuclei:predict_tiff
    """
    from islkeras.errors import UserError
    from islkeras.utils import keep_large_buffers

    keep_large_buffers()  # MB-sized JSON/TIFF buffers from the heap, not fresh pages each request
    options = ServeOptions(max_concurrent=max_concurrent, max_queue=max_queue, max_connections=max_connections,
                           max_body_mb=max_body_mb, preload=preload, access_log=access_log, tile=tile,
                           overlap=overlap, batch=batch)
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
    click.echo(f"serving {repo.base} on {server.url} (ready in {time.monotonic() - t0:.1f} s; Ctrl-C stops)", err=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        click.echo("stopped", err=True)
