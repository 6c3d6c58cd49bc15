"""``islkeras serve`` latency and memory; prints one JSON object.

1. Latency of a 512 x 512 predict over HTTP (server in a subprocess on a free loopback port) against
   calling the same SavedModel in-process (``ExportedModel.predict_raw``): p50/p95 for
   * ``json_row``: ``:predict`` with ``{"instances": ...}``, the body encoded once beforehand (the client's
     encoding is reported separately), timed until the whole reply is received;
   * ``json_row_decoded``: the same plus the client's ``json.loads`` + ``np.asarray`` of the reply (in this
     process, where TensorFlow's spinning threads slow it down; ``client_json_ms_in_a_process_without_tf``
     gives a plain client's encode/decode cost);
   * ``tiff``: ``:predict_tiff`` with the field's TIFF bytes (one 512 tile, same network call);
   and the server's own stage times (``Server-Timing``: parse, queue, model, encode). The three are
   interleaved per repetition so they see the same machine load; ``ratio_p50_paired`` is the median of
   the per-repetition ratios (what the targets use), ``ratio_p50`` the ratio of the p50s.
2. Soak: 1,000 small ``:predict`` requests (64 x 64) from 4 client threads, a new connection every 10
   requests; the server's RSS (``/proc/<pid>/status``) after a warm-up and at the end.

    python benchmarks/serve.py                      # plain U-Net, 32 filters, depth 4 (~1-2 min)
    python benchmarks/serve.py --model runs/x/<stamp>   # a real run's SavedModel
    python benchmarks/serve.py --repeats 10 --soak 300  # quicker

Targets (issue 6): p50 over HTTP <= 1.2 x in-process; RSS growth over the soak < 50 MB.
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


def post(conn, path: str, body: bytes, ctype: str = "application/json"):
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: {resp.status} {data[:300]!r}")
    return data, resp.getheader("Server-Timing", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run folder or SavedModel to serve (default: a fresh plain U-Net)")
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--soak", type=int, default=1000)
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
              "load_average_at_start": [round(v, 1) for v in os.getloadavg()]}
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

        # ---- interleaved (in-process, JSON, TIFF) so the three see the same machine load
        t_in, t_raw, t_dec, t_tiff, j_stages, t_stages = [], [], [], [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.predict_raw(x)
            t_in.append(time.perf_counter() - t)

            t = time.perf_counter()
            data, timing = post(conn, path, body)
            t_raw.append(time.perf_counter() - t)
            np.asarray(json.loads(data)["predictions"], np.float32)
            t_dec.append(time.perf_counter() - t)
            j_stages.append(dict((k, float(v)) for k, v in re.findall(r"(\w+);dur=([\d.]+)", timing)))

            t = time.perf_counter()
            data, timing = post(conn, tpath, tiff, "image/tiff")
            tifffile.imread(io.BytesIO(data))
            t_tiff.append(time.perf_counter() - t)
            t_stages.append(dict((k, float(v)) for k, v in re.findall(r"(\w+);dur=([\d.]+)", timing)))
        conn.close()
        result["in_process"] = stats(t_in)
        result["json_row"] = stats(t_raw)
        result["json_row_decoded"] = stats(t_dec)
        result["tiff"] = stats(t_tiff)
        for key, st in (("json_server_stages_p50_ms", j_stages), ("tiff_server_stages_p50_ms", t_stages)):
            result[key] = {k: round(float(np.median([t[k] for t in st])), 1) for k in st[0]}
        p50 = result["in_process"]["p50_ms"]
        result["ratio_p50"] = {k: round(result[k]["p50_ms"] / p50, 2) for k in ("json_row", "json_row_decoded", "tiff")}
        # per-repetition ratios (robust to load drifting during the run)
        result["ratio_p50_paired"] = {k: round(float(np.median(np.asarray(v) / np.asarray(t_in))), 2)
                                      for k, v in (("json_row", t_raw), ("json_row_decoded", t_dec), ("tiff", t_tiff))}

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
                             "tiff_p50_le_1.2x": result["ratio_p50_paired"]["tiff"] <= 1.2,
                             "soak_rss_growth_lt_50mb": result["soak"]["rss_growth_mb"] < 50}
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
