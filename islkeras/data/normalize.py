"""Intensity normalisation shared by the input pipeline, the exported serving graph and prediction.

Every method is an affine map ``x_norm = (x - offset) / scale`` per channel plane, so a crop is normalised
with numbers computed once for its whole field (at conversion time, from the manifest), and the serving
graph computes the same numbers in-graph from the raw image it is given:

============  ===================================  ======================================================
method        offset                               scale
============  ===================================  ======================================================
zscore        mean of the field                    std of the field (per image z-score; the default)
dataset       mean over the train fields           mean std over the train fields (fixed constants)
minmax        min of the field                     max - min of the field
percentile    p_low percentile of the field        p_high - p_low (CSBDeep-style, e.g. 1 and 99.8)
============  ===================================  ======================================================

Predictions are mapped back to the target's intensity scale with ``y = y_norm * scale + offset`` using the
*training-set average* offset/scale of each target channel (a field's own target statistics are unknown
at prediction time). ``scale`` is never below ``EPS`` so a constant image normalises to 0, not NaN.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

EPS = 1e-6
#: percentiles stored per field and channel plane at conversion; pipeline.percentiles must come from here
STAT_PERCENTILES: tuple[float, ...] = (
    0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.0, 98.0, 99.0, 99.5, 99.8,
    99.9, 99.99, 100.0,
)
METHODS = ("zscore", "dataset", "minmax", "percentile")


# ------------------------------------------------------------------------------------------------ numpy
def image_stats(img: np.ndarray) -> dict:
    """Statistics of one field, per plane of an (H, W, C) array: the numbers stored in the manifest."""
    if img.ndim == 2:
        img = img[..., None]
    flat = img.reshape(-1, img.shape[-1]).astype(np.float64)
    pct = np.percentile(flat, STAT_PERCENTILES, axis=0)  # (P, C)
    return {
        "mean": flat.mean(axis=0).tolist(),
        "std": flat.std(axis=0).tolist(),
        "min": flat.min(axis=0).tolist(),
        "max": flat.max(axis=0).tolist(),
        "percentiles": {f"{p:g}": pct[i].tolist() for i, p in enumerate(STAT_PERCENTILES)},
    }


def _pkey(p: float) -> str:
    key = f"{float(p):g}"
    if float(p) not in STAT_PERCENTILES:
        raise ValueError(f"percentile {p} is not stored; choose from {', '.join(f'{q:g}' for q in STAT_PERCENTILES)}")
    return key


def offset_scale(stats: Mapping, method: str, percentiles: Sequence[float] = (1.0, 99.8),
                 dataset: Optional[Mapping] = None) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per plane of one channel from its stored field statistics.

    ``dataset`` is ``{"offset": [...], "scale": [...]}`` for method ``dataset`` (see ``dataset_offset_scale``).
    """
    if method == "zscore":
        off, sc = np.asarray(stats["mean"]), np.asarray(stats["std"])
    elif method == "minmax":
        off = np.asarray(stats["min"])
        sc = np.asarray(stats["max"]) - off
    elif method == "percentile":
        lo, hi = percentiles
        off = np.asarray(stats["percentiles"][_pkey(lo)])
        sc = np.asarray(stats["percentiles"][_pkey(hi)]) - off
    elif method == "dataset":
        if dataset is None:
            raise ValueError("normalisation 'dataset' needs the train split's statistics")
        off, sc = np.asarray(dataset["offset"]), np.asarray(dataset["scale"])
    else:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {', '.join(METHODS)}")
    return off.astype(np.float32), np.maximum(sc, EPS).astype(np.float32)


def dataset_offset_scale(field_stats: Sequence[Mapping], method: str,
                         percentiles: Sequence[float] = (1.0, 99.8)) -> dict:
    """Average per-field offset/scale over fields (the train split).

    For ``dataset`` this is the pooled mean and the mean of per-field stds (as z-score constants); for the
    other methods it is the mean of each field's own offset/scale, which is how predictions are mapped back
    to the target's intensity scale.
    """
    per = [offset_scale(s, "zscore" if method == "dataset" else method, percentiles) for s in field_stats]
    if not per:
        raise ValueError("no fields to compute dataset statistics from")
    off = np.mean([p[0] for p in per], axis=0)
    sc = np.mean([p[1] for p in per], axis=0)
    return {"offset": off.astype(float).tolist(), "scale": np.maximum(sc, EPS).astype(float).tolist()}


def normalize_np(img: np.ndarray, offset, scale) -> np.ndarray:
    return ((img.astype(np.float32) - np.asarray(offset, np.float32)) / np.asarray(scale, np.float32)).astype(np.float32)


def denormalize_np(pred: np.ndarray, offset, scale) -> np.ndarray:
    return (pred.astype(np.float32) * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)).astype(np.float32)


# ------------------------------------------------------------------------------------------- tensorflow
def _tf_percentile(tf, flat, q: float):
    """numpy's default ('linear') percentile of a (N, C) tensor along axis 0."""
    s = tf.sort(flat, axis=0)
    n = tf.cast(tf.shape(s)[0], tf.float32)
    pos = q / 100.0 * (n - 1.0)
    lo = tf.cast(tf.floor(pos), tf.int32)
    hi = tf.minimum(lo + 1, tf.shape(s)[0] - 1)
    frac = pos - tf.floor(pos)
    return tf.gather(s, lo) * (1.0 - frac) + tf.gather(s, hi) * frac


def offset_scale_tf(images, method: str, percentiles: Sequence[float] = (1.0, 99.8),
                    dataset: Optional[Mapping] = None):
    """In-graph (offset, scale) of a float32 batch (N, H, W, C), each image over its own pixels.

    Returns tensors of shape (N, 1, 1, C) matching ``offset_scale`` on the same image.
    """
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    c = tf.shape(x)[-1]
    if method == "dataset":
        if dataset is None:
            raise ValueError("normalisation 'dataset' needs the train split's statistics")
        off = tf.reshape(tf.constant(dataset["offset"], tf.float32), [1, 1, 1, -1])
        sc = tf.reshape(tf.constant(dataset["scale"], tf.float32), [1, 1, 1, -1])
        n = tf.shape(x)[0]
        return tf.tile(off, [n, 1, 1, 1]), tf.tile(sc, [n, 1, 1, 1])
    if method == "zscore":
        # two-pass in float64 for accuracy on large uint16 fields (matches numpy's std, ddof=0)
        x64 = tf.cast(x, tf.float64)
        mean = tf.reduce_mean(x64, axis=[1, 2], keepdims=True)
        std = tf.sqrt(tf.reduce_mean(tf.square(x64 - mean), axis=[1, 2], keepdims=True))
        off, sc = tf.cast(mean, tf.float32), tf.cast(std, tf.float32)
    elif method == "minmax":
        off = tf.reduce_min(x, axis=[1, 2], keepdims=True)
        sc = tf.reduce_max(x, axis=[1, 2], keepdims=True) - off
    elif method == "percentile":
        lo_q, hi_q = float(percentiles[0]), float(percentiles[1])

        def one(img):
            flat = tf.reshape(img, [-1, c])
            return tf.stack([_tf_percentile(tf, flat, lo_q), _tf_percentile(tf, flat, hi_q)])

        both = tf.map_fn(one, x, fn_output_signature=tf.float32)  # (N, 2, C)
        off = both[:, 0][:, None, None, :]
        sc = both[:, 1][:, None, None, :] - off
    else:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {', '.join(METHODS)}")
    return off, tf.maximum(sc, EPS)


def offset_scale_of_image(img: np.ndarray, method: str, percentiles: Sequence[float] = (1.0, 99.8),
                          dataset: Optional[Mapping] = None) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per plane of a whole (H, W, C) image, computed like ``offset_scale_tf``.

    Only the statistics the method needs are computed, without a float copy for mean/std, so memory
    stays proportional to the image itself.
    """
    if img.ndim == 2:
        img = img[..., None]
    if method == "dataset":
        return offset_scale({}, method, percentiles, dataset)
    if method == "zscore":
        off = img.mean(axis=(0, 1), dtype=np.float64)
        sc = img.std(axis=(0, 1), dtype=np.float64)
    elif method == "minmax":
        off = img.min(axis=(0, 1)).astype(np.float64)
        sc = img.max(axis=(0, 1)).astype(np.float64) - off
    elif method == "percentile":
        flat = img.reshape(-1, img.shape[-1])
        lo, hi = np.percentile(flat, list(percentiles), axis=0)
        off, sc = lo, hi - lo
    else:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {', '.join(METHODS)}")
    return off.astype(np.float32), np.maximum(sc, EPS).astype(np.float32)


def offset_scale_of_blocks(blocks, method: str, percentiles: Sequence[float] = (1.0, 99.8),
                           dataset: Optional[Mapping] = None, total_pixels: Optional[int] = None,
                           max_float_samples: int = 1 << 24):
    """``offset_scale_of_image`` of a field given as an iterable of ``(h, w, C)`` blocks that tile it (a field
    read region by region), with memory bounded by one block.

    zscore merges per-block mean and squared deviations (Chan et al.'s parallel variance, float64); minmax
    keeps running extremes; percentile is exact for integer pixels (a histogram of every value) and, for float
    pixels, exact up to ``max_float_samples`` pixels, else (``total_pixels`` given) taken from every k-th pixel
    of each block, about ``max_float_samples`` in all (said in a warning).
    """
    if method == "dataset":
        return offset_scale({}, method, percentiles, dataset)
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {', '.join(METHODS)}")
    n, mean, m2, lo, hi, hist, base, floats = 0, None, None, None, None, None, None, []
    for b in blocks:
        b = b[..., None] if b.ndim == 2 else b
        flat = b.reshape(-1, b.shape[-1])
        k = flat.shape[0]
        if method == "zscore":
            bm = flat.mean(axis=0, dtype=np.float64)
            bm2 = ((flat - bm) ** 2).sum(axis=0, dtype=np.float64)
            if mean is None:
                n, mean, m2 = k, bm, bm2
            else:
                d = bm - mean
                tot = n + k
                mean = mean + d * (k / tot)
                m2 = m2 + bm2 + d * d * (n * k / tot)
                n = tot
        elif method == "minmax":
            bl, bh = flat.min(axis=0).astype(np.float64), flat.max(axis=0).astype(np.float64)
            lo = bl if lo is None else np.minimum(lo, bl)
            hi = bh if hi is None else np.maximum(hi, bh)
        elif flat.dtype.kind in "uib":
            base = int(np.iinfo(flat.dtype).min) if flat.dtype.kind == "i" else 0
            if hist is None:
                span = int(np.iinfo(flat.dtype).max) - base + 1 if flat.dtype.kind != "b" else 2
                hist = np.zeros((flat.shape[1], span), np.int64)
            for c in range(flat.shape[1]):
                hist[c] += np.bincount(flat[:, c].astype(np.int64) - base, minlength=hist.shape[1])
            n += k
        else:
            stride = -(-int(total_pixels) // max_float_samples) if total_pixels else 1
            floats.append(flat[::stride].astype(np.float32))
    if method == "zscore":
        return mean.astype(np.float32), np.maximum(np.sqrt(m2 / max(n, 1)), EPS).astype(np.float32)
    if method == "minmax":
        return lo.astype(np.float32), np.maximum(hi - lo, EPS).astype(np.float32)
    if hist is not None:
        cum = np.cumsum(hist, axis=1)
        total = cum[:, -1]
        out = []
        for q in percentiles:  # numpy's 'linear' percentile from the ranks floor(pos) and floor(pos) + 1
            pos = q / 100.0 * (total - 1)
            r0 = np.floor(pos).astype(np.int64)
            r1 = np.minimum(r0 + 1, total - 1)
            v0 = np.array([np.searchsorted(cum[c], r0[c], side="right") for c in range(len(total))]) + base
            v1 = np.array([np.searchsorted(cum[c], r1[c], side="right") for c in range(len(total))]) + base
            out.append(v0 + (pos - r0) * (v1 - v0))
        lo_v, hi_v = out
    else:
        flat = np.concatenate(floats)
        if total_pixels and total_pixels > max_float_samples:
            import logging

            logging.getLogger(__name__).warning("percentile normalisation of a float field of %d pixels from a "
                                                "regular subsample of %d", total_pixels, flat.shape[0])
        lo_v, hi_v = np.percentile(flat.astype(np.float64), list(percentiles), axis=0)
    return np.asarray(lo_v, np.float32), np.maximum(np.asarray(hi_v) - lo_v, EPS).astype(np.float32)
