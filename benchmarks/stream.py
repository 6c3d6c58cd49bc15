"""Streamed prediction (OME-Zarr in -> tiles -> OME-Zarr out): peak memory vs field size, and throughput
against the in-memory path.

    python benchmarks/stream.py [--sizes 4096 8192 16384] [--compare 4096] [--plain-unet | --backbone B]
        [--tile 512] [--overlap 64] [--batch 4] [--out FILE]

Prints one JSON object. Fields: synthetic OME-Zarr images (uint8, 1024^2 chunks) made by tiling the real
aiseg bright-field fov_002 (random pixels without the shared data), written band by band, so the parent never
holds one whole. Each measurement runs in a fresh subprocess that loads the model and warms it up on one
batch of the grid's tiles (so TensorFlow and the tile activations are in the baseline), then:

* ``streamed``: ``islkeras.inference.streaming.predict_streamed`` from the OME-Zarr input into an OME-Zarr
  output; ``rss_peak`` is the process's peak RSS (``getrusage``), ``rss_peak_growth`` its rise over the peak
  after warm-up. Issue 16's target: peak RSS flat within 10% from 4096^2 to 16384^2.
* ``in_memory`` (at ``--compare``): the whole field read into memory, ``predict_field``, the prediction
  written as the same OME-Zarr image - the path ``islkeras predict`` takes for a TIFF.
  ``throughput_ratio`` = in-memory Mpx/s / streamed Mpx/s (issue 16's target: <= 1.15).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import islkeras  # noqa: E402,F401  (selects tf-keras first)
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402
from predict import export_model  # noqa: E402  (the same model builder as the predict benchmark)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_input(path: Path, size: int) -> Path:
    from islkeras.data.chunked import OmeZarrWriter
    from islkeras.utils import shared_data_dir

    f = shared_data_dir() / "aiseg-nuclei" / "fov_002" / "brightfield.tif"
    if f.is_file():
        import tifffile

        base = tifffile.imread(f)
    else:
        base = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8)
    w = OmeZarrWriter(path, size, size, ["brightfield"], (0.65, 0.65), chunk=1024, dtype="uint8")
    band = np.tile(base, (1, -(-size // base.shape[1])))[:, :size]
    for y in range(0, size, base.shape[0]):
        w.write(y, 0, band[: min(base.shape[0], size - y), :, None])
    return w.finish()


def child(model_dir: str, src: str, out: str, mode: str, tile: int, overlap: int, batch: int) -> dict:
    from islkeras.data.chunked import open_ome_zarr, write_ome_zarr
    from islkeras.inference.streaming import ZarrSource, predict_streamed
    from islkeras.inference.tiling import grid_plan, predict_field
    from islkeras.models.savedmodel import ExportedModel

    em = ExportedModel(model_dir)
    lazy = open_ome_zarr(src)
    h, w = lazy.height, lazy.width
    g = grid_plan(h, w, tile, overlap, batch)
    warm = np.zeros((g.batch, g.rows.tile, g.cols.tile, 1), np.float32)
    em.predict_normalized(warm)
    em.predict_normalized(warm)
    rss_warm = peak_rss()
    t0 = time.perf_counter()
    if mode == "streamed":
        predict_streamed(em, ZarrSource(lazy, [(0, [0], 0, "none")]), out, ["nuclei"], tile, overlap, batch)
        t_read = None
    else:
        image = lazy.region(0, [0], 0, 0, h, 0, w)
        t_read = time.perf_counter() - t0
        pred = predict_field(em, image, tile, overlap, batch)
        write_ome_zarr(out, pred, ["nuclei"], lazy.pixel_size_um)
    wall = time.perf_counter() - t0
    return {"mode": mode, "size": h, "grid": f"{len(g.rows.starts)} x {len(g.cols.starts)} of "
            f"{g.rows.tile} x {g.cols.tile}", "wall_s": round(wall, 2), "read_s": t_read and round(t_read, 2),
            "mpx_per_s": round(h * w / 1e6 / wall, 3), "rss_after_warmup": rss_warm, "rss_peak": peak_rss(),
            "rss_peak_growth": peak_rss() - rss_warm, "field_bytes": h * w}


def run_child(model_dir, src, out, mode, a) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(model_dir), str(src), str(out), "--tile", str(a.tile),
           "--overlap", str(a.overlap), "--batch", str(a.batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"mode": mode, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--compare", type=int, default=4096, help="size at which the in-memory path is timed too")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--plain-unet", action="store_true", help="plain U-Net (16 filters, depth 4) instead")
    ap.add_argument("--repeats", type=int, default=1, help="streamed / in-memory pairs at --compare")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[1], a.child[2], a.child[3], a.child[0], a.tile, a.overlap, a.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="islkeras-stream-") as tmp:
        tmp = Path(tmp)
        model_dir = export_model(tmp / "savedmodel", a.backbone, a.plain_unet)
        res = {"benchmark": "stream", "model": "plain unet 16x4" if a.plain_unet else f"unet_sm/{a.backbone}",
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
               "streamed": [], "compare": []}
        for s in a.sizes:
            src = make_input(tmp / f"in_{s}.ome.zarr", s)
            if s == a.compare:
                for _ in range(a.repeats):  # alternate so machine load hits both alike
                    for mode in ("in_memory", "streamed"):
                        r = run_child(model_dir, src, tmp / f"out_{s}_{mode}.ome.zarr", mode, a)
                        res["compare"].append(r)
            r = run_child(model_dir, src, tmp / f"out_{s}.ome.zarr", "streamed", a)
            res["streamed"].append(r)
            import shutil

            shutil.rmtree(src, ignore_errors=True)
            for p in tmp.glob("out_*"):
                shutil.rmtree(p, ignore_errors=True)
        ok = [r for r in res["streamed"] if "error" not in r]
        if len(ok) >= 2:
            peaks = [r["rss_peak"] for r in ok]
            res["rss_peak_max_over_min"] = round(max(peaks) / min(peaks), 3)
        mem = [r for r in res["compare"] if r.get("mode") == "in_memory" and "error" not in r]
        st = [r for r in res["compare"] if r.get("mode") == "streamed" and "error" not in r]
        if mem and st:
            res["throughput_ratio"] = round(max(r["mpx_per_s"] for r in mem) / max(r["mpx_per_s"] for r in st), 3)
            res["in_memory_rss_peak_over_streamed"] = round(mem[0]["rss_peak"] / st[0]["rss_peak"], 3)
        res["targets"] = {"rss_peak_max_over_min": 1.10, "throughput_ratio": 1.15}
        res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        emit(res, a.out)


if __name__ == "__main__":
    main()
