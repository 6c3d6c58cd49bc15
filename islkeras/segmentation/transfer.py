"""``islkeras transfer CONFIG``: nuclei segmentation initialised from an in silico labeling (ISL) model.

The pretext task (bright-field -> nuclear fluorescence) and the segmentation task (bright-field -> nucleus
mask) share everything but the meaning of the last layer, so the segmentation network is the ISL
generator's architecture with a one-channel **sigmoid** output, trained with the soft Jaccard distance
(``1 - soft IoU``, ``islkeras.training.losses.JaccardDistance``).

Initialisation (``transfer.init``)
----------------------------------
The ISL SavedModel is reloaded as a Keras model (``tf.keras.models.load_model(..., compile=False)``; the
exporter saves the Keras generator), a fresh segmentation model of the same architecture is built with
``islkeras.models.unet.build_generator`` from the ISL run's ``config.json`` (``model`` section) and the
weights are copied layer by layer -- layers are paired in order (nested models flattened) and must agree
in class and weight shapes, otherwise the transfer stops before training with the first mismatch.

* ``all_calibrated`` (the default; "all layers, head re-activated"): every layer is copied, the head too,
  and the head is re-activated for the sigmoid. The ISL head outputs the predicted *normalised*
  fluorescence ``z`` (z-score units of the nuclei channel); a nucleus mask is, to a first approximation,
  ``z > t`` for some level ``t``. The head is rescaled to ``logit = slope * (z - t)``
  (``W' = slope * W``, ``b' = slope * (b - t)``) with ``t`` chosen on the annotated train fields (the level
  whose ``z > t`` has the best mean IoU with their masks) and ``slope`` such that the median pixel
  (background) starts at ``p = sigmoid(-6)`` (``transfer.calibration_slope`` fixes it instead). The slope
  matters because the units of ``z`` depend on the ISL normalisation: a slope that suits z-scores
  (background near 0, nuclei at 5-10) leaves percentile-scaled predictions (background 0.01, nuclei about
  1) at p ~ 0.45 over the whole field, and a near-step head makes every update of the body flip pixels;
  from either start one-field runs collapsed to "no nucleus anywhere" for several epochs (runs 1 and 2 in
  docs/transfer_results.md). So training
  starts from "thresholded ISL prediction", which already segments nuclei of every kind the ISL model saw
  in its (unannotated, 18-field) training data, and the few masks only correct it. Why: the head is the
  one layer whose *meaning* is known (nuclear intensity), so throwing it away (``all_but_head``) discards
  the most task-relevant part of the pretext model (in a one-field comparison during development it
  did better than ``all_but_head``; that comparison was not repeated in the final setup, whose runs are
  in docs/transfer_results.md).
* ``all``: the head copied and re-activated as is, i.e. ``sigmoid(z)``: the 0.5 level sits at ``z = 0``
  (the field's mean intensity, i.e. the background), so the start is "everything a little brighter than
  average is a nucleus" and small updates flip whole backgrounds; kept for comparison only.
* ``all_but_head``: every layer but the head (the last weight-carrying layer, the 1x1 ``final_conv``),
  which starts from its random initialisation; the thesis's classic fine-tuning.

``transfer.isl_learning_rate`` (ISL-initialised runs only; default ``training.learning_rate``): fine-tuning
rate. Adam moves every weight by about the learning rate per step whatever its gradient, so the rate that
trains a random network in a few hundred steps (1e-3) also scrambles pretrained filters in the first
steps; a lower rate keeps them.

``transfer.freeze_batchnorm`` (ISL-initialised runs only): BatchNormalization layers keep the ISL model's
moving statistics and run in inference mode while fine-tuning. With one annotated field the batch
statistics come from crops of a single field; letting the moving averages drift to them made the model
fail on every other field (val IoU collapsed in the first epoch), freezing them keeps the statistics of
all the ISL training fields. Scratch runs have no statistics to keep and always train BatchNorm.

``transfer.keep_start`` (``all_calibrated`` only, default on): the calibrated start -- the thresholded ISL
prediction, before any segmentation training -- is scored on the whole val and test fields
(``start_val_iou``/``start_test_iou`` in ``summary.json``), and when no epoch beats its val IoU the start
itself is exported (``kept_start``). With one annotated field fine-tuning can do worse on new fields than
the start (the thresholded ISL model saw all the unannotated training fields); model selection on the val
fields, as for every epoch, decides.

Normalisation must be the ISL model's (the features were learnt on it): ``pipeline.normalization`` and
``pipeline.percentiles`` are taken from the ISL SavedModel's metadata, and with an ISL run the ``model``
section is the ISL run's (a different architecture could not receive its weights). The run's
``config.json`` records what was used.

Training data: ``transfer.train_fields: N`` keeps the first N train fields **sorted by name** (the same
subset for the ISL-initialised and the scratch run); validation uses every val field; the loss is the soft
Jaccard distance per crop; ``val_iou`` (per image IoU at ``transfer.threshold``, 1 when both masks are
empty, mean over images) selects the best epoch (``training.early_stopping.monitor``; a ``pcc`` monitor
of an ISL config is read as ``val_iou``).

Run folder (like ``islkeras fit``): ``config.json``, ``history.csv``, ``tb/``, ``ckpt/``, ``savedmodel/``
(kind ``segmentation``: serving returns probabilities), ``metrics.csv`` (one row per test field: IoU at
the threshold with IoU = 1 when both masks are empty, pixel accuracy; whole fields predicted with
``islkeras.inference.tiling.predict_field``) and ``summary.json`` (with ``test_iou``, the mean over the fields).

A config whose ``transfer.sweep_train_fields`` is set runs the few-image experiment instead
(``islkeras.segmentation.experiment``, which also holds the ``islkeras transfer`` command).

This module is the training run; the ISL source, its checks and the weight copy are in
``islkeras.segmentation.isl_source``, the head calibration of ``all_calibrated`` in
``islkeras.segmentation.calibration``.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np

from islkeras.errors import ConfigError, DataError, UserError
from islkeras.segmentation.calibration import calibrate_head, start_scores
from islkeras.segmentation.isl_source import (NONE_WORDS, _flat_layers, adopt_isl_settings, build_segmentation_model,
                                              check_compatible, resolve_isl)

METRICS_FILE = "metrics.csv"
SEG_METRICS = ("loss", "iou", "pixel_acc")  #: what a segmentation run logs (``val_`` + each on validation)


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def freeze_batchnorm(model) -> int:
    """Make every BatchNormalization layer non-trainable: Keras 2 then runs it in inference mode, with the
    moving statistics it has (the ISL model's, gathered over all its training fields), during fine-tuning
    too. Returns the number of layers frozen."""
    import tensorflow as tf

    n = 0
    for lay in _flat_layers(model):
        if isinstance(lay, tf.keras.layers.BatchNormalization):
            lay.trainable = False
            n += 1
    return n


# ------------------------------------------------------------------------------------ the val metric
def _iou_metric_class():
    import tensorflow as tf

    class MeanImageIoU(tf.keras.metrics.Metric):
        """Mean over images of the binary IoU at ``threshold`` (prediction > threshold; true mask > 0.5);
        an image where both masks are empty counts as IoU 1 (``islkeras.segmentation.metrics.iou_binary``)."""

        def __init__(self, threshold: float = 0.5, name: str = "iou", **kw):
            super().__init__(name=name, **kw)
            self.threshold = float(threshold)
            self.total = self.add_weight("total", initializer="zeros", dtype=tf.float64)
            self.count = self.add_weight("count", initializer="zeros", dtype=tf.float64)

        def update_state(self, y_true, y_pred, sample_weight=None):
            t = tf.cast(y_true, tf.float32) > 0.5
            p = tf.cast(y_pred, tf.float32) > self.threshold
            axes = tf.range(1, tf.rank(t))
            inter = tf.reduce_sum(tf.cast(t & p, tf.float64), axis=axes)
            union = tf.reduce_sum(tf.cast(t | p, tf.float64), axis=axes)
            iou = tf.where(union > 0, inter / tf.maximum(union, 1.0), tf.ones_like(union))
            self.total.assign_add(tf.reduce_sum(iou))
            self.count.assign_add(tf.cast(tf.size(iou), tf.float64))

        def result(self):
            return tf.cast(self.total / tf.maximum(self.count, 1.0), tf.float32)

        def reset_state(self):
            self.total.assign(0.0)
            self.count.assign(0.0)

        def get_config(self):
            return dict(super().get_config(), threshold=self.threshold)

    return MeanImageIoU


def segmentation_metrics(threshold: float = 0.5) -> list:
    """``[iou, pixel_acc]`` Keras metrics (``val_`` prefix on validation)."""
    import tensorflow as tf

    return [_iou_metric_class()(threshold, name="iou"),
            tf.keras.metrics.BinaryAccuracy(threshold=threshold, name="pixel_acc")]


# ------------------------------------------------------------------------------------- training data
def train_subset(manifest: dict, n: Optional[int]) -> list[str]:
    """The first ``n`` train fields sorted by name (all when ``n`` is None)."""
    names = sorted(k for k, f in manifest["fields"].items() if f["split"] == "train")
    if not names:
        raise DataError("the records have no train split")
    if n is None:
        return names
    if n > len(names):
        raise UserError(f"transfer.train_fields {n}: the records have only {len(names)} train fields")
    return names[:n]


def _planes(manifest, names, what) -> int:
    chans = manifest["channels"]
    for c in names:
        if c not in chans:
            raise DataError(f"{what} channel {c!r} is not in the records (channels: {', '.join(chans)}); "
                            f"add it to data.channels (and data.masks) and re-run `islkeras convert`")
    return int(sum(int(chans[c]["planes"]) for c in names))


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_segmentation(savedmodel, cfg, split: str = "test", manifest: Optional[dict] = None,
                          threshold: Optional[float] = None, tile: Optional[int] = None,
                          overlap: Optional[int] = None, batch: Optional[int] = None) -> list[dict]:
    """Per-field IoU / pixel accuracy of a segmentation SavedModel on whole fields of ``split``.

    Each raw field goes through ``islkeras.inference.tiling.predict_field`` (the same tiled whole-field prediction
    as ``islkeras predict``), the probabilities are thresholded (``> threshold``) and compared with the
    mask by ``islkeras.segmentation.metrics.iou_binary`` (1 when both are empty) and ``pixel_accuracy``.
    """
    from islkeras.inference import tiling as T
    from islkeras.data.reader import load_fields
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.segmentation.metrics import iou_binary, pixel_accuracy

    tr = cfg.transfer
    threshold = float(tr.threshold if threshold is None and tr is not None else (threshold or 0.5))
    mask_ch = tr.mask_channel if tr is not None else "mask"
    model = ExportedModel(savedmodel)
    fields = load_fields(cfg, split, manifest=manifest, channels=list(cfg.data.inputs) + [mask_ch])
    if not fields:
        raise DataError(f"split {split!r} has no fields to evaluate")
    rows = []
    for f in fields:
        image = np.concatenate([f.arrays[c] for c in cfg.data.inputs], axis=-1)
        prob = T.predict_field(model, image, tile=tile or T.DEFAULT_TILE, overlap=overlap or T.DEFAULT_OVERLAP,
                               batch=batch or T.DEFAULT_BATCH)
        pred = prob[..., 0] > threshold
        true = f.arrays[mask_ch][..., 0] > 0
        rows.append({"field": f.name, "iou": iou_binary(pred, true), "pixel_accuracy": pixel_accuracy(pred, true),
                     "true_pixels": int(true.sum()), "pred_pixels": int(pred.sum()),
                     "mean_probability": float(prob.mean())})
    return rows


def write_metrics_csv(rows: list[dict], path) -> None:
    from islkeras.utils import atomic_write_text

    buf = io.StringIO()
    keys = list(rows[0])
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ training
def prepare_transfer_config(cfg, isl_run="__config__", train_fields="__config__"):
    """A copy of ``cfg`` with a transfer section and the CLI's ``--isl-run`` / ``--train-fields`` applied."""
    from islkeras.config import TransferConfig

    cfg = copy.deepcopy(cfg)
    if cfg.transfer is None:
        cfg.transfer = TransferConfig()
    if isl_run != "__config__":
        cfg.transfer.isl_run = None if isl_run is None or str(isl_run).strip().lower() in NONE_WORDS \
            else str(Path(isl_run).resolve())
    if train_fields != "__config__":
        cfg.transfer.train_fields = train_fields
    if cfg.transfer.mask_channel not in cfg.data.channels:
        raise ConfigError(f"{cfg.source}: transfer.mask_channel {cfg.transfer.mask_channel!r} is not in "
                          f"data.channels ({', '.join(cfg.data.channels)})")
    return cfg


def run_transfer(cfg, run_dir=None, verbose: Optional[int] = None, evaluate: bool = True) -> Path:
    """Train a segmentation model as ``cfg.transfer`` says; returns the run folder (see module doc).

    Everything that can be checked without training (the ISL SavedModel, channels, the train subset) is
    checked first. A ``run_dir`` that already holds a finished run (``summary.json``) is returned as is.
    """
    start = time.time()
    import tensorflow as tf

    from islkeras.data.pipeline import make_dataset
    from islkeras.data.reader import shard_paths
    from islkeras.data.records import ensure_records
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.training.losses import JaccardDistance
    from islkeras.training import cluster as C
    from islkeras.training import distribute as D
    from islkeras.training import run as R
    from islkeras.training.control import finished_training
    from islkeras.training.fit import (_check_data, _precision, check_monitor, clean_checkpoints, export_meta,
                                       get_strategy, keras_verbosity, require_validation, resolve_run_dir,
                                       training_callbacks)
    from islkeras.utils import atomic_write_json

    cfg = prepare_transfer_config(cfg)
    tr, t = cfg.transfer, cfg.training
    strategy = get_strategy(t)  # first: logical devices and multi-worker collectives need a fresh runtime
    D.check_batch_size(t.batch_size, strategy)
    cfg = D.for_strategy(cfg, strategy)  # what this strategy cannot do is turned off, with a warning (XLA)
    tr, t = cfg.transfer, cfg.training
    if run_dir is not None and (Path(run_dir) / R.SUMMARY_FILE).is_file():
        click.echo(f"{run_dir} has already finished: {R.summary_line(R.read_summary(run_dir))}", err=True)
        return Path(run_dir)
    isl = resolve_isl(tr.isl_run)  # fails here, before any data is read, on a bad SavedModel
    es = t.early_stopping
    # a pcc monitor of an ISL config is read as val_iou; a typo fails before any data is read
    monitor = check_monitor(cfg, es.monitor if es and "pcc" not in es.monitor else "val_iou", SEG_METRICS, True)
    _check_data(cfg)
    manifest = ensure_records(cfg)
    mask = tr.mask_channel
    n_in = _planes(manifest, cfg.data.inputs, "input")
    n_out = _planes(manifest, [mask], "mask")
    if manifest["channels"][mask].get("kind") != "mask" and mask not in cfg.data.masks:
        raise ConfigError(f"{cfg.source}: transfer.mask_channel {mask!r} must be listed in data.masks "
                          f"(it is read as 0/1 mask, not normalised)")
    notes = []
    if isl is not None:
        check_compatible(cfg, isl, n_in)
        notes = adopt_isl_settings(cfg, isl)
    keep = train_subset(manifest, tr.train_fields)
    has_val = require_validation(cfg, manifest)
    monitor = check_monitor(cfg, monitor, SEG_METRICS, has_val)

    run_dir, resuming = resolve_run_dir(cfg, run_dir, None)
    chief = C.is_chief(strategy)
    run_dir = C.agree_run_dir(strategy, run_dir, chief)  # every worker uses the chief's run folder
    save_dir = C.worker_dir(run_dir, chief)  # the run folder, or a worker's temporary folder
    save_dir.mkdir(parents=True, exist_ok=True)
    done = finished_training(save_dir / "ckpt" / "state.json")  # killed during the export: export only
    seg_cfg = copy.deepcopy(cfg)
    seg_cfg.data.targets = [mask]
    meta = export_meta(seg_cfg, manifest)
    meta.update(kind="segmentation", targets=[mask], threshold=tr.threshold, isl_run=tr.isl_run,
                init=tr.init if isl is not None else "scratch", train_fields=keep)

    tf.keras.utils.set_random_seed(t.seed)
    with _precision(t.mixed_precision):
        with strategy.scope():
            model = build_segmentation_model(cfg, isl, n_inputs=n_in, n_outputs=n_out)
            if isl is not None and tr.freeze_batchnorm:
                model.transfer_info["frozen_batchnorm"] = freeze_batchnorm(model)
            lr = tr.isl_learning_rate if (isl is not None and tr.isl_learning_rate) else t.learning_rate
            model.transfer_info["learning_rate"] = lr
            model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=lr),
                          loss=JaccardDistance(), metrics=segmentation_metrics(tr.threshold),
                          jit_compile=t.jit_compile)
            model.optimizer.build(model.trainable_variables)
        info = model.transfer_info
        if done:  # the calibration and the start's scores are in transfer.json
            info = json.loads((run_dir / "transfer.json").read_text()) if (run_dir / "transfer.json").is_file() \
                else info
        elif isl is not None and tr.init == "all_calibrated":
            from islkeras.data.reader import load_fields

            fields = [f for f in load_fields(cfg, "train", manifest=manifest,
                                             channels=list(cfg.data.inputs) + [mask]) if f.name in set(keep)]
            info["calibration"] = calibrate_head(model, isl, fields, cfg.data.inputs, mask, tr.calibration_slope)
            c = info["calibration"]
            click.echo(f"  head calibrated on {len(fields)} train field(s): logit = {c['slope']:.4g} * (z - "
                       f"{c['t']:.4g}), train IoU {c['train_iou']:.3f}, soft Jaccard {c['train_jaccard']:.3f}",
                       err=True)
            if tr.keep_start:
                info["start"] = start_scores(isl, cfg, manifest, mask, c["t"])
                click.echo(f"  calibrated start (no segmentation training): val IoU "
                           f"{_fmt_opt(info['start']['val_iou'])}, test IoU {_fmt_opt(info['start']['test_iou'])}",
                           err=True)
                start_weights = model.get_weights()
        mine = D.file_shard_fields(manifest, "train", strategy, keep)  # multi-worker: records of this worker's shards
        train_ds = make_dataset(cfg, "train", training=True, manifest=manifest, targets=[mask], fields=mine or keep)
        train_ds = D.distribute_dataset(train_ds, strategy, 0, sharded_by_file=bool(mine))  # else by DATA
        val_ds = D.distribute_dataset(
            make_dataset(cfg, "val", training=False, manifest=manifest, targets=[mask],
                         batch_size=strategy.num_replicas_in_sync),  # one image per replica
            strategy, len(shard_paths(cfg, manifest, "val")), training=False) if has_val else None
        if chief and not done:
            R.save_run_config(cfg, run_dir)
            atomic_write_json(run_dir / "transfer.json", {**info, "train_fields": keep, "notes": notes})
        ckpt = run_dir / "ckpt"
        verbose = keras_verbosity(verbose)
        src = f"ISL {isl.savedmodel} ({info['init']}: {len(info['copied'])} layers copied)" if isl else "scratch"
        click.echo(f"islkeras transfer: {cfg.name} from {src}, {len(keep)} train field(s) -> {run_dir}"
                   + (" (training done: exporting)" if done else "") + "".join(f"\n  note: {n}" for n in notes),
                   err=True)
        st = info.get("start") or {}
        if done:
            model.load_weights(str(done[1]))
            outcome = done[0]
            kept_start = bool(outcome.pop("kept_start", False))
        else:
            # as in `islkeras fit` (frozen BatchNorm: the re-estimation is a no-op)
            control, callbacks = training_callbacks(t, model, run_dir, save_dir, monitor, start, strategy, chief,
                                                    train_ds)
            model.fit(train_ds, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch, validation_data=val_ds,
                      callbacks=callbacks, verbose=verbose)
            kept_start = False
            best = control.summary.get("best")
            if st.get("val_iou") is not None and control.summary.get("monitor") == "val_iou" and \
                    (best is None or st["val_iou"] > best):
                # no epoch beat the calibrated start on the validation fields: the start is the best model
                model.set_weights(start_weights)
                kept_start = True
                control.finish(None, kept_start=True)  # a resume exports the start too
                control.summary.pop("kept_start")
                click.echo(f"  kept the calibrated start: val IoU {st['val_iou']:.3f} > best epoch's "
                           f"{_fmt_opt(best)}", err=True)
            outcome = control.summary

    summary = dict(outcome, name=cfg.name, kind="segmentation", run_dir=str(run_dir),
                   config_hash=cfg.hash(), isl_run=tr.isl_run, init=meta["init"], train_fields=len(keep),
                   train_minutes=round((time.time() - start) / 60.0, 2))
    if st:
        summary.update(start_val_iou=st.get("val_iou"), start_test_iou=st.get("test_iou"), kept_start=kept_start)
    out = export_savedmodel(model, save_dir / "savedmodel", meta)  # every worker (collective reads)
    C.release_worker_dir(save_dir, chief)
    if chief:
        summary["savedmodel"] = str(out)
        if evaluate and any(f["split"] == "test" for f in manifest["fields"].values()):
            rows = evaluate_segmentation(out, cfg, "test", manifest=manifest)
            write_metrics_csv(rows, run_dir / METRICS_FILE)
            ious = np.array([r["iou"] for r in rows])
            summary.update(test_iou=float(ious.mean()), test_iou_std=float(ious.std()),
                           test_pixel_accuracy=float(np.mean([r["pixel_accuracy"] for r in rows])),
                           test_fields=len(rows))
        summary["minutes_total"] = round((time.time() - start) / 60.0, 2)
        atomic_write_json(run_dir / R.SUMMARY_FILE, summary)
        clean_checkpoints(ckpt)
        line = R.summary_line(summary)
        if "test_iou" in summary:
            line += f"; test IoU {summary['test_iou']:.3f} (pixel accuracy {summary['test_pixel_accuracy']:.4f})"
        click.echo(line)
    return run_dir
