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
``islkeras.inference.predict.predict_field``) and ``summary.json`` (with ``test_iou``, the mean over the fields).

A config whose ``transfer.sweep_train_fields`` is set runs the few-image experiment instead
(``islkeras.segmentation.experiment``).
"""
from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click
import numpy as np

from islkeras.errors import ConfigError, DataError, UserError

NONE_WORDS = ("none", "null", "scratch", "")
METRICS_FILE = "metrics.csv"


# ------------------------------------------------------------------------------------- the ISL source
@dataclass
class IslSource:
    """An ISL SavedModel checked for transfer: its folder, metadata and (when found) its run config."""

    savedmodel: Path
    meta: dict
    run_cfg: object = None  #: ExperimentConfig of the ISL run, or None (a SavedModel without its run folder)
    _exported: object = field(default=None, repr=False, compare=False)

    def exported(self):
        """The SavedModel as an ``islkeras.models.savedmodel.ExportedModel``, loaded on first use only."""
        if self._exported is None:
            from islkeras.models.savedmodel import ExportedModel

            self._exported = ExportedModel(self.savedmodel)
        return self._exported


def resolve_isl(path) -> Optional[IslSource]:
    """Check that ``path`` (run folder or SavedModel) is an islkeras ISL model; ``None`` for from-scratch.

    Raises UserError naming the path when it is missing, holds no ``saved_model.pb``, has no islkeras
    metadata or is not an ISL model (e.g. a segmentation model).
    """
    if path is None or str(path).strip().lower() in NONE_WORDS:
        return None
    from islkeras.models.savedmodel import META_FILE, find_savedmodel, read_meta

    p = Path(path)
    if not p.exists():
        raise UserError(f"transfer.isl_run: {p} does not exist (give an ISL run folder or its savedmodel/, "
                        f"or null to train from scratch)")
    try:
        sm = find_savedmodel(p)
    except UserError as e:
        raise UserError(f"transfer.isl_run: {e}") from None
    if not (sm / "assets" / META_FILE).is_file():
        raise UserError(f"transfer.isl_run: {sm} is a SavedModel but not an islkeras export (no assets/{META_FILE}); "
                        f"export it with `islkeras fit`")
    try:
        meta = read_meta(sm)
    except (UserError, ValueError) as e:
        raise UserError(f"transfer.isl_run: {e}") from None
    if meta.get("kind") != "isl":
        raise UserError(f"transfer.isl_run: {sm} holds a {meta.get('kind')!r} model, not an ISL model "
                        f"(kind 'isl', trained by `islkeras fit`)")
    run_cfg = None
    if (sm.parent / "config.json").is_file() or (sm / "config.json").is_file():
        from islkeras.training.run import load_run_config

        try:
            run_cfg = load_run_config(sm if (sm / "config.json").is_file() else sm.parent)
        except UserError:
            run_cfg = None
    return IslSource(sm, meta, run_cfg)


def _isl_model_cfg(cfg, isl: IslSource):
    """The model section for a transfer from ``isl``: the ISL run's (falls back to cfg.model if unknown)."""
    if isl.run_cfg is not None:
        return copy.deepcopy(isl.run_cfg.model)
    arch = isl.meta.get("architecture")
    mc = copy.deepcopy(cfg.model)
    if arch is not None and arch != mc.architecture:
        raise UserError(f"transfer.isl_run: {isl.savedmodel} is a {arch!r} model without its run config.json; "
                        f"set model.architecture (and the rest of the model section) to the ISL run's")
    if arch == "unet_sm" and isl.meta.get("backbone"):
        mc.backbone = isl.meta["backbone"]
    return mc


def check_compatible(cfg, isl: IslSource, n_inputs: int) -> None:
    """The transfer data's inputs must be what the ISL model was trained on."""
    meta = isl.meta
    if list(meta.get("inputs", [])) != list(cfg.data.inputs):
        raise UserError(f"transfer.isl_run: the ISL model takes inputs {meta.get('inputs')}, the config's "
                        f"data.inputs are {cfg.data.inputs}")
    if int(meta.get("n_inputs", n_inputs)) != int(n_inputs):
        raise UserError(f"transfer.isl_run: the ISL model takes {meta.get('n_inputs')} input plane(s), the "
                        f"records' inputs {cfg.data.inputs} have {n_inputs}")


def adopt_isl_settings(cfg, isl: IslSource) -> list[str]:
    """Set cfg's normalisation and model section to the ISL model's; returns notes on what changed."""
    notes = []
    norm = isl.meta.get("normalization", {})
    method, pct = norm.get("method"), norm.get("percentiles")
    if method and method != cfg.pipeline.normalization:
        notes.append(f"pipeline.normalization {cfg.pipeline.normalization!r} -> {method!r} (the ISL model's)")
        cfg.pipeline.normalization = method
    if pct and list(pct) != list(cfg.pipeline.percentiles):
        cfg.pipeline.percentiles = [float(v) for v in pct]
    mc = _isl_model_cfg(cfg, isl)
    if mc != cfg.model:
        notes.append(f"model section -> the ISL run's ({mc.architecture}"
                     f"{'/' + mc.backbone if mc.architecture == 'unet_sm' else ''})")
        cfg.model = mc
    return notes


# ------------------------------------------------------------------------------------------ the model
def _flat_layers(model) -> list:
    """Layers in order with nested models expanded (so a wrapped segmentation-models U-Net pairs up)."""
    import tensorflow as tf

    out = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            out.extend(_flat_layers(layer))
        else:
            out.append(layer)
    return out


def weight_layers(model) -> list:
    """Layers that carry weights, in order; the last one is the head (``final_conv``)."""
    return [lay for lay in _flat_layers(model) if lay.weights]


def copy_isl_weights(seg_model, isl_model, init: str = "all_but_head") -> dict:
    """Copy ``isl_model``'s weights into ``seg_model`` layer by layer (see module doc).

    Returns ``{"copied": [names], "skipped": [names]}``; UserError when the architectures differ.
    """
    src, dst = weight_layers(isl_model), weight_layers(seg_model)
    if len(src) != len(dst):
        raise UserError(f"transfer: the ISL model has {len(src)} layers with weights, the segmentation model "
                        f"{len(dst)}: not the same architecture")
    copied, skipped = [], []
    for i, (a, b) in enumerate(zip(src, dst)):
        wa, wb = a.get_weights(), b.get_weights()
        shapes_a, shapes_b = [w.shape for w in wa], [w.shape for w in wb]
        head = i == len(src) - 1
        if type(a).__name__ != type(b).__name__ or (shapes_a != shapes_b and not head):
            raise UserError(f"transfer: layer {i} differs between the ISL model ({a.name}: {type(a).__name__} "
                            f"{shapes_a}) and the segmentation model ({b.name}: {type(b).__name__} {shapes_b})")
        if head and (init not in ("all", "all_calibrated") or shapes_a != shapes_b):
            skipped.append(b.name)
            continue
        b.set_weights(wa)
        copied.append(b.name)
    return {"copied": copied, "skipped": skipped}


def load_isl_keras(savedmodel):
    """The ISL generator as a Keras model (the training metrics saved with it are not restored)."""
    import tensorflow as tf

    from islkeras.training.metrics import PCC

    return tf.keras.models.load_model(str(savedmodel), compile=False, custom_objects={"PCC": PCC})


def build_segmentation_model(cfg, isl_savedmodel=None, n_inputs: Optional[int] = None, n_outputs: int = 1,
                             init: Optional[str] = None):
    """The segmentation network (sigmoid output) -- from scratch, or initialised from an ISL SavedModel.

    ``isl_savedmodel``: ISL run folder / SavedModel path (or an ``IslSource``), or None for from-scratch
    (``cfg.model``). ``init``: ``all_but_head`` / ``all`` (default ``cfg.transfer.init``). ``n_inputs``
    defaults to the ISL model's input planes, else ``len(cfg.data.inputs)``. Returns the Keras model;
    ``model.transfer_info`` tells what was copied.
    """
    from islkeras.models.unet import build_generator

    init = init or (cfg.transfer.init if cfg.transfer is not None else "all_but_head")
    isl = isl_savedmodel if isinstance(isl_savedmodel, IslSource) else resolve_isl(isl_savedmodel)
    if isl is None:
        model = build_generator(cfg.model, int(n_inputs or len(cfg.data.inputs)), n_outputs, activation="sigmoid")
        model.transfer_info = {"isl_run": None, "init": "scratch", "copied": [], "skipped": []}
        return model
    n_in = int(n_inputs or isl.meta.get("n_inputs") or len(cfg.data.inputs))
    if int(isl.meta.get("n_inputs", n_in)) != n_in:
        raise UserError(f"transfer.isl_run: the ISL model takes {isl.meta.get('n_inputs')} input plane(s), "
                        f"the data has {n_in}")
    model_cfg = _isl_model_cfg(cfg, isl)
    model = build_generator(model_cfg, n_in, n_outputs, activation="sigmoid")
    try:
        isl_model = load_isl_keras(isl.savedmodel)
    except Exception as e:  # a corrupt or non-Keras SavedModel
        raise UserError(f"transfer.isl_run: {isl.savedmodel} could not be loaded as a Keras model: "
                        f"{type(e).__name__}: {str(e)[:200]}") from None
    info = copy_isl_weights(model, isl_model, init)
    model.transfer_info = {"isl_run": str(isl.savedmodel), "init": init, **info}
    del isl_model
    return model


def isl_predictions(isl: IslSource, fields, inputs) -> list:
    """The ISL model's normalised prediction (z-score units) of each field's first target plane."""
    from islkeras.inference import predict as P

    m = isl.exported()
    out = []
    for f in fields:
        image = np.concatenate([f.arrays[c] for c in inputs], axis=-1)
        out.append(P.predict_field(m, image, output_scale=False)[..., 0])
    return out


def _soft_jaccard(p: np.ndarray, y: np.ndarray, smooth: float = 1.0) -> float:
    """``islkeras.training.losses.jaccard_distance`` of one image, in numpy."""
    inter = float((p * y).sum())
    return 1.0 - (inter + smooth) / (float(y.sum()) + float(p.sum()) - inter + smooth)


BACKGROUND_LOGIT = -6.0  #: all_calibrated: the median prediction (background) starts at p = sigmoid(-6) ~ 0.0025


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def threshold_ious(zs: list, masks: list, t: float) -> list[float]:
    """Per-field IoU of ``z > t`` against the masks (non-zero = foreground; 1 when both are empty): the
    segmentation of the calibrated start (``sigmoid(slope * (z - t)) > 0.5`` is ``z > t``) or of any
    thresholded image."""
    from islkeras.segmentation.metrics import iou_binary

    return [iou_binary(np.asarray(z) > t, m) for z, m in zip(zs, masks)]


def best_level(zs: list, masks: list) -> tuple[float, float, float]:
    """``(t, mean IoU of z > t, median of z)``: the level whose ``z > t`` has the best mean IoU with the
    masks (the middle of a plateau of near-best levels), searched on levels spaced evenly in value from the
    median to the 99.995th percentile of ``z`` plus quantile levels (nuclei can cover 0.1 % of a field,
    so the levels must reach far into the tail)."""
    masks = [np.asarray(m) > 0 for m in masks]
    sample = np.concatenate([np.asarray(z).ravel()[:: max(1, z.size // 200_000)] for z in zs]).astype(np.float64)
    lo, hi = np.quantile(sample, [0.5, 0.99995])
    levels = np.unique(np.concatenate([np.linspace(lo, hi, 200),
                                       np.quantile(sample, np.linspace(0.5, 0.9999, 100))]).astype(np.float32))
    scores = np.array([np.mean(threshold_ious(zs, masks, t)) for t in levels])
    # the middle of the levels within 0.005 of the best IoU: the widest margin on both sides of a plateau
    near = np.flatnonzero(scores >= scores.max() - 0.005)
    best = int(near[len(near) // 2])
    return float(levels[best]), float(scores[best]), float(lo)


def fit_calibration(zs: list, masks: list, slope: Optional[float] = None) -> dict:
    """The head's operating point from the ISL predictions ``zs`` and the masks of the annotated fields.

    ``t``: ``best_level`` (the level whose ``z > t`` has the best mean IoU with the masks, the metric).
    ``slope`` (unless given): ``BACKGROUND_LOGIT / (median(z) - t)``, so the
    typical (background) pixel starts at p ~ 0.0025 and ``t`` at 0.5 whatever the units of the ISL
    normalisation (z-scores, percentile-scaled...). Both extremes failed: a slope leaving the background
    near p = 0.45 and the slope that minimises the step-0 soft Jaccard distance (a near-step function, where
    every update of the body flips pixels) each let a one-field run collapse to "no nucleus" in its first
    epochs. Returns ``{"t", "slope", "train_iou", "train_jaccard"}`` (the last two: on the annotated
    fields, at step 0).
    """
    t, iou, median = best_level(zs, masks)
    if slope is None:
        slope = BACKGROUND_LOGIT / min(median - t, -1e-6)
    jac = [_soft_jaccard(1.0 / (1.0 + np.exp(-np.clip(slope * (z[::2, ::2] - t), -60, 60))),
                         (np.asarray(m) > 0)[::2, ::2]) for z, m in zip(zs, masks)]
    return {"t": t, "slope": float(slope), "train_iou": iou, "train_jaccard": float(np.mean(jac))}


def calibrate_head(model, isl: IslSource, fields, inputs, mask_channel: str, slope: Optional[float] = None) -> dict:
    """Re-activate a copied ISL head: ``logit = slope * (z - t)``, where ``z`` is the head's ISL output
    (the predicted normalised fluorescence) and ``t``/``slope`` come from ``fit_calibration`` on the
    annotated train ``fields``.

    Only the head's kernel and bias change (``W' = slope * W``, ``b' = slope * (b - t)``), so at step 0 the
    segmentation net is the (softly) thresholded ISL prediction. Returns ``fit_calibration``'s dict.
    """
    zs = isl_predictions(isl, fields, inputs)
    cal = fit_calibration(zs, [f.arrays[mask_channel][..., 0] for f in fields], slope)
    head = weight_layers(model)[-1]
    w = head.get_weights()
    if len(w) != 2:
        raise UserError(f"transfer.init all_calibrated: the head {head.name} has no bias to shift")
    head.set_weights([w[0] * cal["slope"], (w[1] - cal["t"]) * cal["slope"]])
    return cal


def start_scores(isl: IslSource, cfg, manifest, mask_channel: str, t: float) -> dict:
    """IoU of the calibrated start (thresholded ISL prediction, before any segmentation training) on the
    whole val and test fields: ``{"val_iou", "test_iou", "test_fields": {name: iou}}`` (None without the
    split)."""
    from islkeras.data.records import load_fields

    out: dict = {"val_iou": None, "test_iou": None, "test_fields": {}}
    for split in ("val", "test"):
        if not any(f["split"] == split for f in manifest["fields"].values()):
            continue
        fields = load_fields(cfg, split, manifest=manifest, channels=list(cfg.data.inputs) + [mask_channel])
        ious = threshold_ious(isl_predictions(isl, fields, cfg.data.inputs),
                              [f.arrays[mask_channel][..., 0] for f in fields], t)
        out[f"{split}_iou"] = float(np.mean(ious))
        if split == "test":
            out["test_fields"] = {f.name: float(v) for f, v in zip(fields, ious)}
    return out


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

    Each raw field goes through ``islkeras.inference.predict.predict_field`` (the same tiled whole-field prediction
    as ``islkeras predict``), the probabilities are thresholded (``> threshold``) and compared with the
    mask by ``islkeras.segmentation.metrics.iou_binary`` (1 when both are empty) and ``pixel_accuracy``.
    """
    from islkeras.inference import predict as P
    from islkeras.data.records import load_fields
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
        prob = P.predict_field(model, image, tile=tile or P.DEFAULT_TILE, overlap=overlap or P.DEFAULT_OVERLAP,
                               batch=batch or P.DEFAULT_BATCH)
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
    from islkeras.data.records import ensure_records, shard_paths
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.training.losses import JaccardDistance
    from islkeras.training import distribute as D
    from islkeras.training import run as R
    from islkeras.training.fit import (_check_data, _precision, export_meta, get_strategy, keras_verbosity,
                                       resolve_run_dir, training_callbacks)
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
    has_val = any(f.get("split") == "val" for f in manifest["fields"].values())

    run_dir, resuming = resolve_run_dir(cfg, run_dir, None)
    chief = D.is_chief(strategy)
    run_dir = D.agree_run_dir(strategy, run_dir, chief)  # every worker uses the chief's run folder
    save_dir = D.worker_dir(run_dir, chief)  # the run folder, or a worker's temporary folder
    save_dir.mkdir(parents=True, exist_ok=True)
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
        if isl is not None and tr.init == "all_calibrated":
            from islkeras.data.records import load_fields

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
        if chief:
            R.save_run_config(cfg, run_dir)
            atomic_write_json(run_dir / "transfer.json", {**info, "train_fields": keep, "notes": notes})
        es = t.early_stopping
        monitor = es.monitor if es and "pcc" not in es.monitor else "val_iou"
        if val_ds is None and monitor.startswith("val_"):
            monitor = monitor[4:]
        ckpt = run_dir / "ckpt"
        # as in `islkeras fit` (frozen BatchNorm: the re-estimation is a no-op)
        control, callbacks = training_callbacks(t, model, run_dir, save_dir, monitor, start, strategy, chief,
                                                train_ds)
        verbose = keras_verbosity(verbose)
        src = f"ISL {isl.savedmodel} ({info['init']}: {len(info['copied'])} layers copied)" if isl else "scratch"
        click.echo(f"islkeras transfer: {cfg.name} from {src}, {len(keep)} train field(s) -> {run_dir}"
                   + "".join(f"\n  note: {n}" for n in notes), err=True)
        model.fit(train_ds, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch, validation_data=val_ds,
                  callbacks=callbacks, verbose=verbose)
        kept_start = False
        st = info.get("start") or {}
        best = control.summary.get("best")
        if st.get("val_iou") is not None and control.summary.get("monitor") == "val_iou" and \
                (best is None or st["val_iou"] > best):
            # no epoch beat the calibrated start on the validation fields: the start is the best model
            model.set_weights(start_weights)
            kept_start = True
            click.echo(f"  kept the calibrated start: val IoU {st['val_iou']:.3f} > best epoch's "
                       f"{_fmt_opt(best)}", err=True)

    summary = dict(control.summary, name=cfg.name, kind="segmentation", run_dir=str(run_dir),
                   config_hash=cfg.hash(), isl_run=tr.isl_run, init=meta["init"], train_fields=len(keep),
                   train_minutes=round((time.time() - start) / 60.0, 2))
    if st:
        summary.update(start_val_iou=st.get("val_iou"), start_test_iou=st.get("test_iou"), kept_start=kept_start)
    out = export_savedmodel(model, save_dir / "savedmodel", meta)  # every worker (collective reads)
    D.release_worker_dir(save_dir, chief)
    if chief:
        summary["savedmodel"] = str(out)
        with __import__("contextlib").suppress(FileNotFoundError):
            (ckpt / "best_weights.h5").unlink()
        if evaluate and any(f["split"] == "test" for f in manifest["fields"].values()):
            rows = evaluate_segmentation(out, cfg, "test", manifest=manifest)
            write_metrics_csv(rows, run_dir / METRICS_FILE)
            ious = np.array([r["iou"] for r in rows])
            summary.update(test_iou=float(ious.mean()), test_iou_std=float(ious.std()),
                           test_pixel_accuracy=float(np.mean([r["pixel_accuracy"] for r in rows])),
                           test_fields=len(rows))
        summary["minutes_total"] = round((time.time() - start) / 60.0, 2)
        atomic_write_json(run_dir / R.SUMMARY_FILE, summary)
        line = R.summary_line(summary)
        if "test_iou" in summary:
            line += f"; test IoU {summary['test_iou']:.3f} (pixel accuracy {summary['test_pixel_accuracy']:.4f})"
        click.echo(line)
    return run_dir


# ----------------------------------------------------------------------------------------------- CLI
@click.command("transfer", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--isl-run", "isl_run", default=None, metavar="RUN|none",
              help="ISL run folder or SavedModel to initialise from, or 'none' for from-scratch "
                   "(default: transfer.isl_run of the config).")
@click.option("--train-fields", type=click.IntRange(min=1), default=None,
              help="Use only the first N train fields, sorted by name (default: transfer.train_fields / all).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Write the run (or the experiment) here instead of <runs_dir>/<name>/<timestamp>.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path, JSON value), e.g. --set transfer.init=all. Repeatable.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Replace data.root of the config.")
def transfer_command(config, isl_run, train_fields, run_dir, sets, data_root):
    """Train nuclei segmentation from CONFIG, initialised from an ISL model (or from scratch).

    The segmentation net is the ISL generator's architecture with a sigmoid output, trained with the soft
    Jaccard distance on the mask channel (transfer.mask_channel); every layer but the head is copied from
    the ISL SavedModel (transfer.init). Writes a run folder like `islkeras fit`, plus metrics.csv (IoU at
    0.5 and pixel accuracy per test field, whole fields) and the test mean in summary.json.

    A config with transfer.sweep_train_fields runs the few-image experiment instead: ISL pretraining
    (transfer.pretrain) once, then pretrained vs scratch for each number of train fields; table
    (results.csv/.md) and curve (curve.png) in the experiment folder.

    \b
    Examples:
      islkeras transfer my_transfer.json --isl-run runs/aiseg_nuclei_l1/20250101-120000
      islkeras transfer my_transfer.json --isl-run none --train-fields 1
      islkeras transfer experiments/aiseg_transfer.json        # the few-image experiment
    """
    from islkeras.config import load_config, parse_set_option

    cfg = load_config(config, overrides=parse_set_option(sets), data_root=data_root)
    cfg = prepare_transfer_config(cfg, isl_run if isl_run is not None else "__config__",
                                  train_fields if train_fields is not None else "__config__")
    if cfg.transfer.sweep_train_fields:
        from islkeras.segmentation.experiment import run_experiment

        run_experiment(cfg, out_dir=run_dir, isl_run_given=isl_run is not None)
        return
    run_transfer(cfg, run_dir=run_dir)
