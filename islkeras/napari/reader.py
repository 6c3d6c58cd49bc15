"""The napari reader: islkeras prediction TIFFs, and microscope files through ``islkeras.data.formats``.

* ``*_prediction.tif`` / ``*_prediction.tiff`` (what ``islkeras predict`` writes, see
  ``islkeras.inference.fields.write_prediction``: an ImageJ TIFF, axes ``YX`` or ``CYX``, channel names as
  labels): one image layer per channel, named by the channel, with the colormap and contrast the
  "Predict fluorescence" widget gives; the pixel size (µm) from the TIFF's resolution and ImageJ unit.
* microscope files (``islkeras.data.formats.PLUGINS``: OME-TIFF, OME-Zarr, CZI, ND2, LIF) through
  ``islkeras.data.formats.open_image``: one layer per channel, named by the channel, ``(planes, y, x)`` for
  z-stacks, scale = the file's pixel size in µm; the first time point of a time series (the layer's
  metadata says how many there are). A missing bioio plugin is one line naming the extra to install.

``get_reader(path)`` returns None for anything else, so napari's own readers take it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from islkeras.errors import DataError
from islkeras.napari.layers import colormap_for, contrast_for

PREDICTION_SUFFIXES = ("_prediction.tif", "_prediction.tiff")

PathOrPaths = Union[str, Path, list]


def _kind(path) -> Optional[str]:
    from islkeras.data.formats import PLUGINS

    name = Path(str(path).rstrip("/\\")).name.lower()
    if name.endswith(tuple(PLUGINS)):  # the patterns of napari.yaml's second reader
        return "microscope"
    if name.endswith(PREDICTION_SUFFIXES):
        return "prediction"
    return None


def get_reader(path: PathOrPaths) -> Optional[Callable]:
    """napari's ``get_reader`` hook: a reader when every path is one of ours, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(_kind(p) is None for p in paths):
        return None
    return read


def read(path: PathOrPaths) -> list[tuple]:
    """Layer data ``(data, kwargs, "image")`` of every channel of every path."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[tuple] = []
    for p in paths:
        out.extend(read_prediction(p) if _kind(p) == "prediction" else read_microscope(p))
    return out


# -------------------------------------------------------------------------------- prediction TIFFs
def _labels(ij: dict, n: int, stem: str) -> list[str]:
    labels = ij.get("Labels")
    if isinstance(labels, str):
        labels = [labels]
    labels = [str(s) for s in (labels or [])]
    return labels if len(labels) == n and all(labels) else [f"{stem}_{i}" for i in range(n)]


def read_prediction(path) -> list[tuple]:
    """One layer per channel of an islkeras prediction TIFF; ``DataError`` (one line) when it is not one."""
    import tifffile

    from islkeras.data.formats import tiff_pixel_size

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, arr = series.axes, np.asarray(series.asarray())
            ij = tif.imagej_metadata or {}
            pixel = tiff_pixel_size(tif)
    except Exception as e:
        raise DataError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
    if axes == "YX":
        arr = arr[None]
    elif axes != "CYX":
        raise DataError(f"{path}: not an islkeras prediction TIFF (axes {axes}, expected YX or CYX)")
    names = _labels(ij, arr.shape[0], path.stem)
    frame = {"scale": pixel, "units": ("micrometer", "micrometer")} if pixel else {}
    layers = []
    for i, name in enumerate(names):
        data = arr[i]
        kw = dict(name=name, colormap=colormap_for(name, i), contrast_limits=contrast_for(data),
                  blending="additive", metadata={"islkeras": {"file": str(path), "channel": name}}, **frame)
        layers.append((data, kw, "image"))
    return layers


# -------------------------------------------------------------------------------- microscope files
def read_microscope(path) -> list[tuple]:
    """One layer per channel of a microscope file (time point 0), scale from its pixel size."""
    from islkeras.data.formats import open_image

    img = open_image(path)
    pixel = img.pixel_size_um
    layers = []
    for i, name in enumerate(img.channel_names):
        a = np.asarray(img.read(i))  # (Y, X, planes)
        data = a[..., 0] if a.shape[-1] == 1 else np.moveaxis(a, -1, 0)
        cmap = colormap_for(name, i)
        meta = {"file": str(path), "channel": name, "time_points": int(img.dims.T), "time_point": 0}
        kw = dict(name=name, colormap=cmap, contrast_limits=contrast_for(data), metadata={"islkeras": meta},
                  blending="translucent" if cmap == "gray" else "additive")
        if pixel:
            kw["scale"] = (1.0,) * (data.ndim - 2) + tuple(float(s) for s in pixel)
            kw["units"] = ("pixel",) * (data.ndim - 2) + ("micrometer", "micrometer")
        layers.append((data, kw, "image"))
    return layers
