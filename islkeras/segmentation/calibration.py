"""``transfer.init: all_calibrated``: the copied ISL head re-activated as ``logit = slope * (z - t)``, with the
level ``t`` and the slope fitted on the annotated train fields, and the score of that calibrated start on
the val and test fields (see ``islkeras.segmentation.transfer``'s module doc)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from islkeras.errors import UserError
from islkeras.segmentation.isl_source import IslSource, weight_layers


def isl_predictions(isl: IslSource, fields, inputs) -> list:
    """The ISL model's normalised prediction (z-score units) of each field's first target plane."""
    from islkeras.inference import tiling as T

    m = isl.exported()
    out = []
    for f in fields:
        image = np.concatenate([f.arrays[c] for c in inputs], axis=-1)
        out.append(T.predict_field(m, image, output_scale=False)[..., 0])
    return out


def _soft_jaccard(p: np.ndarray, y: np.ndarray, smooth: float = 1.0) -> float:
    """``islkeras.training.losses.jaccard_distance`` of one image, in numpy."""
    inter = float((p * y).sum())
    return 1.0 - (inter + smooth) / (float(y.sum()) + float(p.sum()) - inter + smooth)


BACKGROUND_LOGIT = -6.0  #: all_calibrated: the median prediction (background) starts at p = sigmoid(-6) ~ 0.0025


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
    from islkeras.data.reader import load_fields

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
