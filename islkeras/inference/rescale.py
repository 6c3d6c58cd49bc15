"""Predicting at the model's pixel size: ``islkeras predict --pixel-size UM`` / ``--diameter PX|auto``.

The field is resampled (scikit-image ``resize``, bilinear, anti-aliased when shrinking) by ``factor`` to the
model's working grid, predicted there (``predict_field``) and the prediction resampled back to the input grid,
so the output has the input's shape. The factor is

    --pixel-size UM:   UM / meta.pixel_size_um          (the field's pixel size over the model's)
    --diameter PX:     meta.nuclei_diameter_px / PX     (nuclei as wide as in the training targets)
    --diameter auto:   as PX, with PX = nuclei_diameter() of a first prediction at native scale

(``meta`` = the exported model's ``assets/islkeras.json``). Factors outside [0.2, 5] are refused.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import numpy as np

from islkeras.errors import DataError, UserError
from islkeras.inference.tiling import predict_field

__all__ = ["FACTOR_RANGE", "check_pixel_size", "parse_diameter", "check_options", "resample", "field_factor",
           "predict_rescaled"]

FACTOR_RANGE = (0.2, 5.0)


def check_pixel_size(um, what: str = "--pixel-size", expected: str = "a pixel size in micrometres") -> float:
    """``um`` as a finite float > 0 (UserError naming the option, the value and what was expected otherwise)."""
    try:
        v = float(um)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} {um!r}: expected {expected} > 0")
    return v


def parse_diameter(text) -> Union[str, float, None]:
    """``--diameter``: None, ``"auto"`` or a nucleus diameter in pixels > 0."""
    if text is None:
        return None
    if str(text).strip().lower() == "auto":
        return "auto"
    return check_pixel_size(text, "--diameter", "a nucleus diameter in pixels")


def check_factor(factor: float, why: str) -> float:
    lo, hi = FACTOR_RANGE
    if not (math.isfinite(factor) and lo <= factor <= hi):
        raise UserError(f"resampling factor {factor:.4g} ({why}) is outside [{lo}, {hi}]")
    return float(factor)


def check_options(meta: Mapping, pixel_size=None, diameter=None) -> Optional[float]:
    """Validate ``--pixel-size`` / ``--diameter`` against the model's metadata before anything is predicted;
    returns the fixed factor (None for no rescaling or ``--diameter auto``, which is per field)."""
    if pixel_size is not None and diameter is not None:
        raise UserError(f"--pixel-size {pixel_size} and --diameter {diameter}: give one of them")
    if pixel_size is not None:
        um = check_pixel_size(pixel_size)
        model_um = meta.get("pixel_size_um")
        if model_um is None:
            raise UserError(f"--pixel-size {pixel_size}: the model's metadata has no pixel_size_um (exported "
                            "before pixel sizes were recorded); use --diameter PX or --diameter auto instead")
        model_um = check_pixel_size(model_um, "model pixel_size_um")
        return check_factor(um / model_um, f"--pixel-size {um:g} / model pixel size {model_um:g} um")
    if diameter is not None:
        d = parse_diameter(diameter)
        if meta.get("nuclei_diameter_px") is None:
            raise UserError(f"--diameter {diameter}: the model's metadata has no nuclei_diameter_px (exported "
                            "before nucleus sizes were recorded)")
        if d == "auto":
            return None
        model_d = check_pixel_size(meta["nuclei_diameter_px"], "model nuclei_diameter_px", "a diameter in pixels")
        return check_factor(model_d / d, f"model nuclei diameter {model_d:g} px / --diameter {d:g} px")
    return None


def resample(image: np.ndarray, shape) -> np.ndarray:
    """(H, W[, C]) -> ``shape`` (h, w) float32: bilinear, anti-aliased when shrinking, values kept."""
    from skimage.transform import resize

    a = np.asarray(image)
    h, w = int(shape[0]), int(shape[1])
    if a.shape[:2] == (h, w):
        return a.astype(np.float32, copy=False)
    shrink = h < a.shape[0] or w < a.shape[1]
    out = resize(a.astype(np.float32, copy=False), (h, w) + a.shape[2:], order=1, mode="reflect",
                 anti_aliasing=shrink, preserve_range=True)
    return out.astype(np.float32, copy=False)


def field_factor(model, image: np.ndarray, settings, where: str = "field", **kw) -> Optional[float]:
    """The factor for one field (``settings.pixel_size``/``settings.diameter``, see the module doc)."""
    if settings.diameter != "auto":
        return check_options(model.meta, settings.pixel_size, settings.diameter)
    from islkeras.data.objects import nuclei_diameter

    first = predict_field(model, image, **kw)
    d = nuclei_diameter(first[..., 0])
    if not math.isfinite(d):
        raise DataError(f"{where}: --diameter auto found no objects in the first prediction (empty field?); "
                        "give --diameter PX")
    model_d = float(model.meta["nuclei_diameter_px"])
    return check_factor(model_d / d, f"{where}: model nuclei diameter {model_d:g} px / estimated {d:.3g} px")


def predict_rescaled(model, image: np.ndarray, factor: Optional[float], **kw) -> np.ndarray:
    """``predict_field`` on the field resampled by ``factor``, the prediction resampled back to the input
    grid (``factor`` None or 1: ``predict_field`` as is). ``kw``: tile, overlap, batch, tta."""
    if factor is None or factor == 1:
        return predict_field(model, image, **kw)
    h, w = image.shape[:2]
    small = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    pred = predict_field(model, resample(image, small), **kw)
    return resample(pred, (h, w))
