"""Segmentation metrics for nucleus masks (numpy only; scipy for the matching).

Conventions used throughout:

* A *label image* is an integer array, 0 = background and every other value one object. Label numbers
  need not be consecutive (gaps are harmless here, unlike in ``cellpose.metrics.average_precision``,
  which counts every missing number as a false positive / negative).
* A *mask* is anything that is truthy on the foreground (bool, 0/1, or a label image).

Functions:

* :func:`average_precision` -- instance AP = TP / (TP + FP + FN) at one or more IoU thresholds, the
  definition of the 2018 Data Science Bowl as implemented by cellpose/stardist (a predicted object and a
  true object match when their IoU >= threshold; one-to-one matching maximising the number of matches).
* :func:`iou_binary` (pixel Jaccard) and :func:`pixel_accuracy` for foreground masks.
* :func:`mask_jaccard_from_fluorescence` -- Jaccard between the nucleus masks of a predicted and of the
  true fluorescence image (thesis section 3.5.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

__all__ = [
    "APResult",
    "average_precision",
    "iou_matrix",
    "iou_binary",
    "pixel_accuracy",
    "mask_jaccard_from_fluorescence",
]


@dataclass(frozen=True)
class APResult:
    """Matching counts at one IoU threshold for one image."""

    threshold: float
    tp: int
    fp: int  #: predicted objects without a match
    fn: int  #: true objects without a match
    n_true: int
    n_pred: int

    @property
    def ap(self) -> float:
        """TP / (TP + FP + FN); 1.0 when neither image has an object (nothing to find, nothing found)."""
        denom = self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else self.tp / denom

    @property
    def precision(self) -> float:
        return 1.0 if self.n_pred == 0 and self.n_true == 0 else (self.tp / self.n_pred if self.n_pred else 0.0)

    @property
    def recall(self) -> float:
        return 1.0 if self.n_true == 0 and self.n_pred == 0 else (self.tp / self.n_true if self.n_true else 0.0)


def _check_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _as_labels(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype == bool:
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label image (0 = background), got dtype {x.dtype}")
    if x.size and x.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return x


def _pair_overlaps(true_labels, pred_labels):
    """Sparse label overlap: the (true, predicted) pairs that share pixels and their IoU.

    Returns ``(ti, pj, iou, true_ids, pred_ids)``: pair k is true label ``true_ids[ti[k]]`` and predicted
    label ``pred_ids[pj[k]]`` with IoU ``iou[k] > 0``. Only labels present are listed (gaps ignored).
    """
    t, p = _check_pair(true_labels, pred_labels, "label overlap")
    t = _as_labels(t, "true_labels").ravel()
    p = _as_labels(p, "pred_labels").ravel()
    true_ids, t_idx, area_t = np.unique(t, return_inverse=True, return_counts=True)
    pred_ids, p_idx, area_p = np.unique(p, return_inverse=True, return_counts=True)
    npr = len(pred_ids)
    codes, overlap = np.unique(t_idx.astype(np.int64) * npr + p_idx, return_counts=True)
    ti, pj = np.divmod(codes, npr)
    fg = (true_ids[ti] != 0) & (pred_ids[pj] != 0)
    ti, pj, overlap = ti[fg], pj[fg], overlap[fg]
    iou = overlap / (area_t[ti] + area_p[pj] - overlap)
    # re-index to the foreground labels only
    t_keep = true_ids != 0
    p_keep = pred_ids != 0
    t_map = np.cumsum(t_keep) - 1
    p_map = np.cumsum(p_keep) - 1
    return t_map[ti], p_map[pj], iou, true_ids[t_keep], pred_ids[p_keep]


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (true object, predicted object) pair, from the label overlap (one pass over pixels).

    Returns ``(iou, true_ids, pred_ids)``: ``iou[i, j]`` is the IoU of true label ``true_ids[i]`` and
    predicted label ``pred_ids[j]``; only labels present in the images are listed (gaps are ignored).
    """
    ti, pj, v, tids, pids = _pair_overlaps(true_labels, pred_labels)
    iou = np.zeros((len(tids), len(pids)), dtype=np.float64)
    iou[ti, pj] = v
    return iou, tids, pids


def _n_matches(ti: np.ndarray, pj: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Size of the largest one-to-one matching among pairs with IoU >= threshold."""
    hit = iou >= threshold
    ti, pj = ti[hit], pj[hit]
    if len(ti) == 0:
        return 0
    # Above 0.5 an object can overlap at most one other object by IoU > 0.5, so the match is unique;
    # at or below 0.5 resolve conflicts (if any) with the Hungarian algorithm on the involved objects.
    if threshold > 0.5 or (len(np.unique(ti)) == len(ti) and len(np.unique(pj)) == len(pj)):
        return int(len(ti))
    from scipy.optimize import linear_sum_assignment

    rows, r = np.unique(ti, return_inverse=True)
    cols, c = np.unique(pj, return_inverse=True)
    sub = np.zeros((len(rows), len(cols)), dtype=np.int8)
    sub[r, c] = 1
    rr, cc = linear_sum_assignment(sub, maximize=True)
    return int(sub[rr, cc].sum())


def average_precision(
    true_labels: np.ndarray, pred_labels: np.ndarray, thresholds: Union[float, Sequence[float]] = 0.5
) -> Union[APResult, list[APResult]]:
    """Instance matching of two label images at IoU threshold(s).

    AP = TP / (TP + FP + FN) (the Data Science Bowl 2018 / cellpose / stardist "average precision";
    mean it over images yourself). A true and a predicted object are a candidate pair when their
    IoU >= threshold; TP is the size of the largest one-to-one matching (Hungarian; for thresholds > 0.5
    the matching is unique anyway). Label numbers may have gaps. When neither image contains an object
    the AP is 1.0 (cellpose gives NaN there).

    Returns one :class:`APResult` for a scalar threshold, else a list in the order given.
    """
    ti, pj, iou, tids, pids = _pair_overlaps(true_labels, pred_labels)
    scalar = np.ndim(thresholds) == 0
    ths = [float(thresholds)] if scalar else [float(x) for x in thresholds]
    out = []
    for th in ths:
        if not 0.0 < th <= 1.0:
            raise ValueError(f"IoU threshold must be in (0, 1], got {th}")
        tp = _n_matches(ti, pj, iou, th)
        out.append(APResult(th, tp, len(pids) - tp, len(tids) - tp, len(tids), len(pids)))
    return out[0] if scalar else out


def iou_binary(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Pixel Jaccard |P & T| / |P | T| of two foreground masks (any non-zero value is foreground).

    When both masks are empty the IoU is defined as 1.0 (thesis rule: an empty prediction of an empty
    field is perfect); when exactly one is empty it is 0.0.
    """
    p, t = _check_pair(pred_mask, true_mask, "iou_binary")
    p = p.astype(bool, copy=False)
    t = t.astype(bool, copy=False)
    union = np.count_nonzero(p | t)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(p & t) / union)


def pixel_accuracy(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Fraction of pixels whose foreground/background class agrees (1.0 for empty arrays)."""
    p, t = _check_pair(pred_mask, true_mask, "pixel_accuracy")
    if p.size == 0:
        return 1.0
    return float(np.count_nonzero(p.astype(bool) == t.astype(bool)) / p.size)


def mask_jaccard_from_fluorescence(
    pred_img: np.ndarray,
    true_img: np.ndarray,
    method="classical",
    params=None,
    cellpose_model: Optional[str] = None,
    diameter: Optional[float] = None,
) -> float:
    """Jaccard between the nucleus masks of predicted and of true fluorescence (thesis section 3.5.1).

    Signature: ``mask_jaccard_from_fluorescence(pred_img, true_img, method="classical", params=None,
    cellpose_model=None, diameter=None) -> float`` (``params``: :class:`islkeras.segmentation.classical.ClassicalParams`).

    Both images are 2-D (Y, X) nuclear-stain intensities of the same field (any numeric dtype; each is
    percentile-normalised on its own, so a prediction on a different intensity scale is fine). Both are
    segmented with the same method (``"classical"`` with :class:`islkeras.segmentation.classical.ClassicalParams`
    ``params``, or ``"cellpose"`` with ``cellpose_model`` / ``diameter``) and the foreground masks are
    compared with :func:`iou_binary` (1.0 when both are empty). ``method`` may also be a callable
    image -> labels, e.g. ``islkeras.segmentation.masks.make_segmenter("cellpose", cellpose_model=...)`` built once, so
    that a cellpose model is not reloaded for every image pair.
    """
    pred_img, true_img = _check_pair(pred_img, true_img, "mask_jaccard_from_fluorescence")
    if callable(method):
        seg = method
    else:
        from islkeras.segmentation import masks as _masks

        seg = _masks.make_segmenter(method, params=params, cellpose_model=cellpose_model, diameter=diameter)
    return iou_binary(seg(pred_img) > 0, seg(true_img) > 0)
