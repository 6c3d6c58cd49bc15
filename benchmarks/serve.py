"""``islkeras serve`` (uvicorn + Starlette) latency, robustness and memory; prints one JSON object.

1. Latency of a 512 x 512 uint8 predict over HTTP (server in a subprocess on a free loopback port) against
   calling the same SavedModel in-process (``ExportedModel.predict_raw``): p50/p95 for
   * ``json_row``: TF Serving ``:predict`` with ``{"instances": ...}``, the body encoded once beforehand (the
     client's encoding is reported separately), timed until the whole reply is received;
   * ``json_row_decoded``: the same plus the client's ``json.loads`` + ``np.asarray`` of the reply (in this
     process, where TensorFlow's spinning threads slow it down; ``client_json_ms_in_a_process_without_tf``
     gives a plain client's encode/decode cost);
   * ``v2_binary``: KServe V2 ``/infer`` with the binary tensor data extension (JSON header + raw bytes in,
     raw float32 out), body built once, reply decoded with ``np.frombuffer``;
   * ``v2_binary_tritonclient``: the same call through ``tritonclient.http`` (its own encoding and decoding);
   * ``tiff``: ``:predict_tiff`` with the field's TIFF bytes (one 512 tile, same network call);
   and the server's own stage times (``Server-Timing``: parse, queue, model, encode). All are interleaved
   per repetition so they see the same machine load; ``ratio_p50_paired`` is the median of the
   per-repetition ratios to in-process (what the targets use), ``ratio_p50`` the ratio of the p50s.
2. ``json_parse_ms``: the hand-written numpy parser of ``islkeras.serving.protocol`` against orjson /
   the json module + ``np.asarray`` on the same 512 x 512 body (why the hand-written parser stays).
3. ``trickle``: 64 connections trickling request headers (one byte each every 0.5 s, bounded to
   ``--trickle-s``) while the ``json_row`` request is repeated; its p50 during / before.
4. Soak: 1,000 small ``:predict`` requests (64 x 64) from 4 client threads, a new connection every 10
   requests; the server's RSS (``/proc/<pid>/status``) after a warm-up and at the end.

    python benchmarks/serve.py                      # plain U-Net, 32 filters, depth 4 (~2-3 min)
    python benchmarks/serve.py --model runs/x/<stamp>   # a real run's SavedModel
    python benchmarks/serve.py --repeats 10 --soak 300  # quicker

Targets (issue 15): TF Serving JSON p50 <= 1.20 x in-process, V2 binary <= 1.05 x; RSS growth over the
soak < 20 MB; with 64 trickling clients connected, the normal request within 2 x its usual p50.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")

import islkeras  # noqa: E402,F401  (tf-keras before TensorFlow)
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path)

META = {"kind": "isl", "inputs": ["bf"], "targets": ["nuc"], "input_dtype": "uint8",
        "normalization": {"method": "zscore", "percentiles": [1, 99.8], "input_dataset": None},
        "target_scale": {"offset": [10.0], "scale": [5.0]}}


def pct(values, q):
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 1)


def stats(values) -> dict:
    return {"p50_ms": pct(values, 50), "p95_ms": pct(values, 95), "n": len(values)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def build_base(base: Path, model_path, filters: int, depth: int) -> Path:
    from islkeras.models.savedmodel import copy_savedmodel, export_savedmodel

    dst = base / "bench" / "1"
    if model_path:
        copy_savedmodel(model_path, dst)
        return dst
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(0)
    model = build_generator(ModelConfig(architecture="unet", unet_filters=filters, unet_depth=depth), 1, 1)
    export_savedmodel(model, dst, META)
    return dst


def start_server(base: Path, log: Path):
    f = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "islkeras.cli", "serve", str(base), "--port", "0",
                             "--max-body-mb", "256", "--max-queue", "64"], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", log.read_text())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready:\n{log.read_text()}")


_CLIENT_COST = """
import json, sys, time, numpy as np
x = np.load(sys.argv[1]); reply = open(sys.argv[2], "rb").read()
enc, dec = [], []
for _ in range(5):
    t = time.perf_counter(); json.dumps({"instances": x.tolist()}).encode(); enc.append(time.perf_counter() - t)
    t = time.perf_counter(); np.asarray(json.loads(reply)["predictions"], np.float32); dec.append(time.perf_counter() - t)
print(json.dumps({"encode_request": round(float(np.median(enc)) * 1000, 1),
                  "decode_reply": round(float(np.median(dec)) * 1000, 1)}))
"""


def client_json_costs(x: np.ndarray, reply: bytes) -> dict:
    """A client's JSON encode/decode time, measured in a fresh process without TensorFlow (in this one, TF's
    spinning worker threads slow pure-Python work down several times right after a model call)."""
    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "x.npy", x)
        (Path(d) / "reply.json").write_bytes(reply)
        out = subprocess.run([sys.executable, "-c", _CLIENT_COST, str(Path(d) / "x.npy"), str(Path(d) / "reply.json")],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def post(conn, path: str, body: bytes, ctype: str = "application/json", headers=None, want_headers=False):
    conn.request("POST", path, body=body, headers={"Content-Type": ctype, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: {resp.status} {data[:300]!r}")
    if want_headers:
        return data, resp.getheader("Server-Timing", ""), resp
    return data, resp.getheader("Server-Timing", "")


def v2_binary_body(x: np.ndarray) -> tuple[bytes, dict]:
    """A KServe V2 infer body with the binary tensor data extension, and its header."""
    dtype = {"uint8": "UINT8", "uint16": "UINT16", "float32": "FP32"}[x.dtype.name]
    head = json.dumps({"inputs": [{"name": "image", "datatype": dtype, "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "prediction", "parameters": {"binary_data": True}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def v2_decode(data: bytes, resp) -> np.ndarray:
    n = int(resp.getheader("Inference-Header-Content-Length"))
    out = json.loads(data[:n])["outputs"][0]
    return np.frombuffer(data[n:], np.float32).reshape(out["shape"])


def parse_costs(body: bytes, spec) -> dict:
    """ms to turn the JSON body into the checked uint8 batch: the numpy parser vs the libraries."""
    import orjson

    from islkeras.serving.protocol import _check_and_cast, parse_predict_request

    def t(fn, n=5):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return round(float(np.median(out)) * 1000, 1)

    specs = {"serving_default": spec}
    res = {"numpy_parser": t(lambda: _check_and_cast(parse_predict_request(body, specs)[2], spec, None)),
           "orjson_loads_np_asarray": t(lambda: _check_and_cast(
               np.asarray(orjson.loads(body)["instances"]), spec, None)),
           "json_module_np_asarray": t(lambda: _check_and_cast(
               parse_predict_request(body, specs, fast=False)[2], spec, None))}
    res["orjson_over_numpy_parser"] = round(res["orjson_loads_np_asarray"] / res["numpy_parser"], 1)
    return res


def still_open(sock) -> bool:
    """The server has neither answered nor closed this connection."""
    import socket

    try:
        sock.recv(1, socket.MSG_PEEK)  # a non-blocking socket (see trickle)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def trickle(port: int, n: int, seconds: float, stop: threading.Event, opened: list) -> None:
    """``n`` connections sending request headers one byte each every 0.5 s, for at most ``seconds``."""
    import socket

    data = b"POST /v1/models/bench:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n" + b"X-Pad: " + \
        b"a" * 200 + b"\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    for s in socks:
        s.setblocking(False)
    opened.extend(socks)
    t0 = time.monotonic()
    for i in range(len(data)):
        if stop.is_set() or time.monotonic() - t0 > seconds:
            break
        for s in socks:
            try:
                s.send(data[i:i + 1])
            except OSError:
                pass
        stop.wait(0.5)
    for s in socks:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run folder or SavedModel to serve (default: a fresh plain U-Net)")
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--soak", type=int, default=1000)
    ap.add_argument("--tricklers", type=int, default=64)
    ap.add_argument("--trickle-s", type=float, default=20.0, help="longest trickle (the server's deadline is 60 s)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import tifffile

    from islkeras.models.savedmodel import ExportedModel

    from islkeras.utils import keep_large_buffers

    keep_large_buffers()  # what `islkeras serve` does at start, so the in-process baseline gets it too
    tmp = Path(tempfile.mkdtemp(prefix="islkeras-bench-serve-"))
    sm = build_base(tmp / "models", args.model, args.filters, args.depth)
    model = ExportedModel(sm)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, args.size, args.size, model.n_inputs)).astype(model.input_dtype)
    proc, port = start_server(tmp / "models", tmp / "serve.log")
    result = {"model": args.model or f"plain U-Net filters={args.filters} depth={args.depth} (random weights)",
              "image": list(x.shape), "input_dtype": str(model.input_dtype), "cpu_count": os.cpu_count(),
              "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
              "v2_datatype": {"uint8": "UINT8", "uint16": "UINT16", "float32": "FP32"}[str(model.input_dtype)]}
    try:
        # ---- warm-up and correctness of both routes
        path, tpath = "/v1/models/bench:predict", "/v1/models/bench:predict_tiff"
        t = time.perf_counter()
        body = json.dumps({"instances": x.tolist()}).encode()
        result["client_encode_ms"] = round((time.perf_counter() - t) * 1000, 1)
        buf = io.BytesIO()
        tifffile.imwrite(buf, x[0, ..., 0] if model.n_inputs == 1 else x[0])
        tiff = buf.getvalue()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for _ in range(3):
            want = model.predict_raw(x)
            data, _ = post(conn, path, body)
            tdata, _ = post(conn, tpath, tiff, "image/tiff")
        got = np.asarray(json.loads(data)["predictions"], np.float32)
        result["max_abs_diff_json_vs_in_process"] = float(np.max(np.abs(got - want)))
        got = tifffile.imread(io.BytesIO(tdata))
        result["max_abs_diff_tiff_vs_in_process"] = float(np.max(np.abs(got.reshape(want.shape) - want)))
        result["client_json_ms_in_a_process_without_tf"] = client_json_costs(x, data)
        result["request_bytes"] = {"json": len(body), "tiff": len(tiff)}
        result["reply_bytes"] = {"json": len(data), "tiff": len(tdata)}

        # ---- V2 binary (http.client and tritonclient): correctness first
        import tritonclient.http as tc

        vpath = "/v2/models/bench/infer"
        vbody, vheaders = v2_binary_body(x)
        tclient = tc.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
        tinput = tc.InferInput("image", list(x.shape), result["v2_datatype"])
        tinput.set_data_from_numpy(x)
        toutput = tc.InferRequestedOutput("prediction", binary_data=True)
        for _ in range(2):
            vdata, _, vresp = post(conn, vpath, vbody, "application/octet-stream", vheaders, want_headers=True)
            tgot = tclient.infer("bench", [tinput], outputs=[toutput]).as_numpy("prediction")
        result["max_abs_diff_v2_binary_vs_in_process"] = float(np.max(np.abs(v2_decode(vdata, vresp) - want)))
        result["max_abs_diff_v2_tritonclient_vs_in_process"] = float(np.max(np.abs(tgot - want)))
        result["request_bytes"]["v2_binary"] = len(vbody)
        result["reply_bytes"]["v2_binary"] = len(vdata)

        # ---- interleaved (in-process, JSON, V2, tritonclient, TIFF) so all see the same machine load
        times = {k: [] for k in ("in_process", "json_row", "json_row_decoded", "v2_binary", "v2_binary_tritonclient",
                                 "tiff")}
        stages = {k: [] for k in ("json", "v2", "tiff")}

        def timing(header):
            return dict((k, float(v)) for k, v in re.findall(r"(\w+);dur=([\d.]+)", header))

        for _ in range(args.repeats):
            t = time.perf_counter()
            model.predict_raw(x)
            times["in_process"].append(time.perf_counter() - t)

            t = time.perf_counter()
            data, header = post(conn, path, body)
            times["json_row"].append(time.perf_counter() - t)
            np.asarray(json.loads(data)["predictions"], np.float32)
            times["json_row_decoded"].append(time.perf_counter() - t)
            stages["json"].append(timing(header))

            t = time.perf_counter()
            vdata, header, vresp = post(conn, vpath, vbody, "application/octet-stream", vheaders, want_headers=True)
            v2_decode(vdata, vresp)
            times["v2_binary"].append(time.perf_counter() - t)
            stages["v2"].append(timing(header))

            t = time.perf_counter()
            tclient.infer("bench", [tinput], outputs=[toutput]).as_numpy("prediction")
            times["v2_binary_tritonclient"].append(time.perf_counter() - t)

            t = time.perf_counter()
            data, header = post(conn, tpath, tiff, "image/tiff")
            tifffile.imread(io.BytesIO(data))
            times["tiff"].append(time.perf_counter() - t)
            stages["tiff"].append(timing(header))
        for k, v in times.items():
            result[k] = stats(v)
        for k, st in stages.items():
            result[f"{k}_server_stages_p50_ms"] = {s: round(float(np.median([t[s] for t in st])), 1) for s in st[0]}
        p50 = result["in_process"]["p50_ms"]
        routes = [k for k in times if k != "in_process"]
        result["ratio_p50"] = {k: round(result[k]["p50_ms"] / p50, 2) for k in routes}
        # per-repetition ratios (robust to load drifting during the run)
        result["ratio_p50_paired"] = {k: round(float(np.median(np.asarray(times[k]) / np.asarray(times["in_process"]))),
                                               3) for k in routes}

        # ---- the JSON parser against the libraries
        from islkeras.serving.protocol import InputSpec

        result["json_parse_ms"] = parse_costs(body, InputSpec("serving_default", "image", np.dtype(model.input_dtype),
                                                              (None, None, None, model.n_inputs), "prediction"))

        # ---- 64 trickling clients connected: the normal JSON request meanwhile
        stop, opened = threading.Event(), []
        th = threading.Thread(target=trickle, args=(port, args.tricklers, args.trickle_s, stop, opened))
        th.start()
        while len(opened) < args.tricklers and th.is_alive():
            time.sleep(0.05)
        time.sleep(1.0)
        during = []
        t_end = time.monotonic() + args.trickle_s - 3
        while len(during) < args.repeats and time.monotonic() < t_end:
            t = time.perf_counter()
            post(conn, path, body)
            during.append(time.perf_counter() - t)
        connected = sum(map(still_open, opened))
        stop.set()
        th.join(30)
        result["trickle"] = {"tricklers": args.tricklers, "connected_while_measuring": connected,
                             "json_row_during": stats(during), "json_row_usual_p50_ms": result["json_row"]["p50_ms"],
                             "ratio_p50": round(float(np.median(during)) / float(np.median(times["json_row"])), 2)}
        tclient.close()
        conn.close()

        # ---- soak
        small = rng.integers(0, 256, (1, 64, 64, model.n_inputs)).astype(model.input_dtype)
        sbody = json.dumps({"instances": small.tolist()}).encode()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(20):
            post(c, path, sbody)
        c.close()
        rss0 = rss_mb(proc.pid)
        errors, lat = [], []
        n_threads = 4

        def client(n):
            conn = None
            try:
                for i in range(n):
                    if i % 10 == 0:
                        if conn:
                            conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    t = time.perf_counter()
                    post(conn, path, sbody)
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            finally:
                if conn:
                    conn.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(args.soak // n_threads,)) for _ in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rss1 = rss_mb(proc.pid)
        result["soak"] = {"requests": len(lat), "errors": len(errors), "seconds": round(time.perf_counter() - t0, 1),
                          "latency": stats(lat), "rss_before_mb": rss0, "rss_after_mb": rss1,
                          "rss_growth_mb": round(rss1 - rss0, 1)}
        if errors:
            result["soak"]["first_error"] = errors[0]
        result["targets"] = {"json_row_p50_le_1.2x": result["ratio_p50_paired"]["json_row"] <= 1.2,
                             "v2_binary_p50_le_1.05x": result["ratio_p50_paired"]["v2_binary"] <= 1.05,
                             "soak_rss_growth_lt_20mb": result["soak"]["rss_growth_mb"] < 20,
                             "trickle_normal_client_le_2x": result["trickle"]["ratio_p50"] <= 2.0}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]
    emit(result, args.out, indent=2)


if __name__ == "__main__":
    main()
