"""Objects of an image (Otsu foreground, connected components) and their size: the nucleus diameter that
``islkeras predict --diameter auto`` estimates in a field's first prediction and that conversion can record for
the training targets (``nuclei_diameter_px`` in an exported model's metadata). numpy/scikit-image only."""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_AREA", "nuclei_diameter"]

MIN_AREA = 10  #: objects smaller than this (pixels) are noise, not nuclei


def nuclei_diameter(image: np.ndarray, min_area: int = MIN_AREA) -> float:
    """Median equivalent diameter (pixels) of the Otsu objects of a 2-D image (a nuclei stain or its
    prediction), objects below ``min_area`` pixels ignored; NaN when there is no object. Scale-covariant:
    the same image upsampled 2x gives ~2x the diameter."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    a = np.asarray(image, np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"nuclei_diameter: expected a 2-D image, got shape {a.shape}")
    finite = np.isfinite(a)
    if not finite.any() or np.ptp(a[finite]) == 0:
        return float("nan")
    a = np.where(finite, a, np.nanmin(a[finite]))
    mask = a > threshold_otsu(a)
    d = [r.equivalent_diameter_area for r in regionprops(label(mask)) if r.area >= min_area]
    return float(np.median(d)) if d else float("nan")
