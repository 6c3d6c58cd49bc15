"""The HTTP layer's limits on the uvicorn server, with raw sockets on loopback (every loop bounded in count
and time): the whole-request deadline against trickling clients, the connection cap, bodies (413 before an
``Expect: 100-continue`` upload, 411 for chunked, the rest of a refused body discarded so the connection
stays usable), the queue timeout, and NaN/Infinity in float inputs."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest

GOOD = json.dumps({"instances": [[[[1], [2]], [[3], [4]]]]}).encode()
PREDICT = "/v1/models/isl:predict"


def _request(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{headers}\r\n").encode() + body


def _read_reply(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict, bytes]:
    """One HTTP reply from ``sock`` (status, lower-cased headers, body); raises on a closed socket."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a reply; got {buf[:200]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    if status == 100:  # an interim reply: the real one follows
        return (100, headers, body)
    n = int(headers.get("content-length", 0))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a reply body")
        body += chunk
    return status, headers, body


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _good(srv) -> float:
    """A normal request on a new connection -> its latency; asserts a correct 200."""
    t = time.perf_counter()
    with socket.create_connection((srv.host, srv.port), timeout=30) as s:
        s.sendall(_request(PREDICT, GOOD))
        status, _, body = _read_reply(s)
    assert status == 200, body
    assert np.asarray(json.loads(body)["predictions"]).shape == (1, 2, 2, 1)
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server(request_timeout_s=1.5, idle_timeout_s=1.0, max_body_mb=1)


# ------------------------------------------------------------------------------------------ deadline
def _trickle(socks: list, data: bytes, every_s: float, max_s: float) -> list:
    """Send ``data`` one byte per socket every ``every_s`` (bounded by ``max_s``), reading as we go; returns
    each socket's reply (b"" if none came)."""
    replies = [b""] * len(socks)
    for s in socks:
        s.setblocking(False)
    t0 = time.monotonic()
    for i in range(len(data)):
        if all(replies) or time.monotonic() - t0 > max_s:
            break
        for k, s in enumerate(socks):
            if replies[k]:
                continue
            try:
                replies[k] = s.recv(65536)
            except BlockingIOError:
                pass
            except OSError as e:
                replies[k] = repr(e).encode()
            if not replies[k]:
                with contextlib.suppress(OSError):
                    s.send(data[i:i + 1])
        time.sleep(every_s)
    for s in socks:
        s.setblocking(True)
    return replies


def test_trickling_headers_get_408_at_the_deadline(srv):
    """One byte every 50 ms keeps a per-read timeout from ever firing; the whole-request deadline does."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        t0 = time.monotonic()
        reply, = _trickle([s], _request(PREDICT, GOOD), 0.05, 6)
        elapsed = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 408 "), (elapsed, reply[:200])
        assert "--request-timeout" in json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
        assert 1.4 < elapsed < 3.5, elapsed
        assert _closed(s)
    _good(srv)


def test_trickling_body_gets_408_and_idle_connection_is_closed(srv):
    data = _request(PREDICT, GOOD)
    head = data[:data.index(b"\r\n\r\n") + 4]
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(head)
        reply, = _trickle([s], GOOD, 0.05, 6)
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert "body bytes arrived" in json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
        assert 1.4 < time.monotonic() - t0 < 3.5
        assert _closed(s)
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:  # sends nothing: closed when idle
        t0 = time.monotonic()
        assert _closed(s, 5.0)
        assert 0.9 < time.monotonic() - t0 < 3.0
    _good(srv)


def test_64_trickling_clients_leave_a_normal_client_served(srv):
    """64 connections trickling headers (the old server's --max-connections): normal requests meanwhile are
    answered as fast as before, and every trickler is cut off by the deadline."""
    usual = min(_good(srv) for _ in range(3))
    socks = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(64)]
    during = []
    normal = threading.Thread(target=lambda: (time.sleep(0.3), during.extend(_good(srv) for _ in range(3))))
    try:
        normal.start()
        replies = _trickle(socks, _request(PREDICT, GOOD), 0.1, 6)
        normal.join(20)
    finally:
        for s in socks:
            s.close()
    assert len(during) == 3 and min(during) < 2 * usual + 0.1, (usual, during)
    assert [r[:13] for r in replies] == [b"HTTP/1.1 408 "] * 64, {r[:40] for r in replies}
    _good(srv)


# ---------------------------------------------------------------------------------------- connections
def test_connections_beyond_the_cap_get_503(start_server):
    small = start_server(max_connections=3, idle_timeout_s=10)
    held = [socket.create_connection((small.host, small.port), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.2)
        with socket.create_connection((small.host, small.port), timeout=10) as s:
            status, headers, body = _read_reply(s, 5)
            assert status == 503 and headers["connection"] == "close"
            assert "--max-connections" in json.loads(body)["error"]
            assert _closed(s)
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    _good(small)


# ----------------------------------------------------------------------------------------------- bodies
def test_expect_100_continue_too_large_is_refused_before_the_upload(srv):
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {2 << 20}\r\nExpect: 100-continue\r\n\r\n"
                  .encode())
        status, headers, body = _read_reply(s, 5)  # not a "100 Continue": the final answer, before any body
        assert status == 413 and headers["connection"] == "close"
        assert "--max-body-mb" in json.loads(body)["error"]
        assert _closed(s)
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:  # within the limit: 100, then 200
        s.sendall(_request(PREDICT, b"", "Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                               f"Content-Length: {len(GOOD)}".encode()))
        assert _read_reply(s, 5)[0] == 100
        s.sendall(GOOD)
        assert _read_reply(s, 10)[0] == 200


def test_refused_bodies_are_discarded_and_the_connection_stays_usable(srv):
    """411 for a chunked body, 413 for one over --max-body-mb: the client can send its whole body, read the
    error and go on with the same connection."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        chunked = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   f"{len(GOOD):x}\r\n").encode() + GOOD + b"\r\n0\r\n\r\n"
        s.sendall(chunked)
        status, _, body = _read_reply(s)
        assert status == 411 and json.loads(body)["error"] == ("chunked request bodies are not supported; send a "
                                                               "Content-Length")
        big = b" " * ((1 << 20) + 1)
        s.sendall(_request(PREDICT, big))
        status, headers, body = _read_reply(s)
        assert status == 413 and "connection" not in headers
        assert "exceeds the limit of 1048576 bytes" in json.loads(body)["error"]
        s.sendall(_request(PREDICT, GOOD))  # the same connection
        status, _, body = _read_reply(s)
        assert status == 200 and np.asarray(json.loads(body)["predictions"]).shape == (1, 2, 2, 1)


# ------------------------------------------------------------------------------------ queue, NaN/Inf
def test_queue_timeout_gets_503(srv, monkeypatch):
    from islkeras.serving.app import Admission

    monkeypatch.setattr(srv.app, "admission", Admission(max_concurrent=1, max_queue=4, timeout_s=0.5))
    model = srv.app.repo.get("isl").get()
    real, entered, release = model.predict_raw, threading.Event(), threading.Event()

    def slow(batch):
        entered.set()
        release.wait(20)
        return real(batch)

    monkeypatch.setattr(model, "predict_raw", slow)
    first = threading.Thread(target=_good, args=(srv,))
    first.start()
    try:
        assert entered.wait(20)
        t0 = time.monotonic()
        with socket.create_connection((srv.host, srv.port), timeout=10) as s:
            s.sendall(_request(PREDICT, GOOD))
            status, _, body = _read_reply(s)
        assert status == 503 and "no prediction slot within 0.5 s" in json.loads(body)["error"]
        assert 0.4 < time.monotonic() - t0 < 3
    finally:
        release.set()
        first.join(20)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_float_inputs_get_400(srv, value):
    """The old server answered 200 with NaN predictions."""
    rows = [[[0.5]] * 32 for _ in range(32)]
    text = json.dumps({"signature_name": "normalized", "inputs": {"x": [rows]}}).replace("0.5]]]]", f"{value}]]]]")
    assert text.count(value) == 1
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(_request(PREDICT, text.encode()))
        status, _, reply = _read_reply(s)
    assert status == 400, reply
    err = json.loads(reply)["error"]
    assert err.startswith("input 'x' is float32: expected finite numbers") and "index [0, 31, 31, 0]" in err, err
    _good(srv)
