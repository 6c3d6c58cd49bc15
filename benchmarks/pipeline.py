"""Input pipeline throughput on the aiseg-nuclei shards; prints one JSON object.

    /work/venv/bin/python benchmarks/pipeline.py [--seconds 4] [--records DIR] [--skip-unet]

Measures, on the same machine and in the same run:

* ``raw_records_per_s``: plain ``tf.data.TFRecordDataset`` iteration over the train shards (bytes only,
  no parsing) -- the upper limit for anything that reads every record;
* ``pipeline[...]``: augmented crops/s of ``islkeras.data.pipeline.make_dataset`` (random crop, z-score
  from the stored statistics, one of 8 symmetries, shuffle, batch) for 256 and 512 crops, with one crop per
  record read, with ``crops_per_field`` 4, and with the decoded-record cache off (every crop re-reads and
  decodes its record);
* ``naive_crops_per_s``: a loader that reads the two TIFFs with tifffile for every crop, computes the
  field's z-score statistics with numpy, crops and rotates/flips with numpy;
* ``unet_crops_per_s``: crops/s a DenseNet121 U-Net (segmentation-models, random init) consumes in training
  at batch 4, 256x256 (Adam, MAE), after warm-up.

Targets (issue 2): pipeline 256 one-crop-per-record >= 0.5x raw records/s, >= 3x naive, >= 20x U-Net.
"""
from __future__ import annotations

import argparse
import json
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

PROJECT = Path(__file__).resolve().parents[1]


def rate(iterator, n_per_item, seconds, warmup):
    """Items/s of an iterator: ``warmup`` items first, then as many as fit in ``seconds``."""
    it = iter(iterator)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    while True:
        next(it)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * n_per_item / dt


def raw_records(files, seconds):
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(files).repeat()
    return rate(ds, 1, seconds, warmup=len(files))


def pipeline_rate(cfg, manifest, crop, crops_per_field, cache, seconds, batch=8):
    from islkeras.data.pipeline import make_dataset

    cfg.pipeline.crop_size = crop
    cfg.pipeline.crops_per_field = crops_per_field
    cfg.pipeline.cache = cache
    ds = make_dataset(cfg, "train", True, manifest, batch_size=batch)
    n_train = manifest["counts"]["train"]
    warm = -(-n_train * crops_per_field // batch) + 2  # one full pass: the cache is filled
    return rate(ds, batch, seconds, warmup=warm)


def naive_rate(cfg, manifest, crop, seconds):
    import tifffile

    root = Path(cfg.data.root)
    names = [n for n, f in manifest["fields"].items() if f["split"] == "train"]
    rng = np.random.default_rng(0)

    def gen():
        while True:
            n = names[rng.integers(len(names))]
            x = tifffile.imread(root / n / "brightfield.tif").astype(np.float32)
            y = tifffile.imread(root / n / "nuclei.tif").astype(np.float32)
            x = (x - x.mean()) / max(x.std(), 1e-6)
            y = (y - y.mean()) / max(y.std(), 1e-6)
            y0, x0 = rng.integers(0, x.shape[0] - crop + 1), rng.integers(0, x.shape[1] - crop + 1)
            xy = np.stack([x[y0:y0 + crop, x0:x0 + crop], y[y0:y0 + crop, x0:x0 + crop]], -1)
            k = rng.integers(8)
            xy = np.rot90(xy, k % 4)
            if k >= 4:
                xy = xy[:, ::-1]
            yield np.ascontiguousarray(xy)

    return rate(gen(), 1, seconds, warmup=2)


def unet_rate(steps=4, batch=4, size=256):
    import segmentation_models as sm
    import tensorflow as tf

    model = sm.Unet("densenet121", encoder_weights=None, input_shape=(None, None, 1), classes=1, activation="linear")
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mae")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 1)).astype(np.float32)
    y = rng.standard_normal((batch, size, size, 1)).astype(np.float32)
    for _ in range(2):
        model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    dt = time.perf_counter() - t0
    return steps * batch / dt, dt / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(PROJECT / "experiments" / "aiseg_nuclei_l1.json"))
    ap.add_argument("--records", default=None, help="records folder (default: a temporary folder)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure")
    ap.add_argument("--skip-unet", action="store_true")
    args = ap.parse_args(argv)

    import tensorflow as tf

    from islkeras.config import load_config
    from islkeras.data.reader import shard_paths
    from islkeras.data.records import convert

    tmp = None
    records = args.records
    if records is None:
        tmp = tempfile.TemporaryDirectory(prefix="islkeras-bench-")
        records = tmp.name
    cfg = load_config(args.config, overrides={"data.records": records})
    t0 = time.perf_counter()
    manifest = convert(cfg)
    convert_s = time.perf_counter() - t0
    files = shard_paths(cfg, manifest, "train")
    s = args.seconds

    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__},
           "data": {"config": Path(args.config).name, "train_records": manifest["counts"]["train"],
                    "record_bytes": int(np.mean([sh["bytes"] / len(sh["records"]) for sh in manifest["shards"]])),
                    "convert_seconds": round(convert_s, 2)}}
    raw = raw_records(files, s)
    out["raw_records_per_s"] = round(raw, 1)
    pipe = {}
    for crop in (256, 512):
        pipe[f"{crop}_1_per_record"] = round(pipeline_rate(cfg, manifest, crop, 1, True, s), 1)
    pipe["256_4_per_record"] = round(pipeline_rate(cfg, manifest, 256, 4, True, s), 1)
    pipe["256_1_per_record_nocache"] = round(pipeline_rate(cfg, manifest, 256, 1, False, s), 1)
    pipe["512_1_per_record_nocache"] = round(pipeline_rate(cfg, manifest, 512, 1, False, s), 1)
    out["pipeline_crops_per_s"] = pipe
    out["naive_crops_per_s"] = {"256": round(naive_rate(cfg, manifest, 256, s), 1),
                                "512": round(naive_rate(cfg, manifest, 512, s), 1)}
    main_rate = pipe["256_1_per_record"]
    ratios = {
        "pipeline256_vs_raw_records": round(main_rate / raw, 2),
        "pipeline256_nocache_vs_raw_records": round(pipe["256_1_per_record_nocache"] / raw, 2),
        "pipeline256_vs_naive256": round(main_rate / out["naive_crops_per_s"]["256"], 1),
        "pipeline512_vs_naive512": round(pipe["512_1_per_record"] / out["naive_crops_per_s"]["512"], 1),
    }
    if not args.skip_unet:
        unet, step_s = unet_rate()
        out["unet_densenet121_b4_256"] = {"crops_per_s": round(unet, 2), "seconds_per_step": round(step_s, 3)}
        ratios["pipeline256_vs_unet"] = round(main_rate / unet, 1)
    out["ratios"] = ratios
    targets = {"vs_raw>=0.5": ratios["pipeline256_vs_raw_records"] >= 0.5,
               "vs_naive>=3": ratios["pipeline256_vs_naive256"] >= 3}
    if "pipeline256_vs_unet" in ratios:
        targets["vs_unet>=20"] = ratios["pipeline256_vs_unet"] >= 20
    out["targets_met"] = targets
    print(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
