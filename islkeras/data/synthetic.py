"""Synthetic microscopy fields for the demo and tests: TIFF folders that go through ``islkeras convert``.

``write_synthetic(out_dir, n_fields=10, size=256, seed=0)`` writes ``field_NNN/{transmitted,nuclei,mask}.tif``
(the layout ``experiments/demo.json`` expects):

* ``transmitted.tif`` (uint16): a bright-field/phase-like image: uneven illumination and fine background
  texture, cells as slightly dark cytoplasm bodies with a bright halo at their edge, and a darker, granular
  nucleus inside each cell with a thin bright nuclear rim -- so the nuclei are visible (learnable) in it;
* ``nuclei.tif`` (uint16): the matching nuclear fluorescence: blurred nuclei of varying brightness with
  granular chromatin texture, a camera offset and shot/read noise;
* ``mask.tif`` (uint8): the binary nucleus mask (1 = nucleus).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np


def _smooth_noise(rng, shape, sigma):
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-12)


def synthetic_field(size: int = 256, rng=None, n_cells=None) -> dict[str, np.ndarray]:
    """One synthetic field: {"transmitted": uint16, "nuclei": uint16, "mask": uint8}, each (size, size)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(rng)
    h = w = int(size)
    if n_cells is None:
        n_cells = max(3, int(rng.poisson(14 * (h * w) / 256 ** 2)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cell = np.zeros((h, w), np.float32)  # cytoplasm body
    halo = np.zeros((h, w), np.float32)
    nuc = np.zeros((h, w), bool)
    nuc_level = np.zeros((h, w), np.float32)
    scale = size / 256.0
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        a, b = rng.uniform(13, 24) * max(scale, 0.5) ** 0.5, rng.uniform(10, 19) * max(scale, 0.5) ** 0.5
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(th) + dy * np.sin(th)) / a
        v = (-dx * np.sin(th) + dy * np.cos(th)) / b
        r = np.sqrt(u ** 2 + v ** 2)
        cell = np.maximum(cell, (r < 1).astype(np.float32))
        halo += np.exp(-((r - 1.05) / 0.08) ** 2)
        # nucleus: smaller ellipse, off-centre inside the cell
        na, nb = a * rng.uniform(0.42, 0.55), b * rng.uniform(0.5, 0.65)
        ncy = cy + rng.uniform(-0.2, 0.2) * b
        ncx = cx + rng.uniform(-0.2, 0.2) * a
        nth = th + rng.uniform(-0.4, 0.4)
        dy, dx = yy - ncy, xx - ncx
        u = (dx * np.cos(nth) + dy * np.sin(nth)) / na
        v = (-dx * np.sin(nth) + dy * np.cos(nth)) / nb
        inside = (u ** 2 + v ** 2) < 1
        nuc |= inside
        nuc_level = np.where(inside, np.maximum(nuc_level, rng.uniform(0.5, 1.0)), nuc_level)
    chromatin = gaussian_filter(rng.standard_normal((h, w)), 1.2)
    chromatin /= chromatin.std() + 1e-12
    nucf = nuc.astype(np.float32)
    nuc_rim = np.clip(gaussian_filter(nucf, 1.0) - gaussian_filter(nucf, 2.5), 0, None)
    nuc_rim /= nuc_rim.max() + 1e-12

    # transmitted light: illumination gradient, fine texture, dark cell bodies, bright halos, dark nuclei
    illum = 1.0 + 0.15 * _smooth_noise(rng, (h, w), 40) + 0.1 * (xx / w - 0.5)
    tl = 0.55 * illum
    tl += 0.02 * _smooth_noise(rng, (h, w), 2)
    tl -= 0.06 * gaussian_filter(cell, 1.5)
    tl += 0.10 * np.clip(halo, 0, 1.5)
    tl -= 0.14 * gaussian_filter(nucf, 1.2) * (1 + 0.25 * chromatin)
    tl += 0.05 * nuc_rim
    tl += 0.01 * rng.standard_normal((h, w))
    transmitted = np.clip(tl * 40000, 0, 65535).astype(np.uint16)

    # fluorescence: blurred nuclei with chromatin texture, offset + noise
    fl = gaussian_filter(nuc_level * (1 + 0.2 * chromatin), 1.5)
    fl = 500 + 6000 * np.clip(fl, 0, None)
    fl = rng.poisson(fl).astype(np.float64) + rng.normal(0, 20, (h, w))
    nuclei = np.clip(fl, 0, 65535).astype(np.uint16)
    return {"transmitted": transmitted, "nuclei": nuclei, "mask": nuc.astype(np.uint8)}


def write_synthetic(out_dir: Union[str, Path], n_fields: int = 10, size: int = 256, seed: int = 0) -> list[Path]:
    """Write ``n_fields`` synthetic fields as ``out_dir/field_NNN/{transmitted,nuclei,mask}.tif``.

    Deterministic for a given seed. Files are written atomically; returns the field folders.
    """
    import tifffile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dirs = []
    for i in range(n_fields):
        fld = out / f"field_{i:03d}"
        fld.mkdir(exist_ok=True)
        arrays = synthetic_field(size, rng)
        for name, arr in arrays.items():
            tmp = fld / f".{name}.tif.tmp"
            tifffile.imwrite(tmp, arr, compression="zlib", metadata={"axes": "YX"})
            tmp.replace(fld / f"{name}.tif")
        dirs.append(fld)
    return dirs
