"""``islkeras serve``: real HTTP against a server in a subprocess on a free loopback port.

Tiny plain U-Nets are exported into one model base: model ``isl`` with versions 1 and 2 (different
weights) and model ``other`` (a copy of isl/1). Replies are compared with the SavedModel called directly.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

TILE = ["--tile", "128", "--overlap", "32"]  # small tiles so the TIFF route really tiles
MAX_BODY_MB = 1


# model_base (isl/1, isl/2, other/1) and direct (the SavedModels loaded in this process) are in conftest.py,
# shared with the other serving tests


class Client:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def request(self, method: str, path: str, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheader("Content-Type"), data
        finally:
            if own:
                conn.close()

    def json(self, method: str, path: str, body=None, **kw):
        status, ctype, data = self.request(method, path, body, **kw)
        assert ctype == "application/json", (status, ctype, data[:200])
        return status, json.loads(data)


@pytest.fixture(scope="module")
def server(model_base, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, ISLKERAS_NO_PROGRESS="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "islkeras.cli", "serve", str(model_base), "--port", "0",
             "--max-body-mb", str(MAX_BODY_MB), "--max-concurrent", "2", "--max-queue", "64", *TILE],
            stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            if proc.poll() is not None:
                pytest.fail(f"islkeras serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"islkeras serve not ready in 60 s:\n{log.read_text()}")
            m = re.search(r"on http://(127\.0\.0\.1):(\d+) ", log.read_text())
            url = m and (m.group(1), int(m.group(2)))
            time.sleep(0.2)
        client = Client(*url)
        assert client.json("GET", "/v1/models/isl")[0] == 200  # ready
        client.log = log
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _images(seed: int, shape=(2, 45, 70, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _good(server):
    """A request that must succeed after any bad one."""
    x = _images(99, (1, 33, 40, 1))
    status, reply = server.json("POST", "/v1/models/isl:predict", {"instances": x.tolist()})
    assert status == 200, reply
    assert np.asarray(reply["predictions"]).shape == (1, 33, 40, 1)


# ----------------------------------------------------------------------------------------- status/metadata
def test_binds_loopback_and_reports_versions(server):
    assert server.host == "127.0.0.1"
    status, reply = server.json("GET", "/v1/models/isl")
    assert status == 200
    versions = {s["version"]: s for s in reply["model_version_status"]}
    assert set(versions) == {"1", "2"}
    assert versions["2"] == {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    status, reply = server.json("GET", "/v1/models/other/versions/1")
    assert status == 200 and [s["version"] for s in reply["model_version_status"]] == ["1"]
    status, reply = server.json("GET", "/v1/models")
    assert [m["name"] for m in reply["models"]] == ["isl", "other"]


def test_metadata_lists_signatures(server):
    status, reply = server.json("GET", "/v1/models/isl/metadata")
    assert status == 200
    assert reply["model_spec"] == {"name": "isl", "signature_name": "", "version": "2"}
    sig = reply["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    inp = sig["inputs"]["image"]
    assert inp["dtype"] == "DT_UINT8"
    assert [d["size"] for d in inp["tensor_shape"]["dim"]] == ["-1", "-1", "-1", "1"]
    assert sig["outputs"]["prediction"]["dtype"] == "DT_FLOAT"
    assert "normalized" in reply["metadata"]["signature_def"]["signature_def"]
    meta = reply["metadata"]["islkeras"]
    assert meta["inputs"] == ["bf"] and meta["targets"] == ["nuc"] and meta["input_dtype"] == "uint8"
    status, reply = server.json("GET", "/v1/models/isl/versions/1/metadata")
    assert status == 200 and reply["model_spec"]["version"] == "1"


# ------------------------------------------------------------------------------------------------ predict
def test_predict_row_and_columnar_equal_savedmodel(server, direct):
    x = _images(1)
    for (name, version), path in [(("isl", 2), "/v1/models/isl:predict"),
                                  (("isl", 1), "/v1/models/isl/versions/1:predict"),
                                  (("isl", 2), "/v1/models/isl/versions/2:predict")]:
        want = direct[(name, version)].predict_raw(x)
        for body, key in [({"instances": x.tolist()}, "predictions"),
                          ({"instances": [{"image": i.tolist()} for i in x]}, "predictions"),
                          ({"inputs": x.tolist()}, "outputs"),
                          ({"inputs": {"image": x.tolist()}, "signature_name": "serving_default"}, "outputs")]:
            status, reply = server.json("POST", path, body)
            assert status == 200, reply
            assert list(reply) == [key]
            got = np.asarray(reply[key], np.float32)
            assert got.shape == want.shape == (2, 45, 70, 1)
            assert np.max(np.abs(got - want)) < 1e-5, (path, key)
    # the two versions really are different models, and "other" is a copy of isl/1
    assert np.max(np.abs(direct[("isl", 1)].predict_raw(x) - direct[("isl", 2)].predict_raw(x))) > 1e-3
    status, reply = server.json("POST", "/v1/models/other:predict", {"inputs": x.tolist()})
    assert np.max(np.abs(np.asarray(reply["outputs"], np.float32) - direct[("isl", 1)].predict_raw(x))) < 1e-5


def test_predict_normalized_signature(server, direct):
    x = np.random.default_rng(3).standard_normal((1, 64, 32, 1)).astype(np.float32)
    status, reply = server.json("POST", "/v1/models/isl:predict", {"signature_name": "normalized", "inputs": {"x": x.tolist()}})
    assert status == 200, reply
    assert np.max(np.abs(np.asarray(reply["outputs"], np.float32) - direct[("isl", 2)].predict_normalized(x))) < 1e-5


def test_tiff_route_equals_islkeras_predict(server, model_base, tmp_path):
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli

    field = np.random.default_rng(5).integers(0, 256, (200, 300), dtype=np.uint8)
    src = tmp_path / "field.tif"
    tifffile.imwrite(src, field)
    status, ctype, data = server.request("POST", "/v1/models/isl:predict_tiff", src.read_bytes())
    assert status == 200, data[:300]
    assert ctype == "image/tiff"
    got = tifffile.imread(io.BytesIO(data))
    assert got.shape == (200, 300) and got.dtype == np.float32

    res = CliRunner().invoke(cli, ["predict", str(model_base / "isl" / "2"), str(src), "--out", str(tmp_path / "out"),
                                   *TILE], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    want = tifffile.imread(tmp_path / "out" / "field_prediction.tif")
    assert np.max(np.abs(got - want)) < 1e-5
    # query parameters override the tiling; uint16 output like `islkeras predict --dtype uint16`
    status, _, data = server.request("POST", "/v1/models/isl/versions/1:predict_tiff?tile=64&overlap=0&dtype=uint16",
                                     src.read_bytes())
    assert status == 200
    assert tifffile.imread(io.BytesIO(data)).dtype == np.uint16


# ---------------------------------------------------------------------------------------------- bad input
def _tiff(arr) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


GOOD_ROW = [[[[1], [2]], [[3], [4]]]]
BAD_REQUESTS = [
    # (id, method, path, body, status, words the error must contain)
    ("malformed json", "POST", "/v1/models/isl:predict", b'{"instances": [[[[1]]]', 400, ["malformed JSON"]),
    ("not utf-8", "POST", "/v1/models/isl:predict", b"\xff\xfe\x00", 400, ["JSON"]),
    ("json list", "POST", "/v1/models/isl:predict", b"[1, 2]", 400, ["JSON object", "instances"]),
    ("no tensor", "POST", "/v1/models/isl:predict", {"signature_name": "serving_default"}, 400, ["exactly one of"]),
    ("both formats", "POST", "/v1/models/isl:predict", {"instances": GOOD_ROW, "inputs": GOOD_ROW}, 400,
     ["exactly one of"]),
    ("unknown key", "POST", "/v1/models/isl:predict", {"instances": GOOD_ROW, "extra": 1}, 400, ["extra"]),
    ("rank 3 batch", "POST", "/v1/models/isl:predict", {"instances": [[1, 2], [3, 4]]}, 400, ["rank"]),
    ("rank 5 inputs", "POST", "/v1/models/isl:predict", {"inputs": [GOOD_ROW]}, 400, ["rank"]),
    ("scalar", "POST", "/v1/models/isl:predict", {"inputs": 3}, 400, ["rank"]),
    ("empty instances", "POST", "/v1/models/isl:predict", {"instances": []}, 400, ["non-empty"]),
    ("3 channels", "POST", "/v1/models/isl:predict", {"instances": [[[[1, 2, 3]]]]}, 400, ["1 channel"]),
    ("strings", "POST", "/v1/models/isl:predict", {"instances": [[[["a"], ["b"]]]]}, 400, ["strings"]),
    ("null", "POST", "/v1/models/isl:predict", {"instances": [[[[None], [1]]]]}, 400, ["null"]),
    ("booleans", "POST", "/v1/models/isl:predict", {"instances": [[[[True], [False]]]]}, 400, ["booleans"]),
    ("ragged", "POST", "/v1/models/isl:predict", {"instances": [[[[1], [2]], [[3]]]]}, 400, ["equal length"]),
    ("above uint8", "POST", "/v1/models/isl:predict", {"instances": [[[[256], [2]]]]}, 400, ["[0, 255]"]),
    ("negative", "POST", "/v1/models/isl:predict", {"instances": [[[[-1], [2]]]]}, 400, ["[0, 255]"]),
    ("fractional", "POST", "/v1/models/isl:predict", {"instances": [[[[1.5], [2]]]]}, 400, ["integers"]),
    ("nan", "POST", "/v1/models/isl:predict", b'{"instances": [[[[NaN], [2]]]]}', 400, ["integers"]),
    ("wrong input name", "POST", "/v1/models/isl:predict", {"inputs": {"img": GOOD_ROW}}, 400, ["'image'"]),
    ("unknown signature", "POST", "/v1/models/isl:predict", {"signature_name": "nope", "instances": GOOD_ROW}, 400,
     ["serving_default"]),
    ("normalized not /32", "POST", "/v1/models/isl:predict", {"signature_name": "normalized", "inputs": GOOD_ROW},
     400, ["multiples of 32"]),
    ("unknown model", "POST", "/v1/models/nope:predict", {"instances": GOOD_ROW}, 404, ["nope", "isl"]),
    ("unknown version", "POST", "/v1/models/isl/versions/9:predict", {"instances": GOOD_ROW}, 404, ["9", "1, 2"]),
    ("bad version", "GET", "/v1/models/isl/versions/latest", None, 400, ["integer"]),
    ("unknown model status", "GET", "/v1/models/nope", None, 404, ["nope"]),
    ("unknown route", "GET", "/v2/whatever", None, 404, ["/v1/models/"]),
    ("unknown verb", "POST", "/v1/models/isl:explain", {"instances": GOOD_ROW}, 404, [":predict"]),
    ("classify", "POST", "/v1/models/isl:classify", {"examples": []}, 400, [":predict"]),
    ("GET predict", "GET", "/v1/models/isl:predict", None, 405, ["POST"]),
    ("PUT", "PUT", "/v1/models/isl", b"", 405, ["GET"]),
    ("too large", "POST", "/v1/models/isl:predict", b" " * (MAX_BODY_MB * 1024 * 1024 + 1), 413, ["limit"]),
    ("corrupt tiff", "POST", "/v1/models/isl:predict_tiff", b"II*\x00garbage" * 10, 400, ["TIFF"]),
    ("tiff too small", "POST", "/v1/models/isl:predict_tiff", _tiff(np.zeros((10, 12), np.uint8)), 400, ["32"]),
    ("tiff 3 planes", "POST", "/v1/models/isl:predict_tiff", _tiff(np.zeros((3, 40, 40), np.uint8)), 400,
     ["plane"]),
    ("empty tiff body", "POST", "/v1/models/isl:predict_tiff", b"", 400, ["TIFF"]),
    ("bad tile", "POST", "/v1/models/isl:predict_tiff?tile=100", _tiff(np.zeros((40, 40), np.uint8)), 400,
     ["multiple of 32"]),
]


def test_bad_input_gets_4xx_and_server_keeps_working(server):
    for case, method, path, body, want_status, words in BAD_REQUESTS:
        status, reply = server.json(method, path, body)
        assert status == want_status, (case, status, reply)
        assert isinstance(reply.get("error"), str), (case, reply)
        for w in words:
            assert w in reply["error"], (case, w, reply["error"])
        _good(server)


def test_bad_http_gets_4xx(server):
    # no Content-Length on a POST, a garbage Content-Length, then a request line http.server rejects
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.putrequest("POST", "/v1/models/isl:predict")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    status, _, data = server.request("POST", "/v1/models/isl:predict", b"{}", headers={"Content-Length": "x"})
    assert status == 400 and b"Content-Length" in data
    import socket

    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        reply = s.recv(4096)
    assert b"Bad request" in reply and b'"error"' in reply, reply[:200]  # http.server's 400, as JSON
    _good(server)


# ------------------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_all_correct(server, direct):
    n_threads, n_requests = 8, 25
    inputs = [_images(100 + t, (1, 32 + 8 * t, 40, 1)) for t in range(n_threads)]
    want = {(t, v): direct[("isl", v)].predict_raw(inputs[t]) for t in range(n_threads) for v in (1, 2)}
    errors = []

    def worker(t):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)  # keep-alive connection
        try:
            for i in range(n_requests):
                v = 1 + (i + t) % 2
                path = "/v1/models/isl:predict" if v == 2 else "/v1/models/isl/versions/1:predict"
                body = {"instances": inputs[t].tolist()} if i % 2 else {"inputs": inputs[t].tolist()}
                status, _, data = server.request("POST", path, body, conn=conn)
                reply = json.loads(data)
                if status != 200:
                    errors.append((t, i, status, reply))
                    continue
                got = np.asarray(reply["predictions" if i % 2 else "outputs"], np.float32)
                if got.shape != want[(t, v)].shape or np.max(np.abs(got - want[(t, v)])) >= 1e-5:
                    errors.append((t, i, "wrong reply"))
        except Exception as e:  # noqa: BLE001
            errors.append((t, repr(e)))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors[:5]


def test_new_version_is_picked_up(server, model_base, direct):
    """A version exported while serving is found by the rescan and loaded in the background; requests
    meanwhile keep being answered (by the newest loaded version)."""
    shutil.copytree(model_base / "other" / "1", model_base / "other" / "5")
    try:
        x = _images(7, (1, 40, 40, 1))
        want = direct[("isl", 1)].predict_raw(x)
        deadline, states = time.monotonic() + 60, {}
        while states.get("5") != "AVAILABLE":
            assert time.monotonic() < deadline, states
            status, reply = server.json("POST", "/v1/models/other:predict", {"instances": x.tolist()})
            assert status == 200, reply
            assert np.max(np.abs(np.asarray(reply["predictions"], np.float32) - want)) < 1e-5
            status, reply = server.json("GET", "/v1/models/other")
            states = {s["version"]: s["state"] for s in reply["model_version_status"]}
            time.sleep(0.2)
        assert list(states) == ["5", "1"]
        status, reply = server.json("POST", "/v1/models/other/versions/5:predict", {"instances": x.tolist()})
        assert status == 200 and np.max(np.abs(np.asarray(reply["predictions"], np.float32) - want)) < 1e-5
    finally:
        shutil.rmtree(model_base / "other" / "5")


def test_broken_version_is_500_and_others_keep_working(server, model_base):
    broken = model_base / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    try:
        # a new model folder is found by the next rescan (throttled); wait until the server knows it
        deadline = time.monotonic() + 10
        while server.json("GET", "/v1/models/broken")[0] == 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(2):  # the second time from the remembered failure, without reloading
            status, reply = server.json("POST", "/v1/models/broken:predict", {"instances": GOOD_ROW})
            assert status == 500 and "broken version 1 failed to load" in reply["error"], reply
            _good(server)
        status, reply = server.json("GET", "/v1/models/broken")
        assert reply["model_version_status"][0]["state"] == "END"
        assert reply["model_version_status"][0]["status"]["error_message"]
    finally:
        shutil.rmtree(broken.parent)


# ---------------------------------------------------------------------------------- in-process server
@pytest.fixture(scope="module")
def inproc(model_base, direct):
    """``make_server`` in a thread of this process (to break the model deliberately); it reuses the models
    this process already loaded."""
    from islkeras.serving.http import make_server
    from islkeras.serving.repository import ModelVersion

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelVersion, "_load", lambda self: direct[(self.name, self.version)])
    srv = make_server(model_base, "127.0.0.1", 0, preload="none")
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    th.start()
    yield srv, Client(*srv.server_address[:2])
    srv.shutdown()
    srv.server_close()
    th.join(10)
    mp.undo()


def test_failure_inside_model_is_500_and_next_request_works(inproc, monkeypatch):
    import tensorflow as tf

    srv, client = inproc
    model = srv.app.repo.get("isl").get()
    real = model.predict_raw
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return real(batch)

    monkeypatch.setattr(model, "predict_raw", flaky)
    status, reply = client.json("POST", "/v1/models/isl:predict", {"instances": GOOD_ROW})
    assert status == 500
    assert "OOM when allocating tensor" in reply["error"] and "isl" in reply["error"]
    _good(client)
    assert len(calls) == 2


def test_full_queue_gets_503(inproc, monkeypatch):
    from islkeras.serving.app import Admission

    srv, client = inproc
    monkeypatch.setattr(srv.app, "admission", Admission(max_concurrent=1, max_queue=0, timeout_s=30))
    model = srv.app.repo.get("isl").get()
    real = model.predict_raw
    entered, release = threading.Event(), threading.Event()

    def slow(batch):
        entered.set()
        release.wait(30)
        return real(batch)

    monkeypatch.setattr(model, "predict_raw", slow)
    result = {}
    th = threading.Thread(target=lambda: result.update(r=client.json("POST", "/v1/models/isl:predict",
                                                                       {"instances": GOOD_ROW})))
    th.start()
    try:
        assert entered.wait(30)
        status, reply = client.json("POST", "/v1/models/isl:predict", {"instances": GOOD_ROW})
        assert status == 503 and "busy" in reply["error"]
    finally:
        release.set()
        th.join(30)
    assert result["r"][0] == 200
    _good(client)


# ------------------------------------------------------------------------------------ JSON fast path
FAST_BODIES = [
    b'{"instances": [[[[1], [2]], [[3], [4]]]]}',
    b'{"instances":[[[[1],[2]],[[3],[4]]],[[[5],[6]],[[7],[255]]]]}',
    b' {\n "signature_name": "serving_default",\n "inputs": {"image": [[[[0],[1.0]]]]}\n}\n',
    b'{"inputs": [[[[1], [2]]]], "signature_name": "serving_default"}',
    b'{"signature_name": "normalized", "inputs": {"x": [[[[1.5e-3], [-2.25E+2]]]]}}',
    b'{"signature_name": "normalized", "instances": [[[[-0.0], [1e5]]]]}',
    b'{"instances": [[[[1], [2]], [[3]]]]}',  # ragged
    b'{"instances": [[[[1], []]]]}', b'{"instances": [[[[], [1]]]]}', b'{"instances": [[[[1], [ ]]]]}',
    b'{"instances": [[[[1], [2,]]]]}', b'{"instances": [[[[,1], [2]]]]}',
    b'{"instances": [[[[1, ], [2]]]]}',
    b'{"instances": [[[[01], [2]]]]}', b'{"instances": [[[[+1], [2]]]]}', b'{"instances": [[[[.5], [2]]]]}',
    b'{"instances": [[[[5.], [2]]]]}', b'{"instances": [[[[-], [2]]]]}', b'{"instances": [[[[1e], [2]]]]}',
    b'{"instances": [[[[1 2], [2]]]]}', b'{"instances": [[[[1-2], [2]]]]}', b'{"instances": [[[[1.5.2], [2]]]]}',
    b'{"instances": [[[[NaN], [2]]]]}', b'{"instances": [[[[256], [2]]]]}', b'{"instances": [[[[-1], [2]]]]}',
    b'{"instances": [[[[1.5], [2]]]]}', b'{"instances": [[[[1], [2]]]]', b'{"instances": [[[1, 2]]]}',
    b'{"instances": [[[[1, 2]]]]}', b'{"inputs": {"img": [[[[1]]]]}}', b'{"instances": {"image": [[[[1]]]]}}',
    b'{"instances": [[[[1]]]], "inputs": [[[[1]]]]}', b'{"signature_name": "nope", "inputs": [[[[1]]]]}',
    b'{"signature_name": "normalized", "inputs": {"image": [[[[1]]]]}}', b'{"instances": [[[[1e2]]]]}',
    b'{"instances": [[[[1]]]]} x', b'[[[[1]]]]', b'{"instances": [[[[-01]]]]}', b'{"instances": [[[[1e05]]]]}',
    # integer inputs are read as int64 first: float tokens and out-of-int64 tokens must fall back correctly
    b'{"instances": [[[[255], [2.0]]]]}', b'{"instances": [[[[99999999999999999999], [2]]]]}',
    b'{"instances": [[[[-9223372036854775808], [2]]]]}', b'{"instances": [[[[9223372036854775807]]]]}',
]


@pytest.mark.parametrize("body", FAST_BODIES)
def test_fast_json_path_agrees_with_json_module(body):
    from islkeras.serving.protocol import HTTPError, InputSpec, _check_and_cast, parse_predict_request

    specs = {"serving_default": InputSpec("serving_default", "image", np.dtype("uint8"), (None, None, None, 1), "p"),
             "normalized": InputSpec("normalized", "x", np.dtype("float32"), (None, None, None, 1), "p")}

    def run(fast):
        try:
            fmt, spec, arr = parse_predict_request(body, specs, fast=fast)
            return fmt, spec.signature, _check_and_cast(arr, spec, None)
        except HTTPError as e:
            return e.status

    want, got = run(False), run(True)
    if isinstance(want, int):
        assert got == want
    else:
        assert got[:2] == want[:2] and got[2].dtype == want[2].dtype and np.array_equal(got[2], want[2])


def test_fast_json_path_is_taken_for_plain_tensors():
    from islkeras.serving.protocol import InputSpec, _fast_predict_body

    specs = {"serving_default": InputSpec("serving_default", "image", np.dtype("uint8"), (None, None, None, 1), "p"),
             "normalized": InputSpec("normalized", "x", np.dtype("float32"), (None, None, None, 1), "p")}
    for body in FAST_BODIES[:6] + [b'{"instances": [[[[1e05]]]]}']:
        assert _fast_predict_body(body, specs) is not None, body
    for body in FAST_BODIES[6:22]:
        assert _fast_predict_body(body, specs) is None, body


def test_tensor_json_round_trips_exactly_and_keeps_nan():
    """Replies are written from the numpy buffer: float32 values come back bit-identical through the json
    module (what clients use), integers stay integers, non-finite values are TF Serving's NaN/Infinity."""
    from islkeras.serving.protocol import tensor_json

    rng = np.random.default_rng(0)
    f = (rng.standard_normal((2, 5, 7, 3)) * 10.0 ** rng.integers(-8, 9, (2, 5, 7, 3))).astype(np.float32)
    back = np.asarray(json.loads(tensor_json(f)), np.float32)
    assert back.shape == f.shape and np.array_equal(back.view(np.uint32), f.view(np.uint32))
    u = rng.integers(0, 65536, (1, 4, 4, 1)).astype(np.uint16)
    text = tensor_json(u)
    assert b"." not in text and np.array_equal(np.asarray(json.loads(text)), u)
    h = np.array([[0.1, 65504.0]], np.float16)
    assert np.array_equal(np.asarray(json.loads(tensor_json(h)), np.float16), h)
    bad = np.array([[1.5, np.nan], [np.inf, -np.inf]], np.float32)
    back = json.loads(tensor_json(bad))  # the json module reads NaN/Infinity
    assert back[0][0] == 1.5 and np.isnan(back[0][1]) and back[1] == [float("inf"), float("-inf")]
