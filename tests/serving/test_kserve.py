"""The Open Inference Protocol (KServe V2) on ``islkeras serve``, with Triton's own client (``tritonclient``)
on loopback: health, metadata, inference with uint8 inputs as binary and as JSON (equal to the SavedModel
in-process), and the protocol's error body for each kind of bad input (the server stays up)."""
from __future__ import annotations

import gzip
import http.client
import json
import time

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server(max_body_mb=1, preload="latest")


@pytest.fixture()
def client(srv):
    c = tc.InferenceServerClient(f"{srv.host}:{srv.port}", connection_timeout=30, network_timeout=60)
    yield c
    c.close()


def _infer(client, x, version="", binary_in=True, binary_out=True, **kw):
    inp = tc.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = tc.InferRequestedOutput("prediction", binary_data=binary_out)
    return client.infer("isl", [inp], model_version=version, outputs=[out], **kw)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("isl") and client.is_model_ready("isl", "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "islkeras" and "binary_tensor_data" in meta["extensions"]
    meta = client.get_model_metadata("isl")
    assert meta == {"name": "isl", "versions": ["2", "1"], "platform": "tensorflow_savedmodel",
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 1]}],
                    "outputs": [{"name": "prediction", "datatype": "FP32", "shape": [-1, -1, -1, 1]}]}
    assert client.get_model_metadata("isl", "1")["versions"] == ["1"]


def test_readiness_loads_versions_in_the_background(start_server):
    """Nothing preloaded: "ready" says no (503) and starts the loads; server and version become ready."""
    cold = start_server()
    c = tc.InferenceServerClient(f"{cold.host}:{cold.port}")
    try:
        for check in (c.is_server_ready, lambda: c.is_model_ready("isl", "1")):
            assert not check()
            deadline = time.monotonic() + 30
            while not check():
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        c.close()


def test_infer_binary_and_json_equal_the_savedmodel(client, direct):
    x = np.random.default_rng(1).integers(0, 256, (2, 45, 70, 1), dtype=np.uint8)
    for version, key in (("", ("isl", 2)), ("1", ("isl", 1)), ("2", ("isl", 2))):
        want = direct[key].predict_raw(x)
        for binary_in in (True, False):
            for binary_out in (True, False):
                res = _infer(client, x, version, binary_in, binary_out)
                got = res.as_numpy("prediction")
                assert got.dtype == np.float32 and got.shape == want.shape == (2, 45, 70, 1)
                assert np.max(np.abs(got - want)) < 1e-5, (version, binary_in, binary_out)
                assert res.get_response()["model_version"] == (version or "2")
    res = _infer(client, x, request_compression_algorithm="gzip", request_id="r7")  # gzip body, request id
    assert res.get_response()["id"] == "r7"
    assert np.max(np.abs(res.as_numpy("prediction") - direct[("isl", 2)].predict_raw(x))) < 1e-5
    # the normalized signature (FP32 input "x") through the request parameter signature_name
    xn = np.random.default_rng(2).standard_normal((1, 64, 32, 1)).astype(np.float32)
    inp = tc.InferInput("x", list(xn.shape), "FP32")
    inp.set_data_from_numpy(xn)
    res = client.infer("isl", [inp], parameters={"signature_name": "normalized"})
    assert np.max(np.abs(res.as_numpy("prediction") - direct[("isl", 2)].predict_normalized(xn))) < 1e-5


@pytest.mark.parametrize("case, dtype, shape, data, words", [
    ("wrong dtype", "FP32", [1, 4, 4, 1], np.zeros((1, 4, 4, 1), np.float32), ["datatype 'FP32'", "UINT8"]),
    ("3 channels", "UINT8", [1, 4, 4, 3], np.zeros((1, 4, 4, 3), np.uint8), ["1 channel", "[1, 4, 4, 3]"]),
    ("rank 3", "UINT8", [4, 4, 1], np.zeros((4, 4, 1), np.uint8), ["rank 4", "[4, 4, 1]"]),
    ("empty", "UINT8", [1, 0, 4, 1], np.zeros((1, 0, 4, 1), np.uint8), ["empty tensor"]),
])
def test_bad_shape_or_dtype_with_tritonclient(client, case, dtype, shape, data, words):
    for binary in (True, False):
        inp = tc.InferInput("image", shape, dtype)
        inp.set_data_from_numpy(data, binary_data=binary)
        with pytest.raises(InferenceServerException) as e:
            client.infer("isl", [inp])
        assert e.value.status() == "400", (case, e.value)
        for w in words:
            assert w in e.value.message(), (case, w, e.value.message())
    assert client.is_server_live()


def _post(srv, path, body, headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def _v2(name="image", datatype="UINT8", shape=(1, 2, 2, 1), data=(1, 2, 3, 4), **extra):
    inp = {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data), **extra}
    return json.dumps({"inputs": [inp]}).encode()


def _bin(arr, header=None, extra=b""):
    h = json.dumps(header or {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(arr.shape),
                                          "parameters": {"binary_data_size": arr.nbytes}}]}).encode()
    return h + arr.tobytes() + extra, {"Inference-Header-Content-Length": str(len(h))}


X8 = np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1)
INFER = "/v2/models/isl/infer"
BAD = [  # (case, path, body, headers, status, words)
    ("malformed json", INFER, b'{"inputs": [', {}, 400, ["malformed JSON"]),
    ("not an object", INFER, b"[1]", {}, 400, ["JSON object"]),
    ("no inputs", INFER, b"{}", {}, 400, ['"inputs"']),
    ("unknown input", INFER, _v2(name="img"), {}, 400, ["'image'"]),
    ("shape vs data", INFER, _v2(shape=(1, 2, 3, 1)), {}, 400, ["6 elements", "has 4"]),
    ("bad shape", INFER, _v2(shape=(1, -2, 2, 1)), {}, 400, ["non-negative integers"]),
    ("strings", INFER, _v2(data=["a", "b", "c", "d"]), {}, 400, ["numbers"]),
    ("above uint8", INFER, _v2(data=(1, 2, 3, 256)), {}, 400, ["[0, 255]"]),
    ("fractional", INFER, _v2(data=(1, 2, 3, 1.5)), {}, 400, ["integers"]),
    ("nan fp32 json", INFER, b'{"parameters": {"signature_name": "normalized"}, "inputs": [{"name": "x", '
     b'"datatype": "FP32", "shape": [1, 32, 32, 1], "data": [NaN' + b", 0" * 1023 + b"]}]}", {}, 400,
     ["input 'x'", "finite"]),
    ("inf fp32 binary", INFER, *_bin(np.full((1, 32, 32, 1), np.inf, np.float32), {
        "parameters": {"signature_name": "normalized"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 32, 32, 1],
                    "parameters": {"binary_data_size": 4096}}]}), 400, ["input 'x'", "finite"]),
    ("binary size", INFER, *_bin(X8, {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 1],
                                                  "parameters": {"binary_data_size": 3}}]}), 400,
     ["binary_data_size 3"]),
    ("binary extra bytes", INFER, *_bin(X8, extra=b"xx"), 400, ["2 bytes of binary data after"]),
    ("bad header length", INFER, _v2(), {"Inference-Header-Content-Length": "99999"}, 400,
     ["Inference-Header-Content-Length"]),
    ("unknown output", INFER, json.dumps({"inputs": json.loads(_v2())["inputs"], "outputs": [{"name": "y"}]}).encode(),
     {}, 400, ["'prediction'"]),
    ("shared memory", INFER, _v2(parameters={"shared_memory_region": "r"}), {}, 400, ["shared memory"]),
    ("bad encoding", INFER, _v2(), {"Content-Encoding": "br"}, 415, ["gzip"]),
    ("bad gzip", INFER, b"not gzip", {"Content-Encoding": "gzip"}, 400, ["gzip"]),
    ("gzip bomb", INFER, gzip.compress(b" " * (2 << 20)), {"Content-Encoding": "gzip"}, 413, ["limit"]),
    ("too large", INFER, b" " * ((1 << 20) + 1), {}, 413, ["--max-body-mb"]),
    ("unknown model", "/v2/models/nope/infer", _v2(), {}, 404, ["nope", "isl"]),
    ("unknown version", "/v2/models/isl/versions/9/infer", _v2(), {}, 404, ["9", "1, 2"]),
    ("bad version", "/v2/models/isl/versions/latest/infer", _v2(), {}, 400, ["non-negative integer"]),
    ("POST metadata", "/v2/models/isl", _v2(), {}, 405, ["GET"]),
    ("unknown v2 route", "/v2/models/isl/explain", _v2(), {}, 404, ["/v2/models/<name>", "/v1/models/"]),
]


def test_bad_input_gets_the_protocols_error_body(srv, client):
    for case, path, body, headers, want, words in BAD:
        status, ctype, data = _post(srv, path, body, headers)
        assert status == want, (case, status, data[:300])
        assert ctype == "application/json", case
        err = json.loads(data)["error"]
        for w in words:
            assert w in err, (case, w, err)
        x = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
        assert _infer(client, x).as_numpy("prediction").shape == (1, 8, 8, 1), case  # the server carries on
    # chunked bodies: 411 with the error body (http.client sends chunked for an iterable body)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", INFER, body=iter([_v2()]), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 411 and "chunked request bodies are not supported" in json.loads(resp.read())["error"]
    conn.close()
    # GET on infer: 405
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("GET", INFER)
    resp = conn.getresponse()
    assert resp.status == 405 and "POST" in json.loads(resp.read())["error"]
    conn.close()
    assert client.is_server_ready()
