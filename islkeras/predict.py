"""Whole-field prediction: tiled inference with smooth blending, TIFF in -> TIFF out.

``predict_field(model, image, tile=512, overlap=64, batch=4)`` is the reusable core (the CLI, ``evaluate``
and the REST server call it; it knows nothing about files):

1. The raw ``(H, W, C_in)`` field is normalised ONCE with ``model.normalize`` (whole-field statistics,
   exactly what the exported ``serving_default`` graph computes for the same image).
2. It is padded at the bottom/right by reflection to a multiple of 32 (as the serving graph does), and cut
   into a grid of tiles of ``tile`` x ``tile`` pixels (smaller when the field is smaller) whose starts are
   multiples of 32, so every tile sees the network's pooling grid where a one-pass prediction would.
   Neighbouring tiles overlap by at least ``overlap`` pixels (the step is rounded down to a multiple of 32).
3. Tiles go through the bare network (``model.predict_normalized``) ``batch`` at a time.
4. Each tile's prediction is weighted by a separable ``w(y) * w(x)`` window that is 1 in the middle and
   falls off with a squared-sine (Hann) ramp across the overlap on sides that have a neighbour; the ramp
   never reaches 0 and the two ramps of a regular overlap sum to exactly 1, so there are no seams. Weighted
   sums go into one float32 array of the padded field's size; the weight sum is separable too (an outer
   product of two 1-D arrays), so no per-pixel weight image is stored.
5. The result is cropped to ``H x W`` and mapped to the target's intensity scale (``model.to_output_scale``:
   ``y = y_norm * scale + offset`` with the training set's target constants), or left as probabilities for
   segmentation models.

Memory: the normalised field (``H*W*C_in`` float32) plus the accumulator (``H*W*C_out`` float32) plus one
batch of tiles' activations -- it grows with the image's own bytes, not with whole-field activations.

Output files (``islkeras predict``): ``<out>/<name>_prediction.tif`` where ``<name>`` is the field
folder's name or the input TIFF's file name without extension (``_2``, ``_3``... appended when two inputs
share a name). ImageJ hyperstack: axes ``YX`` (one output channel) or ``CYX``, channel names as labels.

``--dtype float32`` (default) writes the prediction as it is: float32 on the training target's intensity
scale (ISL) or probabilities 0..1 (segmentation). ``--dtype uint16`` writes::

    ISL:           uint16 = clip(round(prediction), 0, 65535)
    segmentation:  uint16 = round(probability * 65535)

For an ISL model the prediction is already on the target's scale, so a uint8 or uint16 training target
comes back as the same grey values (round half to even); negative predictions (below the camera's black
level) become 0 and values above 65535 become 65535 -- the number of clipped pixels is reported.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import click
import numpy as np

from islkeras.errors import DataError, UserError

MULTIPLE = 32  #: must equal islkeras.models.unet.MULTIPLE (kept here so importing this module stays light)
MIN_SIDE = 32  #: smallest height/width predicted (smaller images would be mostly reflection padding)
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
DEFAULT_BATCH = 4
TIFF_SUFFIXES = (".tif", ".tiff")

__all__ = [
    "predict_field", "tile_plan", "blend_window", "read_input", "find_inputs", "write_prediction",
    "to_uint16", "InputItem", "predict_command", "MIN_SIDE", "DEFAULT_TILE", "DEFAULT_OVERLAP",
    "DEFAULT_BATCH",
]


# ------------------------------------------------------------------------------------------- tiling
def blend_window(length: int, ramp: int, before: bool, after: bool) -> np.ndarray:
    """1-D blending weights of one tile: 1 inside, squared-sine ramps of ``ramp`` pixels on the sides that
    have a neighbour (``before``/``after``). Never 0; two facing ramps of the same length sum to 1."""
    w = np.ones(length, np.float32)
    r = min(int(ramp), length)
    if r > 0:
        up = (np.sin(0.5 * np.pi * (np.arange(r) + 0.5) / r) ** 2).astype(np.float32)
        if before:
            w[:r] = np.minimum(w[:r], up)
        if after:
            w[length - r:] = np.minimum(w[length - r:], up[::-1])
    return w


@dataclass
class AxisPlan:
    size: int  #: padded length of the axis (multiple of 32)
    tile: int  #: tile length along the axis
    starts: list  #: tile starts (multiples of 32)
    windows: list  #: blending window per tile
    wsum: np.ndarray  #: sum of the windows over the axis (> 0 everywhere)


def _axis_plan(size: int, tile: int, overlap: int) -> AxisPlan:
    t = min(tile, size)
    if t == size:
        starts = [0]
    else:
        step = max(MULTIPLE, (t - overlap) // MULTIPLE * MULTIPLE)
        starts = list(range(0, size - t, step)) + [size - t]
    ramp = t - (starts[1] - starts[0]) if len(starts) > 1 else 0
    windows = [blend_window(t, ramp, s > 0, s + t < size) for s in starts]
    wsum = np.zeros(size, np.float32)
    for s, w in zip(starts, windows):
        wsum[s:s + t] += w
    return AxisPlan(size, t, starts, windows, wsum)


def tile_plan(height: int, width: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP):
    """(rows, cols) ``AxisPlan``s for a field of ``height x width`` pixels (padded to a multiple of 32)."""
    _check_tiling(tile, overlap)
    hp, wp = _padded(height), _padded(width)
    return _axis_plan(hp, tile, overlap), _axis_plan(wp, tile, overlap)


def _padded(n: int) -> int:
    return -(-int(n) // MULTIPLE) * MULTIPLE


def _check_tiling(tile: int, overlap: int) -> None:
    if tile < MULTIPLE or tile % MULTIPLE:
        raise UserError(f"tile size {tile}: must be a multiple of {MULTIPLE} (e.g. 256, 512, 1024)")
    if overlap < 0 or overlap > tile - MULTIPLE:
        raise UserError(f"tile overlap {overlap}: must be between 0 and tile size - {MULTIPLE} ({tile - MULTIPLE})")


def check_image(image: np.ndarray, n_inputs: int, what: str = "image") -> np.ndarray:
    """An (H, W, C) view of ``image`` after checking it can be predicted; DataError otherwise."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise DataError(f"{what}: expected a 2-D image or an (height, width, channels) array, got shape {a.shape}")
    h, w, c = a.shape
    if c != n_inputs:
        raise DataError(f"{what}: the model takes {n_inputs} input plane(s), the image has {c} (shape {a.shape})")
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{what}: {h} x {w} pixels is too small; height and width must be at least {MIN_SIDE}")
    if a.dtype.kind not in "uifb":
        raise DataError(f"{what}: unsupported pixel type {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{what}: contains NaN or infinite pixel values")
    return a


def predict_field(model, image: np.ndarray, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                  batch: int = DEFAULT_BATCH, output_scale: bool = True,
                  callback: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Predict a whole field of any size with overlapping, smoothly blended tiles (see module doc).

    ``model``: an ``islkeras.export.savedmodel.ExportedModel``. ``image``: the raw ``(H, W, C_in)`` field
    (or ``(H, W)`` for one input plane) in any numeric dtype. Returns ``(H, W, C_out)`` float32 on the
    target's intensity scale (``output_scale=False``: the network's normalised output). ``callback(done,
    total)`` is called after every batch of tiles. Raises ``DataError`` for images that cannot be predicted
    and ``UserError`` for a bad tile size/overlap.
    """
    a = check_image(image, int(model.n_inputs))
    if batch < 1:
        raise UserError(f"batch {batch}: must be >= 1")
    h, w, _ = a.shape
    rows, cols = tile_plan(h, w, tile, overlap)
    x = model.normalize(a)  # (H, W, C_in) float32, whole-field statistics
    if (rows.size, cols.size) != (h, w):  # reflection needs pad < size: guaranteed by MIN_SIDE >= 32
        x = np.pad(x, ((0, rows.size - h), (0, cols.size - w), (0, 0)), mode="reflect")
    n_out = int(model.n_outputs)
    acc = np.zeros((rows.size, cols.size, n_out), np.float32)
    coords = [(i, j) for i in range(len(rows.starts)) for j in range(len(cols.starts))]
    th, tw = rows.tile, cols.tile
    for b0 in range(0, len(coords), batch):
        chunk = coords[b0:b0 + batch]
        tiles = np.stack([x[rows.starts[i]:rows.starts[i] + th, cols.starts[j]:cols.starts[j] + tw] for i, j in chunk])
        pred = model.predict_normalized(tiles)
        for k, (i, j) in enumerate(chunk):
            y0, x0 = rows.starts[i], cols.starts[j]
            wgt = (rows.windows[i][:, None] * cols.windows[j][None, :])[..., None]
            acc[y0:y0 + th, x0:x0 + tw] += pred[k] * wgt
        if callback is not None:
            callback(min(b0 + batch, len(coords)), len(coords))
    del x
    out = acc[:h, :w]
    for r0 in range(0, h, 512):  # divide by the separable weight sum, in row blocks (no full-size temporary)
        r1 = min(r0 + 512, h)
        out[r0:r1] /= (rows.wsum[r0:r1, None] * cols.wsum[None, :w])[..., None]
    if out.shape != acc.shape:
        out = np.ascontiguousarray(out)
        del acc
    return _to_output_scale(model, out) if output_scale else out


def _to_output_scale(model, pred: np.ndarray) -> np.ndarray:
    """``model.to_output_scale`` done in place on a float32 array (saves two field-sized temporaries)."""
    meta = getattr(model, "meta", {}) or {}
    ts = meta.get("target_scale")
    if meta.get("kind") == "isl" and ts is not None and pred.dtype == np.float32:
        pred *= np.asarray(ts["scale"], np.float32)
        pred += np.asarray(ts["offset"], np.float32)
        return pred
    return model.to_output_scale(pred)
