"""Classical nucleus segmentation (scikit-image, no extra dependencies): percentile normalisation,
threshold, distance-transform watershed; parameters in :class:`ClassicalParams`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np


@dataclass
class ClassicalParams:
    """Parameters of the classical (scikit-image) nucleus segmentation.

    Pipeline: percentile-normalise to [0, 1] -> Gaussian smoothing (``sigma``) -> threshold -> fill holes
    -> remove objects < ``min_size`` px -> Euclidean distance transform, smoothed by ``dt_sigma`` ->
    markers = local maxima at least ``min_distance`` apart within each connected component -> watershed
    of the negated distance inside the foreground -> watershed fragments smaller than
    ``fragment_factor * pi * r**2`` are dissolved into their neighbours (or dropped when isolated) ->
    remove objects < ``min_size`` px again -> sequential labels.

    ``r`` is the typical nucleus radius in pixels: ``radius`` when given, else estimated per image as the
    median over connected foreground components of their maximum distance-transform value (so the
    splitting adapts to magnification).

    The defaults were chosen once by a grid search (sigma, threshold method, marker rule, fragment rule,
    dt_sigma: 120 combinations) on the even-indexed half of ``dsb2018-nuclei`` (sorted as in
    ``fields.csv``) maximising mean AP@0.5; see ``benchmarks/masks_dsb2018.py`` for the numbers on both
    halves.
    """

    sigma: float = 0.5  #: Gaussian smoothing (px) of the normalised image before thresholding; 0 = none
    #: "otsu", "li", "triangle", "yen" or "mean" (skimage.filters.threshold_*) on the smoothed image,
    #: or a number = fixed threshold on the percentile-normalised [0, 1] intensity
    threshold: Union[str, float] = "otsu"
    threshold_scale: float = 1.0  #: multiplies an automatic threshold (< 1 keeps dimmer nuclei)
    percentiles: tuple[float, float] = (1.0, 99.8)  #: normalisation: these percentiles map to 0 and 1
    fill_holes: bool = True
    min_size: int = 16  #: objects with fewer pixels are removed (before and after splitting)
    split: bool = True  #: split touching nuclei by watershed; False = connected components only
    radius: Optional[float] = None  #: typical nucleus radius (px); None = estimated per image
    min_distance_factor: float = 0.8  #: marker spacing = max(1, round(factor * r)) px
    min_distance: Optional[int] = None  #: fixed marker spacing (px), overrides min_distance_factor
    dt_sigma: float = 1.0  #: smoothing (px) of the distance transform before finding markers
    fragment_factor: float = 0.25  #: fragments < factor * pi * r^2 px are merged away; 0 = keep

    def __post_init__(self):
        if isinstance(self.threshold, str):
            t = self.threshold.strip().lower()
            try:
                self.threshold = float(t)
            except ValueError:
                if t not in _THRESHOLDS:
                    raise ValueError(
                        f"threshold must be a number or one of {', '.join(_THRESHOLDS)}, got {self.threshold!r}"
                    ) from None
                self.threshold = t
        if not isinstance(self.threshold, str) and not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"a fixed threshold is on the normalised [0, 1] scale, got {self.threshold}")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        for name in ("sigma", "dt_sigma", "fragment_factor", "min_distance_factor", "threshold_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.radius is not None and self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if self.min_distance is not None and self.min_distance < 1:
            raise ValueError(f"min_distance must be >= 1, got {self.min_distance}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d


_THRESHOLDS = ("otsu", "li", "triangle", "yen", "mean")


def normalize_percentile(img: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """float32 copy of ``img`` with the ``low``/``high`` percentiles mapped to 0/1, clipped to [0, 1]."""
    x = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(x, (low, high))
    if hi <= lo:  # (nearly) constant image
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def segment_classical(img: np.ndarray, params: Optional[ClassicalParams] = None) -> np.ndarray:
    """Instance labels (int32, 0 = background, 1..N) of the nuclei in a 2-D image; see :class:`ClassicalParams`."""
    from scipy import ndimage as ndi
    from skimage import feature, filters, measure, morphology, segmentation  # noqa: F401

    p = params or ClassicalParams()
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    x = normalize_percentile(img, *p.percentiles)
    if p.sigma > 0:
        x = filters.gaussian(x, sigma=p.sigma, preserve_range=True)
    if x.max() <= x.min():
        return np.zeros(img.shape, np.int32)
    if isinstance(p.threshold, str):
        fn = getattr(filters, f"threshold_{p.threshold}")
        t = float(fn(x)) * p.threshold_scale
    else:
        t = float(p.threshold)
    fg = x > t
    if p.fill_holes:
        fg = ndi.binary_fill_holes(fg)
    if p.min_size > 0:
        fg = morphology.remove_small_objects(fg, max_size=p.min_size - 1)
    cc, n_cc = measure.label(fg, return_num=True)  # 8-connected components
    if n_cc == 0:
        return np.zeros(img.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    if p.radius is not None:
        r = float(p.radius)
    else:
        r = float(np.median(ndi.maximum(dist, cc, index=np.arange(1, n_cc + 1))))
    r = max(r, 1.0)
    if not p.split:
        labels = cc.astype(np.int32)
    else:
        d = filters.gaussian(dist, sigma=p.dt_sigma, preserve_range=True) if p.dt_sigma > 0 else dist
        md = p.min_distance if p.min_distance is not None else max(1, int(round(p.min_distance_factor * r)))
        coords = feature.peak_local_max(d, min_distance=md, labels=cc, exclude_border=False)
        markers = np.zeros(img.shape, np.int32)
        markers[tuple(coords.T)] = np.arange(1, len(coords) + 1)
        labels = segmentation.watershed(-d, markers, mask=fg).astype(np.int32)
        orphan = fg & (labels == 0)  # components without a marker keep one label each
        if orphan.any():
            extra, _ = ndi.label(orphan)
            labels[orphan] = extra[orphan] + labels.max()
        if p.fragment_factor > 0:
            areas = np.bincount(labels.ravel())
            small = np.flatnonzero(areas < p.fragment_factor * np.pi * r * r)
            small = small[small > 0]
            if len(small):
                labels[np.isin(labels, small)] = 0
                labels = segmentation.expand_labels(labels, distance=max(2.0, r)) * fg
    if p.min_size > 0:
        areas = np.bincount(labels.ravel())
        tiny = np.flatnonzero(areas < p.min_size)
        tiny = tiny[tiny > 0]
        if len(tiny):
            labels[np.isin(labels, tiny)] = 0
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)
