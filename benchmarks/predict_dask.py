"""`islkeras predict` on Dask workers: fields/s of the serial loop vs a LocalCluster of 1 and 2 worker processes.

    .venv/bin/python benchmarks/predict_dask.py [--fields 16] [--size 512] [--workers 1 2] [--out FILE]

Prints one JSON object. Model: a plain U-Net (16 filters, depth 4, random init), exported with
``export_savedmodel``. Fields: ``--fields`` synthetic ``--size``^2 uint8 TIFFs. Every mode runs the same
per-field body (``islkeras.inference.fields.predict_one``: read, tiled prediction with the default tile and
overlap, atomic TIFF write):

* ``serial``: this process, the loop of ``islkeras predict`` without Dask; run before and after the Dask runs,
  the faster of the two is the reference (the machine's load drifts).
* ``workers_N``: ``islkeras.inference.distributed.local_cluster(N)`` + ``run_fields``, as ``--workers N``.
  Each worker's TensorFlow gets cores // N op threads (``tf_intra_op_threads_per_worker``).
  ``cluster_start_s`` (processes up, TensorFlow imported in them) and ``model_load_s`` (each worker loading
  the SavedModel, in parallel, done before timing) are reported apart from ``predict_s``.

``fields_per_s`` = fields / ``predict_s``; ``ratio_vs_serial`` = fields_per_s / serial fields_per_s;
``end_to_end_s`` = cluster start + model load + predict, what one ``islkeras predict --workers N`` costs.
On 2 cores shared with other work the ratios measure Dask's overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import islkeras  # noqa: E402,F401  (selects tf-keras first)
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402

META = {
    "kind": "isl", "inputs": ["brightfield"], "targets": ["nuclei"], "input_dtype": "uint8",
    "normalization": {"method": "zscore", "percentiles": [1.0, 99.8]},
    "target_scale": {"offset": [12.0], "scale": [20.0]},
}


def setup(base: Path, n: int, size: int):
    import tensorflow as tf
    import tifffile

    from islkeras.config import ModelConfig
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(0)
    model = export_savedmodel(build_generator(ModelConfig(architecture="unet", unet_filters=16, unet_depth=4), 1, 1),
                              base / "savedmodel", META)
    src = base / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        tifffile.imwrite(src / f"field_{i:03d}.tif", rng.integers(0, 255, (size, size), dtype=np.uint8))
    return model, src


def job(model, src, out):
    from islkeras.inference.distributed import model_info
    from islkeras.inference.fields import FieldSettings, find_inputs, input_specs, output_names, unique_names

    em = model_info(model)
    specs = input_specs(em)
    items = find_inputs([src], specs)
    settings = FieldSettings(out=out, specs=specs, labels=tuple(output_names(em.meta)))
    return em, items, unique_names(items), settings


def run_serial(model, src, out) -> dict:
    from islkeras.inference.fields import predict_one
    from islkeras.models.savedmodel import ExportedModel

    info, items, names, settings = job(model, src, out)
    t0 = time.perf_counter()
    em = ExportedModel(info.path)
    t1 = time.perf_counter()
    results = [predict_one(em, it, nm, settings) for it, nm in zip(items, names)]
    t2 = time.perf_counter()
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    return {"model_load_s": round(t1 - t0, 3), "predict_s": round(t2 - t1, 3),
            "fields_per_s": round(len(items) / (t2 - t1), 3)}


def run_workers(model, src, out, n: int) -> dict:
    from islkeras.inference.distributed import _model, local_cluster, run_fields

    info, items, names, settings = job(model, src, out)
    t0 = time.perf_counter()
    with local_cluster(n) as client:
        client.wait_for_workers(n)
        client.run(lambda: __import__("tensorflow").constant(0).numpy())  # TF imported in every worker
        t1 = time.perf_counter()
        client.run(lambda p: type(_model(p)).__name__, str(info.path))  # every worker loads the model once
        t2 = time.perf_counter()
        results = run_fields(client, info.path, items, names, settings, lambda item, res: None)
        t3 = time.perf_counter()
        threads = sorted(set(client.run(lambda: os.environ.get("TF_NUM_INTRAOP_THREADS", "all cores")).values()))
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]
    return {"cluster_start_s": round(t1 - t0, 3), "model_load_s": round(t2 - t1, 3), "predict_s": round(t3 - t2, 3),
            "fields_per_s": round(len(items) / (t3 - t2), 3), "end_to_end_s": round(t3 - t0, 3),
            "tf_intra_op_threads_per_worker": threads}


def same_outputs(a: Path, b: Path) -> float:
    import tifffile

    return max(float(np.abs(tifffile.imread(f) - tifffile.imread(b / f.name)).max()) for f in sorted(a.glob("*.tif")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="predict_dask_") as tmp:
        base = Path(tmp)
        model, src = setup(base, args.fields, args.size)
        serial = [run_serial(model, src, base / "serial_a")]
        modes = {f"workers_{n}": run_workers(model, src, base / f"w{n}", n) for n in args.workers}
        serial.append(run_serial(model, src, base / "serial_b"))
        ref = max(s["fields_per_s"] for s in serial)
        for n, m in zip(args.workers, modes.values()):
            m["ratio_vs_serial"] = round(m["fields_per_s"] / ref, 3)
            m["max_abs_diff_vs_serial"] = same_outputs(base / f"w{n}", base / "serial_a")
        result = {
            "benchmark": "predict_dask", "fields": args.fields, "size": args.size, "model": "unet 16 filters depth 4",
            "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "serial": {"runs": serial, "fields_per_s": ref}, **modes,
        }
        if len(args.workers) > 1:
            a, b = (f"workers_{n}" for n in args.workers[:2])
            result[f"ratio_{b}_vs_{a}"] = round(modes[b]["fields_per_s"] / modes[a]["fields_per_s"], 3)
    emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
