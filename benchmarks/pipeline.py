"""Input pipeline throughput on the aiseg-nuclei shards; prints one JSON object.

    .venv/bin/python benchmarks/pipeline.py [--seconds 4] [--records DIR] [--skip-unet]
                                            [--big-fields 64] [--big-size 2048] [--big-dir /tmp]

Measures, on the same machine and in the same run:

* ``raw_records_per_s``: plain ``tf.data.TFRecordDataset`` iteration over the train shards (bytes only,
  no parsing) -- the upper limit for anything that reads every record;
* ``pipeline[...]``: augmented crops/s of ``islkeras.data.pipeline.make_dataset`` (random crop, z-score
  from the stored statistics, one of 8 symmetries, shuffle, batch) for 256 and 512 crops, with one crop per
  record read, with ``crops_per_field`` 4, and with the decoded-record cache off (every crop re-reads and
  decodes its record);
* ``naive_crops_per_s``: a loader that reads the two TIFFs with tifffile for every crop, computes the
  field's z-score statistics with numpy, crops and rotates/flips with numpy;
* ``big``: the uncached path (issue 16 part 3) on a synthetic training set of ``--big-fields`` fields of
  ``--big-size``^2 uint16 x 2 channels (64 x 2048^2: 1 GiB of records, written to a temporary folder
  under ``--big-dir`` and deleted afterwards): ``raw_records_per_s`` of those shards (plain and 4 parallel
  reads), uncached crops/s (1 and 4 crops per record read) and cached, ``uncached_vs_raw`` (1 crop per
  record), the stage profile, and ``peak_rss_growth_mib`` of the pipeline in fresh processes over a quarter
  and all of the set (the cache grows with the set, the uncached path must not); ``--big-fields 0`` skips it.
  The figures a ratio compares are measured side by side in turns (``--rounds``): the machine is shared;
* ``unet_crops_per_s``: crops/s a DenseNet121 U-Net (segmentation-models, random init) consumes in training
  at batch 4, 256x256 (Adam, MAE), after warm-up.

Targets (issue 2): pipeline 256 one-crop-per-record >= 0.5x raw records/s, >= 3x naive, >= 20x U-Net.
Targets (issue 16 part 3): uncached (``pipeline.cache: false``) 256 one-crop-per-record >= 0.5x the raw read of
the same records (``uncached_vs_raw``, aiseg and big), still >= 20x the U-Net; cached unchanged.
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


def interleaved(streams, seconds, rounds):
    """Items/s of several iterators measured in turns: ``rounds`` rounds, each giving every stream
    ``seconds / rounds``; the median per stream. The machine is shared (other jobs come and go), so the
    figures a ratio compares are taken side by side, not minutes apart. ``streams``: name -> (iterator,
    items per element), already warmed up."""
    samples = {k: [] for k in streams}
    for _ in range(rounds):
        for k, (it, n_per) in streams.items():
            n, t0 = 0, time.perf_counter()
            while True:
                next(it)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= seconds / rounds:
                    break
            samples[k].append(n * n_per / dt)
    return {k: round(float(np.median(v)), 1) for k, v in samples.items()}


def warmed(ds, warmup):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    return it


def raw_iter(files, parallel=None):
    import tensorflow as tf

    return warmed(tf.data.TFRecordDataset(files, num_parallel_reads=parallel).repeat(), len(files))


def pipeline_iter(cfg, manifest, crop, crops_per_field, cache, batch=8, warm=None):
    from islkeras.data.pipeline import make_dataset

    cfg.pipeline.crop_size = crop
    cfg.pipeline.crops_per_field = crops_per_field
    cfg.pipeline.cache = cache
    if warm is None:
        warm = -(-manifest["counts"]["train"] * crops_per_field // batch) + 2  # one full pass: cache filled
    return warmed(make_dataset(cfg, "train", True, manifest, batch_size=batch), warm)


def stages(files, manifest, inputs, targets, seconds, rounds, crop=256):
    """Records/s of the uncached path's stages one by one (profile): plain read, + parse_single_example of
    the used channels, + decode_raw/reshape, + one random crop (the cached path's decoding), or + one random
    crop decoded from its rows only (the uncached path's ``cut_rows``); measured side by side, no shuffle."""
    import tensorflow as tf

    chans = manifest["channels"]
    used = list(dict.fromkeys(list(inputs) + list(targets)))
    spec = {f"ch/{c}": tf.io.FixedLenFeature([], tf.string) for c in used}
    spec.update(height=tf.io.FixedLenFeature([], tf.int64), width=tf.io.FixedLenFeature([], tf.int64))

    def parse(raw):
        return tf.io.parse_single_example(raw, spec)

    def decode(ex):
        hw = [tf.cast(ex["height"], tf.int32), tf.cast(ex["width"], tf.int32)]
        return tuple(tf.reshape(tf.io.decode_raw(ex[f"ch/{c}"], tf.dtypes.as_dtype(chans[c]["dtype"])),
                           hw + [chans[c]["planes"]]) for c in used)

    def cut(*arrs):
        y0 = tf.random.uniform([], 0, tf.shape(arrs[0])[0] - crop + 1, tf.int32)
        x0 = tf.random.uniform([], 0, tf.shape(arrs[0])[1] - crop + 1, tf.int32)
        return tuple(a[y0:y0 + crop, x0:x0 + crop] for a in arrs)

    def rows(ex):  # the uncached path: only the crop's rows decoded (islkeras.data.streams.cut_rows)
        from islkeras.data.streams import cut_rows

        h, w = tf.cast(ex["height"], tf.int32), tf.cast(ex["width"], tf.int32)
        y0 = tf.random.uniform([1], 0, h - crop + 1, tf.int32)
        x0 = tf.random.uniform([1], 0, w - crop + 1, tf.int32)
        return tuple(cut_rows(tf, ex[f"ch/{c}"], chans[c]["dtype"], chans[c]["planes"], w, y0, x0, crop)
                     for c in used)

    auto = tf.data.AUTOTUNE
    base = lambda: tf.data.TFRecordDataset(files).repeat()  # noqa: E731
    n = len(files)
    its = {"read": (warmed(base(), n), 1),
           "read_parse": (warmed(base().map(parse, auto), n), 1),
           "read_parse_decode": (warmed(base().map(parse, auto).map(decode, auto), n), 1),
           "read_parse_decode_crop": (warmed(base().map(parse, auto).map(decode, auto).map(cut, auto), n), 1),
           "read_parse_crop_rows_only": (warmed(base().map(parse, auto).map(rows, auto), n), 1)}
    return interleaved(its, seconds * len(its) / 2, rounds)


def pipeline_rate(cfg, manifest, crop, crops_per_field, cache, seconds, batch=8, warm=None):
    from islkeras.data.pipeline import make_dataset

    cfg.pipeline.crop_size = crop
    cfg.pipeline.crops_per_field = crops_per_field
    cfg.pipeline.cache = cache
    ds = make_dataset(cfg, "train", True, manifest, batch_size=batch)
    n_train = manifest["counts"]["train"]
    if warm is None:
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


def write_big(root: Path, n_fields: int, size: int) -> None:
    """``n_fields`` fields f000... of (size, size) uint16 input and target (target = input / 2 plus noise:
    the pipeline does not care about the content, only the bytes)."""
    import tifffile

    from islkeras.utils import progress

    rng = np.random.default_rng(0)
    for i in progress(range(n_fields), desc="big fields", unit="field"):
        d = root / f"f{i:03d}"
        d.mkdir(parents=True)
        inp = rng.integers(100, 4000, (size, size), dtype=np.uint16)
        tifffile.imwrite(d / "inp.tif", inp)
        tifffile.imwrite(d / "tgt.tif", (inp // 2 + rng.integers(0, 50, (size, size), dtype=np.uint16)))


def big_cfg(tmp: Path):
    from islkeras.config import from_dict

    return from_dict({"name": "big", "data": {
        "root": str(tmp / "data"), "fields": "f*",
        "channels": {"inp": {"file": "inp.tif"}, "tgt": {"file": "tgt.tif"}}, "inputs": ["inp"], "targets": ["tgt"],
        "split": {"fractions": {"train": 1.0}}, "records": str(tmp / "rec"), "shard_size": 8},
        "pipeline": {"normalization": "zscore", "shuffle_buffer": 64, "crop_size": 256}}, base_dir=tmp)


def memory_child(tmp: str, cache: bool, n_fields: int, seconds: float) -> dict:
    """In a fresh process (``--memory-child``): peak RSS growth (VmHWM after - before) while the training
    pipeline over the first ``n_fields`` big-set fields runs ``seconds`` (cached: several passes)."""
    from islkeras.data.pipeline import make_dataset
    from islkeras.data.records import ensure_records

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    cfg = big_cfg(Path(tmp))
    cfg.pipeline.cache = cache
    manifest = ensure_records(cfg)
    ds = make_dataset(cfg, "train", True, manifest, batch_size=8, fields=sorted(manifest["fields"])[:n_fields])
    h0 = hwm()
    it, t0 = iter(ds), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
    return {"peak_rss_growth_mib": round(hwm() - h0, 1)}


def memory(tmp: Path, n_fields: int, seconds: float) -> dict:
    import subprocess

    out = {}
    for cache in (False, True):
        for n in (max(1, n_fields // 4), n_fields):
            r = subprocess.run([sys.executable, __file__, "--memory-child", str(tmp), str(int(cache)), str(n),
                                str(seconds)], capture_output=True, text=True, check=True)
            key = f"{'cached' if cache else 'uncached'}_{n}_fields"
            out[key] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]
    return out


def big_set(args, seconds):
    """Uncached vs raw on records far larger than the aiseg shards (see the module docstring)."""
    from islkeras.data.reader import shard_paths
    from islkeras.data.records import convert

    with tempfile.TemporaryDirectory(prefix="islkeras-bench-big-", dir=args.big_dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_big(tmp / "data", args.big_fields, args.big_size)
        cfg = big_cfg(tmp)
        manifest = convert(cfg)
        files = shard_paths(cfg, manifest, "train")
        nbytes = sum(Path(f).stat().st_size for f in files)
        out = {"fields": args.big_fields, "size": args.big_size, "records_gib": round(nbytes / 2 ** 30, 2),
               "record_mib": round(nbytes / len(manifest["fields"]) / 2 ** 20, 1),
               "prepare_seconds": round(time.perf_counter() - t0, 1)}
        b = 8
        its = {"raw": (raw_iter(files), 1), "raw_parallel4": (raw_iter(files, 4), 1)}
        its["256_1_per_record_nocache"] = (pipeline_iter(cfg, manifest, 256, 1, False, batch=b, warm=8), b)
        its["256_4_per_record_nocache"] = (pipeline_iter(cfg, manifest, 256, 4, False, batch=b, warm=8), b)
        its["256_1_per_record"] = (pipeline_iter(cfg, manifest, 256, 1, True, batch=b), b)
        got = interleaved(its, 2 * seconds, args.rounds)
        raw = got.pop("raw")
        out["raw_records_per_s"] = raw
        out["raw_parallel4_records_per_s"] = got.pop("raw_parallel4")
        out["pipeline_crops_per_s"] = got
        out["uncached_vs_raw"] = round(got["256_1_per_record_nocache"] / raw, 2)
        out["uncached_vs_raw_parallel4"] = round(got["256_1_per_record_nocache"]
                                                 / out["raw_parallel4_records_per_s"], 2)
        out["uncached_vs_cached"] = round(got["256_1_per_record_nocache"] / got["256_1_per_record"], 2)
        out["stages_records_per_s"] = stages(files, manifest, ["inp"], ["tgt"], seconds, args.rounds)
        del its
        # peak RSS growth in fresh processes over a quarter / all of the set: the cache grows with the set,
        # the uncached path does not
        out["peak_rss_growth_mib"] = memory(tmp, args.big_fields, max(2 * seconds, 6.0))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(PROJECT / "experiments" / "aiseg_nuclei_l1.json"))
    ap.add_argument("--records", default=None, help="records folder (default: a temporary folder)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--memory-child", nargs=4, metavar=("DIR", "CACHE", "FIELDS", "SECONDS"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5, help="turns of the side-by-side measurements")
    ap.add_argument("--big-fields", type=int, default=64, help="fields of the synthetic big set (0: skip it)")
    ap.add_argument("--big-size", type=int, default=2048, help="side of a big-set field (uint16, 2 channels)")
    ap.add_argument("--big-dir", default=None, help="parent of the big set's temporary folder (default: $TMPDIR)")
    args = ap.parse_args(argv)
    if args.memory_child:
        d, cache, n, secs = args.memory_child
        print(json.dumps(memory_child(d, cache == "1", int(n), float(secs))))
        return 0

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
    # the figures the targets compare, measured side by side (see interleaved)
    its = {"raw": (raw_iter(files), 1), "256_1_per_record": (pipeline_iter(cfg, manifest, 256, 1, True), 8),
           "256_1_per_record_nocache": (pipeline_iter(cfg, manifest, 256, 1, False), 8)}
    paired = interleaved(its, 3 * s, args.rounds)
    del its
    raw = paired["raw"]
    out["raw_records_per_s"] = raw
    out["stages_records_per_s"] = stages(files, manifest, cfg.data.inputs, cfg.data.targets, s, args.rounds)
    pipe = {}
    pipe["256_1_per_record"] = paired["256_1_per_record"]
    pipe["512_1_per_record"] = round(pipeline_rate(cfg, manifest, 512, 1, True, s), 1)
    pipe["256_4_per_record"] = round(pipeline_rate(cfg, manifest, 256, 4, True, s), 1)
    pipe["256_1_per_record_nocache"] = paired["256_1_per_record_nocache"]
    pipe["512_1_per_record_nocache"] = round(pipeline_rate(cfg, manifest, 512, 1, False, s), 1)
    pipe["256_4_per_record_nocache"] = round(pipeline_rate(cfg, manifest, 256, 4, False, s), 1)
    out["pipeline_crops_per_s"] = pipe
    out["naive_crops_per_s"] = {"256": round(naive_rate(cfg, manifest, 256, s), 1),
                                "512": round(naive_rate(cfg, manifest, 512, s), 1)}
    main_rate = pipe["256_1_per_record"]
    ratios = {
        "pipeline256_vs_raw_records": round(main_rate / raw, 2),
        "pipeline256_nocache_vs_raw_records": round(pipe["256_1_per_record_nocache"] / raw, 2),
        "uncached_vs_raw": round(pipe["256_1_per_record_nocache"] / raw, 2),
        "pipeline256_vs_naive256": round(main_rate / out["naive_crops_per_s"]["256"], 1),
        "pipeline512_vs_naive512": round(pipe["512_1_per_record"] / out["naive_crops_per_s"]["512"], 1),
    }
    if not args.skip_unet:
        unet, step_s = unet_rate()
        out["unet_densenet121_b4_256"] = {"crops_per_s": round(unet, 2), "seconds_per_step": round(step_s, 3)}
        ratios["pipeline256_vs_unet"] = round(main_rate / unet, 1)
        ratios["pipeline256_nocache_vs_unet"] = round(pipe["256_1_per_record_nocache"] / unet, 1)
    if args.big_fields > 0:
        out["big"] = big_set(args, s)
        ratios["big_uncached_vs_raw"] = out["big"]["uncached_vs_raw"]
        if "unet_densenet121_b4_256" in out:
            ratios["big_uncached_vs_unet"] = round(out["big"]["pipeline_crops_per_s"]["256_1_per_record_nocache"]
                                                   / out["unet_densenet121_b4_256"]["crops_per_s"], 1)
    out["ratios"] = ratios
    targets = {"vs_raw>=0.5": ratios["pipeline256_vs_raw_records"] >= 0.5,
               "vs_naive>=3": ratios["pipeline256_vs_naive256"] >= 3,
               "uncached_vs_raw>=0.5": ratios["uncached_vs_raw"] >= 0.5}
    if "big_uncached_vs_raw" in ratios:
        targets["big_uncached_vs_raw>=0.5"] = ratios["big_uncached_vs_raw"] >= 0.5
    if "pipeline256_vs_unet" in ratios:
        targets["vs_unet>=20"] = ratios["pipeline256_vs_unet"] >= 20
        targets["uncached_vs_unet>=20"] = ratios["pipeline256_nocache_vs_unet"] >= 20
    out["targets_met"] = targets
    print(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
