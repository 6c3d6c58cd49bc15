"""OME-Zarr read and written region by region: the format of fields too large for memory.

* :func:`open_ome_zarr` -> :class:`LazyOmeZarr`: the first (full-resolution) array of an OME-Zarr image
  (NGFF 0.4 on Zarr v2 or 0.5 on Zarr v3; a bare Zarr array with axes ``[t][c][z]yx`` too), opened without
  reading pixels. ``region(c, zs, t, y0, y1, x0, x1)`` reads only the chunks that hold those pixels:
  ``(y1 - y0, x1 - x0, len(zs))`` in the stored dtype. Channel names come from ``omero.channels[].label``,
  the pixel size from the level's ``scale`` transform and the axes' units.
* :class:`OmeZarrWriter`: a ``(C, Y, X)`` float32 OME-Zarr image (NGFF 0.4, Zarr v2 - what napari-ome-zarr,
  Fiji's MoBIE / BigDataViewer, bioio-ome-zarr and ``ome-zarr-py`` read), written under a temporary sibling
  name and renamed to its name only when :meth:`OmeZarrWriter.finish` is called, so an interrupted run never
  leaves an image that looks complete. ``add(y0, x0, block)`` adds a block to what is stored (unwritten
  chunks read as 0): blended tiles are summed in place, region by region.

``data.formats`` reads whole planes of every format (OME-Zarr included, through bioio); this module is the
region-wise path, with zarr itself (installed with the ``formats`` extra). Every problem a user can fix is a
``DataError`` naming the path: not a Zarr store, no image array, an axis missing, a chunk that cannot be
decoded (corrupt or truncated).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from islkeras.errors import DataError

EXTRA = "pip install 'islkeras[formats]'"
_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
             "angstrom": 1e-4}


def _zarr():
    try:
        import zarr
    except ImportError:
        raise DataError(f"reading or writing OME-Zarr region by region needs zarr: {EXTRA}") from None
    return zarr


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class LazyOmeZarr:
    """The full-resolution array of one OME-Zarr image, read region by region (see the module doc)."""

    def __init__(self, path: Union[str, Path]):
        zarr = _zarr()
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such OME-Zarr folder")
        try:
            node = zarr.open(str(self.path), mode="r")
        except Exception as e:
            raise DataError(f"{self.path}: not a Zarr store ({_short(e)})") from None
        attrs = dict(getattr(node, "attrs", {}) or {})
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        omero = attrs.get("omero") or (attrs.get("ome") or {}).get("omero") or {}
        if isinstance(node, zarr.Array):
            arr, axes, scale, units = node, None, None, {}
        else:
            if not ms:
                raise DataError(f"{self.path}: not an OME-Zarr image (no 'multiscales' in its attributes)")
            level = ms[0]["datasets"][0]
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])] or None
            units = {a["name"]: a.get("unit") for a in ms[0].get("axes", []) if isinstance(a, dict)}
            scale = next((t.get("scale") for t in level.get("coordinateTransformations", [])
                          if t.get("type") == "scale"), None)
            try:
                arr = node[level["path"]]
            except KeyError:
                raise DataError(f"{self.path}: the image array {level['path']!r} named by 'multiscales' is "
                                f"missing") from None
        if axes is None:  # a bare array: the last two axes are y, x; before them [t][c][z] as in NGFF
            axes = ["t", "c", "z", "y", "x"][5 - arr.ndim:] if 2 <= arr.ndim <= 5 else None
        if axes is None or len(axes) != arr.ndim or "y" not in axes or "x" not in axes:
            raise DataError(f"{self.path}: expected axes [t][c][z]yx, got {axes} for an array of shape {arr.shape}")
        self._arr, self.axes = arr, [a.lower() for a in axes]
        size = dict(zip(self.axes, arr.shape))
        self.shape_tczyx = tuple(int(size.get(a, 1)) for a in "tczyx")
        self.dtype = np.dtype(arr.dtype)
        labels = [c.get("label") for c in omero.get("channels", [])] if isinstance(omero, dict) else []
        n_c = self.shape_tczyx[1]
        self.channel_names = ([str(x) for x in labels] if len(labels) == n_c and all(labels)
                              else [f"channel_{i}" for i in range(n_c)])
        self.pixel_size_um = None
        if scale is not None and len(scale) == len(self.axes):
            s = dict(zip(self.axes, scale))
            f = [_UNITS_UM.get(str(units.get(a) or "micrometer").lower()) for a in "yx"]
            if None not in f:
                self.pixel_size_um = (float(s["y"]) * f[0], float(s["x"]) * f[1])

    @property
    def height(self) -> int:
        return self.shape_tczyx[3]

    @property
    def width(self) -> int:
        return self.shape_tczyx[4]

    def channel_index(self, channel) -> int:
        names = self.channel_names
        if channel is None:
            if len(names) == 1:
                return 0
            raise DataError(f"{self.path}: the image holds {len(names)} channels ({', '.join(names)}); name the one "
                            f"to read (--file-channel)")
        if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            if 0 <= channel < len(names):
                return int(channel)
            raise DataError(f"{self.path}: channel index {channel} is beyond its {len(names)} channel(s)")
        folded = [n.casefold() for n in names]
        if str(channel).casefold() in folded:
            return folded.index(str(channel).casefold())
        raise DataError(f"{self.path}: no channel {channel!r} in the image (its channels: {', '.join(names)})")

    def region(self, c: int, zs: Sequence[int], t: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``(y1 - y0, x1 - x0, len(zs))`` pixels of channel ``c``, planes ``zs``, time ``t``."""
        idx = {"t": t, "c": c, "y": slice(y0, y1), "x": slice(x0, x1)}
        sel = tuple(idx.get(a, list(zs) if a == "z" else 0) for a in self.axes)
        if "z" in self.axes and len(zs) == 1:
            sel = tuple(zs[0] if a == "z" else s for a, s in zip(self.axes, sel))
        try:
            block = np.asarray(self._arr.oindex[sel] if any(isinstance(s, list) for s in sel) else self._arr[sel])
        except Exception as e:  # a chunk the codec cannot decode: corrupt or truncated file
            raise DataError(f"{self.path}: unreadable chunk in rows {y0}-{y1}, columns {x0}-{x1} (corrupt or "
                            f"truncated? {_short(e)})") from None
        if block.ndim == 2:
            block = block[..., None]
        else:  # (z, y, x) -> (y, x, z)
            block = np.moveaxis(block, 0, -1)
        return block


def open_ome_zarr(path: Union[str, Path]) -> LazyOmeZarr:
    return LazyOmeZarr(path)


def _ngff_attrs(name: str, channel_names: Sequence[str], pixel_size_um) -> dict:
    sy, sx = pixel_size_um or (1.0, 1.0)
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    return {
        "multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, float(sy), float(sx)]}]}]}],
        "omero": {"version": "0.4", "channels": [{"label": str(n), "active": True} for n in channel_names]},
        "islkeras": {"pixel_size_known": pixel_size_um is not None},
    }


class OmeZarrWriter:
    """A ``(C, height, width)`` OME-Zarr image written region by region (see the module doc)."""

    def __init__(self, path: Union[str, Path], height: int, width: int, channel_names: Sequence[str],
                 pixel_size_um: Optional[tuple[float, float]] = None, chunk: int = 512, dtype="float32"):
        zarr = _zarr()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent))
        self.shape = (len(channel_names), int(height), int(width))
        self.channel_names, self.pixel_size_um = list(channel_names), pixel_size_um
        self._group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        c = min(chunk, height), min(chunk, width)
        self._arr = self._group.create_array("0", shape=self.shape, chunks=(1,) + c, dtype=dtype, fill_value=0)

    def _region(self, y0: int, x0: int, block: np.ndarray):
        h = min(block.shape[0], self.shape[1] - y0)
        w = min(block.shape[1], self.shape[2] - x0)
        if h <= 0 or w <= 0:
            return None, None
        return (slice(None), slice(y0, y0 + h), slice(x0, x0 + w)), np.moveaxis(block[:h, :w], -1, 0)

    def add(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Add ``block`` (``(h, w, C)``) to the stored values at rows ``y0..``, columns ``x0..`` (clipped)."""
        region, b = self._region(y0, x0, block)
        if region is not None:
            self._arr[region] = self._arr[region] + b

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Store ``block`` (``(h, w, C)``) at rows ``y0..``, columns ``x0..`` (clipped)."""
        region, b = self._region(y0, x0, block)
        if region is not None:
            self._arr[region] = b

    def read(self) -> np.ndarray:
        return np.asarray(self._arr[...])

    def map_bands(self, fn, rows: int = 512) -> None:
        """Replace the stored values by ``fn(band)``, ``(C, rows, width)`` bands at a time."""
        for y in range(0, self.shape[1], rows):
            self._arr[:, y:y + rows] = fn(np.asarray(self._arr[:, y:y + rows]))

    def finish(self) -> Path:
        """Write the NGFF metadata and give the image its name (an older one of that name is replaced)."""
        self._group.attrs.update(_ngff_attrs(self.path.name, self.channel_names, self.pixel_size_um))
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.path.rename(old)
            self.tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_ome_zarr(path: Union[str, Path], image: np.ndarray, channel_names: Optional[Sequence[str]] = None,
                   pixel_size_um: Optional[tuple[float, float]] = None, chunk: int = 512) -> Path:
    """An ``(Y, X, C)`` (or ``(Y, X)``) array as an NGFF 0.4 OME-Zarr image, in row bands (a memory-mapped
    array is never read whole)."""
    a = np.asarray(image) if not isinstance(image, np.memmap) else image
    a = a[..., None] if a.ndim == 2 else a
    names = list(channel_names or [f"channel_{i}" for i in range(a.shape[-1])])
    w = OmeZarrWriter(path, a.shape[0], a.shape[1], names, pixel_size_um, chunk, dtype=a.dtype)
    try:
        for y in range(0, a.shape[0], chunk):
            w.write(y, 0, np.asarray(a[y:y + chunk]))
        return w.finish()
    except BaseException:
        w.abort()
        raise
