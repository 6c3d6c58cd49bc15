"""Training throughput: the real `islkeras fit` path against bare `model.fit` on crops in memory.

For each loss kind the same model (built by ``islkeras.training.fit.build_training_model``, same seed) is
trained twice, interleaved ``--repeats`` times:

* ``fit_path``: records -> ``make_dataset(cfg, "train", training=True)`` (decode, random crops, per-field
  normalisation, augmentation, shuffle, prefetch) -> ``model.fit`` with the callbacks ``islkeras fit``
  uses (learning-rate schedule/best-weights control, history.csv, TensorBoard scalars, BackupAndRestore);
* ``bare``: ``model.fit`` on the same crops held in memory (taken from that pipeline beforehand:
  ``Dataset.from_tensor_slices(arrays).batch(B).repeat()``), no callbacks.

Each run is ``1 + --epochs`` epochs of ``--steps`` steps; the first epoch (tracing, warm-up) is not
timed. Reported: median steps/s of the training steps of each path and ``ratio = bare / fit_path``
(1.0 = no overhead), and apart from it the seconds spent at each epoch's end (``epoch_end_s``: for the
fit path the checkpoint, history, TensorBoard and the BatchNorm re-estimation that precedes validation;
validation itself is not run).

    python benchmarks/train_step.py                                  # aiseg_nuclei_l1 as configured
    python benchmarks/train_step.py --kinds l1 --steps 30 --out bench.json
    python benchmarks/train_step.py --set model.backbone=resnet18 --set pipeline.crop_size=128
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
import islkeras  # noqa: E402,F401  (selects tf-keras)
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path)

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


def make_timers():
    """(head, tail) callbacks: head (first in the list) times the training steps of each epoch, from
    on_epoch_begin to the last on_train_batch_end; tail (last) marks when every on_epoch_end has run, so
    the per-epoch work (checkpoint, history, BatchNorm recalibration) is measured apart from the steps."""
    import tensorflow as tf

    class Head(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # no per-step sync to numpy caused by the timer itself
            self.steps, self.last = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.steps.append(self.last - self.t0)

    class Tail(tf.keras.callbacks.Callback):
        def __init__(self, head):
            super().__init__()
            self.head, self.epoch_end = head, []

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_end.append(time.perf_counter() - self.head.last)

    head = Head()
    return head, Tail(head)


def main():
    args = parse()
    import numpy as np
    import tensorflow as tf

    from islkeras.config import load_config, parse_set_option
    from islkeras.data.pipeline import make_dataset
    from islkeras.data.records import ensure_records
    from islkeras.training.callbacks import BatchNormRecalibration, EpochTensorBoard, HistoryCSV, TrainingControl
    from islkeras.training.fit import BN_RECALIBRATION_STEPS, build_training_model

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

        def run(path: str):
            tf.keras.backend.clear_session()
            tf.keras.utils.set_random_seed(t.seed)
            model, gen = build_training_model(cfg, n_in, n_out)
            head, tail = make_timers()
            if path == "bare":
                mem = tf.data.Dataset.from_tensor_slices((X, Y)).batch(t.batch_size, drop_remainder=True)
                model.fit(mem.repeat().prefetch(2), steps_per_epoch=steps, epochs=total, verbose=0,
                          callbacks=[head, tail])
            else:
                d = Path(tempfile.mkdtemp(dir=tmp))
                ds = make_dataset(cfg, "train", training=True, manifest=manifest)
                recal = make_dataset(cfg, "train", training=True, manifest=manifest)
                cbs = [BatchNormRecalibration(gen, recal, steps=BN_RECALIBRATION_STEPS),
                       TrainingControl(gen, d / "ckpt" / "state.json", d / "ckpt" / "best_weights.h5",
                                       epochs=total, steps_per_epoch=steps, monitor="loss",
                                       lr_schedule=t.lr_schedule, max_minutes=None),
                       HistoryCSV(d / "history.csv"), EpochTensorBoard(d / "tb"),
                       tf.keras.callbacks.BackupAndRestore(str(d / "ckpt" / "backup"))]
                model.fit(ds, steps_per_epoch=steps, epochs=total, verbose=0, callbacks=[head, *cbs, tail])
            return steps * args.epochs / sum(head.steps[1:]), statistics.mean(tail.epoch_end[1:])

        sps = {"fit_path": [], "bare": []}
        epoch_end = {"fit_path": [], "bare": []}
        for r in range(args.repeats):
            for path in (("fit_path", "bare") if r % 2 == 0 else ("bare", "fit_path")):
                v, e = run(path)
                sps[path].append(v), epoch_end[path].append(e)
                print(f"{kind:10s} {path:8s} {v:.3f} steps/s, {e:.2f} s per epoch end", file=sys.stderr, flush=True)
        fit_sps, bare_sps = statistics.median(sps["fit_path"]), statistics.median(sps["bare"])
        result["kinds"][kind] = {
            "fit_path_steps_per_s": round(fit_sps, 4), "bare_steps_per_s": round(bare_sps, 4),
            "ratio_bare_over_fit_path": round(bare_sps / fit_sps, 3),
            "all": {k: [round(v, 4) for v in vs] for k, vs in sps.items()},
            "epoch_end_s": {k: round(statistics.median(v), 2) for k, v in epoch_end.items()},
            "batch_size": t.batch_size, "crop_size": cfg.pipeline.crop_size,
            "model": cfg.model.architecture + (f"/{cfg.model.backbone}" if cfg.model.architecture == "unet_sm" else ""),
        }
    result["loadavg_after"] = os.getloadavg()[0]
    emit(result, args.out, indent=2)


if __name__ == "__main__":
    main()
