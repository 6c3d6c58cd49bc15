"""Training throughput: the real `islkeras fit` path against bare `model.fit` on crops in memory.

For each loss kind the same model (built by ``islkeras.training.fit.build_training_model``, same seed) is
trained twice, interleaved ``--repeats`` times:

* ``fit_path``: records -> ``make_dataset(cfg, "train", training=True)`` (decode, random crops, per-field
  normalisation, augmentation, shuffle, prefetch) -> ``model.fit`` with the callbacks ``islkeras fit``
  uses (learning-rate schedule/best-weights control, history.csv, TensorBoard scalars, BackupAndRestore);
* ``bare``: ``model.fit(x, y, batch_size=B)`` on numpy arrays of crops taken from that pipeline
  beforehand, no callbacks.

Each run is ``1 + --epochs`` epochs of ``--steps`` steps; the first epoch (tracing, warm-up) is not
timed. Reported: median steps/s of each path and ``ratio = bare / fit_path`` (1.0 = no overhead).

    python benchmarks/train_step.py                                  # aiseg_nuclei_l1 as configured
    python benchmarks/train_step.py --kinds l1 --steps 30 --out bench.json
    python benchmarks/train_step.py --set model.backbone=resnet18 --set pipeline.crop_size=128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
import islkeras  # noqa: E402,F401  (selects tf-keras)

PROJECT = Path(__file__).resolve().parents[1]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(PROJECT / "experiments" / "aiseg_nuclei_l1.json"))
    p.add_argument("--kinds", nargs="+", default=["l1", "pix2pix", "perceptual"])
    p.add_argument("--steps", type=int, default=15, help="timed steps per epoch")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per run (after one warm-up epoch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args()


class EpochTimer:
    def __init__(self):
        import tensorflow as tf

        class _T(tf.keras.callbacks.Callback):
            def __init__(s):
                super().__init__()
                s.times = []

            def on_epoch_begin(s, epoch, logs=None):
                s.t0 = time.perf_counter()

            def on_epoch_end(s, epoch, logs=None):
                s.times.append(time.perf_counter() - s.t0)

        self.cb = _T()


def main():
    args = parse()
    import numpy as np
    import tensorflow as tf

    from islkeras.config import load_config, parse_set_option
    from islkeras.data.pipeline import make_dataset
    from islkeras.data.records import ensure_records
    from islkeras.training.callbacks import EpochTensorBoard, HistoryCSV, TrainingControl
    from islkeras.training.fit import build_training_model

    base_sets = parse_set_option(args.sets)
    result = {"config": args.config, "sets": base_sets, "steps": args.steps, "epochs": args.epochs,
              "repeats": args.repeats, "loadavg_before": os.getloadavg()[0], "kinds": {}}
    tmp = Path(tempfile.mkdtemp(prefix="islkeras_bench_"))
    for kind in args.kinds:
        sets = dict(base_sets, **{"loss.kind": kind})
        if kind == "perceptual":
            sets.setdefault("loss.vgg_weights", None)  # offline: random VGG19 costs the same
        cfg = load_config(args.config, overrides=sets)
        t = cfg.training
        manifest = ensure_records(cfg)
        n_in = sum(manifest["channels"][c]["planes"] for c in cfg.data.inputs)
        n_out = sum(manifest["channels"][c]["planes"] for c in cfg.data.targets)
        steps, total = args.steps, 1 + args.epochs
        # the crops bare fit gets: taken from the same pipeline, held in memory
        xs, ys = [], []
        for x, y in make_dataset(cfg, "train", training=True, manifest=manifest).take(steps):
            xs.append(x.numpy()), ys.append(y.numpy())
        X, Y = np.concatenate(xs), np.concatenate(ys)

        def run(path: str) -> float:
            tf.keras.backend.clear_session()
            tf.keras.utils.set_random_seed(t.seed)
            model, gen = build_training_model(cfg, n_in, n_out)
            timer = EpochTimer().cb
            if path == "bare":
                model.fit(X, Y, batch_size=t.batch_size, epochs=total, shuffle=False, verbose=0, callbacks=[timer])
            else:
                d = Path(tempfile.mkdtemp(dir=tmp))
                ds = make_dataset(cfg, "train", training=True, manifest=manifest)
                cbs = [TrainingControl(gen, d / "ckpt" / "state.json", d / "ckpt" / "best_weights.h5",
                                       epochs=total, steps_per_epoch=steps, monitor="loss",
                                       lr_schedule=t.lr_schedule, max_minutes=None),
                       HistoryCSV(d / "history.csv"), EpochTensorBoard(d / "tb"),
                       tf.keras.callbacks.BackupAndRestore(str(d / "ckpt" / "backup"))]
                model.fit(ds, steps_per_epoch=steps, epochs=total, verbose=0, callbacks=[timer, *cbs])
            return steps * args.epochs / sum(timer.times[1:])

        sps = {"fit_path": [], "bare": []}
        for r in range(args.repeats):
            for path in (("fit_path", "bare") if r % 2 == 0 else ("bare", "fit_path")):
                sps[path].append(run(path))
                print(f"{kind:10s} {path:8s} {sps[path][-1]:.3f} steps/s", file=sys.stderr, flush=True)
        fit_sps, bare_sps = statistics.median(sps["fit_path"]), statistics.median(sps["bare"])
        result["kinds"][kind] = {
            "fit_path_steps_per_s": round(fit_sps, 4), "bare_steps_per_s": round(bare_sps, 4),
            "ratio_bare_over_fit_path": round(bare_sps / fit_sps, 3),
            "all": {k: [round(v, 4) for v in vs] for k, vs in sps.items()},
            "batch_size": t.batch_size, "crop_size": cfg.pipeline.crop_size,
            "model": cfg.model.architecture + (f"/{cfg.model.backbone}" if cfg.model.architecture == "unet_sm" else ""),
        }
    result["loadavg_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
