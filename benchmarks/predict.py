"""Tiled whole-field prediction: overhead over the bare network, and peak memory vs field size.

    python benchmarks/predict.py [--sizes 2048 4096] [--tile 512] [--overlap 64] [--batch 4] [--repeats 2]
        [--mem-sizes 2048 4096] [--backbone densenet121 | --plain-unet] [--skip-memory] [--no-whole]

Prints one JSON object. Model: segmentation-models U-Net with a DenseNet121 encoder, random init, 1 input
and 1 output channel, exported with ``islkeras.models.savedmodel.export_savedmodel`` and loaded as an
``ExportedModel``. Field: real aiseg bright-field (fov_002, 1024^2 uint8) tiled to the size asked for
(random uint8 when the shared data is missing).

* ``timing``: ``islkeras.inference.tiling.predict_field`` at the default settings on a field of each of
  ``--sizes`` (whole-field normalisation, reflection padding, the tile grid of ``grid_plan``, blending,
  mapping to the target scale), against (a) one bare forward pass (``ExportedModel.predict_normalized``)
  over the WHOLE padded field at once (``ratio_vs_whole_field``; issue 16's target <= 1.15; reported as
  not run when the whole field does not fit) and (b) the bare forward passes over the same tiles in the
  same batches (``ratio_vs_same_tiles``: the overhead of tiling itself). ``computed_pixels_over_field_pixels``
  is what the grid computes (issue 16: <= 1.15). One warm-up of each, then runs alternate (bare, tiled,
  whole, bare...) so machine load hits all alike; ratios of the minima. ``tiled_outside_network_s`` is the
  time ``predict_field`` spends outside the network (normalising, padding, cutting tiles, blending,
  scaling) -- the load-independent overhead.
* ``memory``: one fresh subprocess per size. It loads the model and warms up on one batch of tiles (so the
  network's activation memory for a batch of tiles is in the peak), then predicts the field. Reported:
  ``field_bytes`` (the raw image), ``tracemalloc_peak`` (numpy/Python allocations during ``predict_field``:
  field-sized arrays plus one batch of tiles), ``rss_peak`` (process peak RSS, ``getrusage``; includes
  TensorFlow, the model and the tile activations) and ``rss_peak_growth`` (peak after prediction minus
  peak after warm-up: 0 when the field's arrays fit in memory the allocator already holds).
  ``memory_scaling`` compares the largest and smallest size: the growth of tracemalloc peak and of
  RSS peak against the growth of the image's bytes and of the whole-field activations one forward pass
  of the entire field would need (``activation_bytes_per_pixel`` x pixels, measured on the warm-up).
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

PROJECT = Path(__file__).resolve().parents[1]
META = {
    "kind": "isl", "inputs": ["brightfield"], "targets": ["nuclei"], "input_dtype": "uint8",
    "normalization": {"method": "zscore", "percentiles": [1.0, 99.8]},
    "target_scale": {"offset": [12.0], "scale": [20.0]},
}


def export_model(out: Path, backbone: str, plain: bool) -> Path:
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(0)
    mc = ModelConfig(architecture="unet", unet_filters=16, unet_depth=4) if plain else \
        ModelConfig(architecture="unet_sm", backbone=backbone, encoder_weights=None)
    return export_savedmodel(build_generator(mc, 1, 1), out, META)


def make_field(size: int) -> np.ndarray:
    from islkeras.utils import shared_data_dir

    f = shared_data_dir() / "aiseg-nuclei" / "fov_002" / "brightfield.tif"
    if f.is_file():
        import tifffile

        base = tifffile.imread(f)
        reps = -(-size // base.shape[0])
        return np.ascontiguousarray(np.tile(base, (reps, reps))[:size, :size])
    return np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ timing
def timing(model_dir: Path, size: int, tile: int, overlap: int, batch: int, repeats: int, whole: bool = True) -> dict:
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.inference.tiling import grid_plan, predict_field

    em = ExportedModel(model_dir)
    field = make_field(size)
    grid = grid_plan(size, size, tile, overlap, batch)
    rows, cols, n_tiles = grid.rows, grid.cols, grid.n_tiles
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((min(grid.batch, n_tiles - b), rows.tile, cols.tile, 1), np.float32)
               for b in range(0, n_tiles, grid.batch)]
    whole_x = rng.standard_normal((1, rows.size, cols.size, 1), np.float32)

    def bare():
        for b in batches:
            em.predict_normalized(b)

    def bare_whole():  # one forward pass over the whole (padded) field: the reference of issue 16
        em.predict_normalized(whole_x)

    in_model = [0.0]
    forward = em.predict_normalized

    def timed_forward(b):  # time spent inside the network during predict_field
        t0 = time.perf_counter()
        out = forward(b)
        in_model[0] += time.perf_counter() - t0
        return out

    def tiled():
        em.predict_normalized = timed_forward
        try:
            predict_field(em, field, tile=tile, overlap=overlap, batch=batch)
        finally:
            em.predict_normalized = forward

    runs = [("bare", bare, []), ("tiled", tiled, [])]
    whole_error = None
    if whole:
        try:
            bare_whole()
            runs.append(("whole", bare_whole, []))
        except Exception as e:  # the whole field does not fit: the minimal tiling is the reference
            whole_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    bare()
    tiled()  # warm-up (graph/kernels, allocator)
    outside = []
    for _ in range(repeats):
        for name, fn, acc in runs:
            in_model[0] = 0.0
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
            if name == "tiled":
                outside.append(acc[-1] - in_model[0])
    t = {k: acc for k, _, acc in runs}
    res = {
        "size": size, "tile": tile, "overlap": overlap, "batch": batch,
        "grid": f"{len(rows.starts)} x {len(cols.starts)} tiles of {rows.tile} x {cols.tile}, {grid.batch} per pass",
        "n_tiles": n_tiles,
        "computed_pixels_over_field_pixels": round(grid.computed_pixels() / size ** 2, 3),
        "bare_forward_same_tiles_s": [round(x, 3) for x in t["bare"]],
        "tiled_predict_s": [round(x, 3) for x in t["tiled"]],
        "ratio_vs_same_tiles": round(min(t["tiled"]) / min(t["bare"]), 3),
        "tiled_outside_network_s": [round(x, 3) for x in outside],
        "outside_network_fraction": round(float(np.median(outside) / np.median(t["tiled"])), 4),
        "target_ratio": 1.15,
    }
    if "whole" in t:
        res["bare_forward_whole_field_s"] = [round(x, 3) for x in t["whole"]]
        res["ratio_vs_whole_field"] = round(min(t["tiled"]) / min(t["whole"]), 3)
    else:
        res["whole_field_pass"] = whole_error or "skipped"
    return res


# ------------------------------------------------------------------------------------------ memory
def memory_child(model_dir: str, size: int, tile: int, overlap: int, batch: int) -> dict:
    import tracemalloc

    from islkeras.models.savedmodel import ExportedModel
    from islkeras.inference.tiling import predict_field

    em = ExportedModel(model_dir)
    before_warm = rss_bytes()
    warm = np.random.default_rng(0).standard_normal((batch, tile, tile, 1), np.float32)
    em.predict_normalized(warm)
    em.predict_normalized(warm)
    warm_peak = peak_rss_bytes()
    activation_per_px = max(warm_peak - before_warm, 0) / (batch * tile * tile)
    field = make_field(size)
    tracemalloc.start()
    pred = predict_field(em, field, tile=tile, overlap=overlap, batch=batch)
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after_peak = peak_rss_bytes()
    assert pred.shape == (size, size, 1)
    return {
        "size": size, "field_bytes": int(field.nbytes), "output_bytes": int(pred.nbytes),
        "rss_after_warmup": warm_peak, "rss_peak": after_peak,
        "rss_peak_growth": max(after_peak - warm_peak, 0), "tracemalloc_peak": int(tm_peak),
        "rss_growth_per_image_byte": round(max(after_peak - warm_peak, 0) / field.nbytes, 2),
        "tracemalloc_peak_per_image_byte": round(tm_peak / field.nbytes, 2),
        "activation_bytes_per_pixel": round(activation_per_px, 1),
        "whole_field_activation_estimate": int(activation_per_px * size * size),
    }


def memory(model_dir: Path, sizes, tile, overlap, batch) -> list:
    out = []
    for s in sizes:
        cmd = [sys.executable, __file__, "--child-memory", str(model_dir), "--size", str(s), "--tile", str(tile),
               "--overlap", str(overlap), "--batch", str(batch)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            out.append({"size": s, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="field size of the memory child")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="field sizes timed")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mem-sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--plain-unet", action="store_true", help="plain U-Net (16 filters, depth 4) instead")
    ap.add_argument("--model", default=None, help="an exported SavedModel to use instead of building one")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-field reference pass")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_memory:
        print(json.dumps(memory_child(a.child_memory, a.size, a.tile, a.overlap, a.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="islkeras-bench-") as tmp:
        t0 = time.perf_counter()
        model_dir = Path(a.model) if a.model else export_model(Path(tmp) / "savedmodel", a.backbone, a.plain_unet)
        export_s = time.perf_counter() - t0
        import tensorflow as tf

        res = {
            "benchmark": "predict", "model": "plain unet 16x4" if a.plain_unet else f"unet_sm/{a.backbone} (random init)",
            "machine": {"python": platform.python_version(), "tensorflow": tf.__version__, "cpus": os.cpu_count(),
                        "gpus": len(tf.config.list_physical_devices("GPU")),
                        "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
            "export_s": round(export_s, 1),
        }
        if not a.skip_timing:
            res["timing"] = [timing(model_dir, s, a.tile, a.overlap, a.batch, a.repeats, not a.no_whole)
                             for s in a.sizes]
        if not a.skip_memory:
            res["memory"] = memory(model_dir, a.mem_sizes, a.tile, a.overlap, a.batch)
            ok = [m for m in res["memory"] if "error" not in m]
            if len(ok) >= 2:
                lo, hi = ok[0], ok[-1]
                res["memory_scaling"] = {
                    "sizes": [lo["size"], hi["size"]],
                    "field_bytes_ratio": round(hi["field_bytes"] / lo["field_bytes"], 2),
                    "tracemalloc_peak_ratio": round(hi["tracemalloc_peak"] / max(lo["tracemalloc_peak"], 1), 2),
                    "rss_peak_diff_bytes": hi["rss_peak"] - lo["rss_peak"],
                    "field_bytes_diff": hi["field_bytes"] - lo["field_bytes"],
                    "whole_field_activation_estimate_diff": hi["whole_field_activation_estimate"]
                    - lo["whole_field_activation_estimate"],
                }
        res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
