"""Image-quality metrics of predicted fluorescence, in numpy (float64 accumulation), per image and channel.

Definitions (``true`` = the measured target image, ``pred`` = the prediction, same shape):

* **PCC** (thesis definition): Pearson's correlation coefficient between the pixel intensities of the
  prediction and of the target of one image and one channel,
  ``sum((p - mean p)(t - mean t)) / sqrt(sum((p - mean p)^2) * sum((t - mean t)^2))`` over all pixels.
  It is invariant to any positive affine change of either image, so it is the same on the original and
  on the z-scored scale. **A constant image (all pixels equal) in either argument gives PCC 0** -- there
  is no linear relationship to measure -- so summaries never contain NaN (a perfect prediction of a
  constant image therefore also scores 0; such images are flagged *empty* by ``evaluate``). A prediction
  (or target) with a NaN or infinite pixel gives **NaN**, never a score: a diverged model must not look
  like an uncorrelated one (``evaluate`` counts such images in its summary).
* **SSIM**: ``skimage.metrics.structural_similarity(true, pred, data_range=R)`` with scikit-image's
  defaults (7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance), mean over the image.
* **PSNR**: ``skimage.metrics.peak_signal_noise_ratio(true, pred, data_range=R)`` =
  ``10 log10(R^2 / MSE)`` in dB; ``inf`` for an exact prediction.
* **NRMSE**: ``skimage.metrics.normalized_root_mse(true, pred)`` with ``normalization="euclidean"``:
  ``||true - pred|| / ||true||``; ``inf`` when the target is all zeros.

The data range ``R`` (``default_data_range``): for an integer target, the full range of its dtype
(255 for uint8, 65535 for uint16 -- scikit-image's own convention for integer images); for a float target
(e.g. z-scored), the target image's own dynamic range ``max(true) - min(true)`` (1.0 when constant).
``islkeras evaluate`` reports the metrics on two scales, see ``islkeras.evaluation.evaluate``.

Summaries (``summarize``) give mean, std (population, ``ddof=0``) and median over images of the finite
values only, with ``n`` (images) and ``n_finite``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

METRICS = ("pcc", "ssim", "psnr", "nrmse")

__all__ = [
    "METRICS", "pcc", "pcc_channels", "noise_ceiling", "ssim", "psnr", "nrmse", "default_data_range", "image_metrics",
    "is_empty", "summarize", "summary_stats",
]


def _pair(pred, true, what: str):
    p = np.asarray(pred)
    t = np.asarray(true)
    if p.shape != t.shape:
        raise ValueError(f"{what}: prediction and target shapes differ: {p.shape} vs {t.shape}")
    if p.size == 0:
        raise ValueError(f"{what}: empty images")
    return p, t


def pcc(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation of all pixels of one image (any shape; flattened). Constant image -> 0.0;
    a non-finite pixel -> NaN."""
    p, t = _pair(pred, true, "pcc")
    p = p.astype(np.float64, copy=False).ravel()
    t = t.astype(np.float64, copy=False).ravel()
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        return float("nan")
    if p.max() == p.min() or t.max() == t.min():
        return 0.0
    pc = p - p.mean()
    tc = t - t.mean()
    denom = np.sqrt(np.dot(pc, pc) * np.dot(tc, tc))
    if not np.isfinite(denom) or denom <= 0:
        return 0.0
    return float(np.clip(np.dot(pc, tc) / denom, -1.0, 1.0))


def pcc_channels(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """PCC per channel of (H, W, C) images (2-D images count as one channel)."""
    p, t = _pair(pred, true, "pcc_channels")
    if p.ndim == 2:
        p, t = p[..., None], t[..., None]
    return np.array([pcc(p[..., c], t[..., c]) for c in range(p.shape[-1])], np.float64)


def default_data_range(true: np.ndarray, dtype=None) -> float:
    """Integer ``dtype`` (default: ``true.dtype``): the dtype's full range; float: ``max - min`` of the
    target (1.0 when the target is constant)."""
    dt = np.dtype(dtype if dtype is not None else np.asarray(true).dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return float(info.max) - float(info.min)
    if dt.kind == "b":
        return 1.0
    t = np.asarray(true)
    r = float(t.max()) - float(t.min())
    return r if r > 0 else 1.0


def _2d(p, t, what):
    p, t = _pair(p, t, what)
    if p.ndim != 2:
        raise ValueError(f"{what}: expected 2-D images (one channel), got shape {p.shape}")
    return p.astype(np.float64, copy=False), t.astype(np.float64, copy=False)


def ssim(pred: np.ndarray, true: np.ndarray, data_range: Optional[float] = None) -> float:
    """SSIM of a 2-D image (scikit-image defaults; see module doc for ``data_range``)."""
    from skimage.metrics import structural_similarity

    r = default_data_range(true) if data_range is None else float(data_range)
    p, t = _2d(pred, true, "ssim")
    return float(structural_similarity(t, p, data_range=r))


def psnr(pred: np.ndarray, true: np.ndarray, data_range: Optional[float] = None) -> float:
    """PSNR in dB of a 2-D image (``inf`` when identical)."""
    r = default_data_range(true) if data_range is None else float(data_range)
    p, t = _2d(pred, true, "psnr")
    mse = float(np.mean((t - p) ** 2))
    if mse == 0:
        return float("inf")
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(t, p, data_range=r))


def nrmse(pred: np.ndarray, true: np.ndarray) -> float:
    """``||true - pred|| / ||true||`` (``inf`` when the target is all zeros, 0 when identical)."""
    p, t = _2d(pred, true, "nrmse")
    num = float(np.sqrt(np.mean((t - p) ** 2)))
    den = float(np.sqrt(np.mean(t * t)))
    if num == 0:
        return 0.0
    if den == 0:
        return float("inf")
    from skimage.metrics import normalized_root_mse

    return float(normalized_root_mse(t, p, normalization="euclidean"))


def image_metrics(pred: np.ndarray, true: np.ndarray, data_range: Optional[float] = None,
                  suffix: str = "") -> dict:
    """``{pcc, ssim, psnr, nrmse}`` (keys + ``suffix``) of one 2-D image and channel."""
    r = default_data_range(true) if data_range is None else float(data_range)
    return {
        f"pcc{suffix}": pcc(pred, true),
        f"ssim{suffix}": ssim(pred, true, r),
        f"psnr{suffix}": psnr(pred, true, r),
        f"nrmse{suffix}": nrmse(pred, true),
    }


def noise_ceiling(true: np.ndarray, sigma: float = 2.0) -> float:
    """The target's noise ceiling: PCC of the target with its own Gaussian-smoothed copy (``sigma`` pixels,
    ``skimage.filters.gaussian``). A noise-free prediction of a noisy stain scores about this, so
    ``pcc / ceiling`` tells a model limited by the stain's noise (near 1) from one that fails (issue 13).
    NaN for a constant target."""
    from skimage.filters import gaussian

    t = np.asarray(true, np.float64)
    if t.ndim != 2:
        raise ValueError(f"noise_ceiling: expected a 2-D image, got shape {t.shape}")
    if not np.isfinite(t).all() or t.std() == 0:
        return float("nan")
    return pcc(gaussian(t, sigma=float(sigma), preserve_range=True), t)


def is_empty(true: np.ndarray, threshold: float, empty_fraction: float) -> bool:
    """True when fewer than ``empty_fraction`` of the target's pixels are above ``threshold``."""
    t = np.asarray(true)
    return float(np.count_nonzero(t > threshold)) / max(t.size, 1) < float(empty_fraction)


def summary_stats(values: Iterable[float]) -> dict:
    """mean, std (ddof=0), median of the finite values; ``n`` and ``n_finite``. None when no finite value."""
    v = np.asarray(list(values), np.float64)
    f = v[np.isfinite(v)]
    if f.size == 0:
        return {"mean": None, "std": None, "median": None, "n": int(v.size), "n_finite": 0}
    return {"mean": float(f.mean()), "std": float(f.std()), "median": float(np.median(f)),
            "n": int(v.size), "n_finite": int(f.size)}


def summarize(df, metrics: Optional[Sequence[str]] = None, channel_col: str = "channel",
              empty_col: str = "empty") -> dict:
    """Summary of a per-image metrics table (pandas DataFrame, one row per image and channel).

    Returns ``{channel: {metric: {"all": stats, "empty": stats, "non_empty": stats}}}`` (``summary_stats``)
    plus ``"_overall"`` over all channels together. Metrics default to the numeric columns named like
    ``pcc``, ``ssim``, ``psnr``, ``nrmse`` (with any suffix, e.g. ``_z``, ``_over_ceiling``), ``mask_jaccard`` and
    ``ceiling``.
    """
    if metrics is None:
        metrics = [c for c in df.columns if c.split("_")[0] in METRICS or c in ("mask_jaccard", "ceiling")]

    def block(sub) -> dict:
        out = {}
        for m in metrics:
            col = sub[m]
            entry = {"all": summary_stats(col)}
            if empty_col in sub:
                e = sub[empty_col].astype(bool)
                entry["empty"] = summary_stats(col[e])
                entry["non_empty"] = summary_stats(col[~e])
            out[m] = entry
        return out

    res = {}
    if channel_col in df:
        for ch, sub in df.groupby(channel_col, sort=False):
            res[str(ch)] = block(sub)
    res["_overall"] = block(df)
    return res
