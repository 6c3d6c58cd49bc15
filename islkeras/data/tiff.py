"""Read the channels of one field from microscope files, as the config's ``ChannelSpec`` describes them.

A field is a folder (``data.root/<field>/``) holding one TIFF per channel; ``ChannelSpec.file`` is a file
name or glob inside that folder, or a pattern containing ``{field}`` resolved against ``data.root``
(e.g. ``"images/{field}.tif"`` for flat layouts). Every channel comes back as an ``(H, W, planes)`` array
in the file's own dtype (``uint8``, ``uint16``, ``float32``...):

* 2-D files give one plane; 3-D (or higher) files give one plane per index of their non-YX axes, taken from
  tifffile's series axes (``ZYX``, ``CYX``, ``YXS`` (RGB), ``TZCYX``...: Y and X are found by name, the
  other axes are flattened in file order into the plane axis, singleton axes are dropped);
* ``planes`` picks z indices (``"all"`` = every plane), ``projection`` collapses the picked planes into
  one (``max`` keeps the dtype, ``mean`` gives ``float32``).

A spec with a ``channel`` (a name or an index inside a multi-channel file) or a ``time`` point, and every
file that is not a TIFF (CZI, ND2, LIF, OME-Zarr...), is read through ``islkeras.data.formats.open_image``:
``planes`` then index the z planes of that one channel at that time point (e.g. ``{"file": "{field}.czi",
"channel": "DAPI", "planes": [3]}``); a file holding several channels needs ``channel``. TIFFs without
either key are read as above, exactly as before (no extra needed). Headers also give the pixel size (y, x)
in micrometres when the file has one (``ChannelHeader.pixel_size_um``).

Every problem a user can fix raises ``islkeras.errors.DataError`` naming the field and the file.
"""
from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from islkeras.data import formats as _formats
from islkeras.errors import DataError

#: dtypes stored as they are; others are converted (see ``_storage_dtype``)
STORED_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


@dataclass
class ChannelHeader:
    """What a TIFF header says about a channel, before reading any pixel."""

    path: Path
    shape: tuple  #: (H, W, n_planes_in_file)
    dtype: str  #: the file's dtype
    axes: str
    pixel_size_um: Optional[tuple] = None  #: (y, x) in micrometres from the file's metadata, when it has one


def field_names(root: str | Path, pattern: str = "*", channels: Optional[Mapping] = None) -> list[str]:
    """Sorted names of the field folders under ``root`` matching the glob ``pattern``.

    When no folder matches and every channel file is a ``{field}`` pattern, the field names are taken from
    the files matching the first channel's pattern (flat layouts such as ``images/{field}.tif``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder")
    names = sorted(p.name for p in root.glob(pattern)
                   if p.is_dir() and not p.name.startswith(".") and not _formats.is_image_path(p))
    if not names and channels:
        specs = list(channels.values())
        if specs and all("{field}" in s.file for s in specs):
            pat = specs[0].file
            before, after = pat.split("{field}", 1)
            found = glob.glob(str(root / pat.replace("{field}", "*")))
            for f in found:
                rel = os.path.relpath(f, root)
                name = rel[len(before):len(rel) - len(after) if after else None]
                if fnmatch.fnmatch(name, pattern):
                    names.append(name)
            names = sorted(set(names))
    if not names:
        raise DataError(f"no field folders matching {pattern!r} in {root} (data.fields); is data.root right?")
    return names


def channel_path(root: str | Path, field: str, channel: str, spec) -> Path:
    """The one file holding ``channel`` of ``field`` (glob in the field folder, or a ``{field}`` pattern)."""
    root = Path(root)
    if "{field}" in spec.file:
        pattern = str(root / spec.file.replace("{field}", glob.escape(field)))
    else:
        pattern = str(root / glob.escape(field) / spec.file)
    matches = sorted(glob.glob(pattern))
    matches = [m for m in matches if os.path.isfile(m) or _formats.is_image_path(m)]  # OME-Zarr: a folder
    if not matches:
        raise DataError(f"field {field}: channel {channel!r}: no file matching {pattern} (data.channels.{channel}.file)")
    if len(matches) > 1:
        names = ", ".join(os.path.basename(m) for m in matches[:5])
        raise DataError(
            f"field {field}: channel {channel!r}: {len(matches)} files match {pattern} ({names}); "
            f"make data.channels.{channel}.file match exactly one"
        )
    return Path(matches[0])


def _plane_layout(axes: str, shape: Sequence[int], where: str) -> tuple[int, int, int]:
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes:
        if len(shape) >= 2:  # unnamed axes: the last two are the image
            return int(shape[-2]), int(shape[-1]), int(np.prod(shape[:-2], dtype=np.int64))
        raise DataError(f"{where}: not an image (shape {tuple(shape)}, axes {axes})")
    h, w = int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    n = int(np.prod(shape, dtype=np.int64)) // max(h * w, 1)
    return h, w, n


def uses_formats(path, spec) -> bool:
    """Whether ``spec`` is read through ``formats.open_image`` (see the module doc) or tifffile as before."""
    return (spec is not None and (getattr(spec, "channel", None) is not None or getattr(spec, "time", 0) != 0)
            or not _formats.is_tiff(path))


def _open(path: Path, spec, field: str, channel: str):
    """The opened image and the channel index it reads (DataError naming the field, channel and key)."""
    where = f"field {field}: channel {channel!r}"
    try:
        img = _formats.open_image(path)
    except DataError as e:
        raise DataError(f"{where}: {e.format_message()}") from None
    try:
        c = img.channel_index(getattr(spec, "channel", None))
    except DataError as e:
        raise DataError(f"{where}: {e.format_message()} (data.channels.{channel}.channel; "
                        f"islkeras predict: --file-channel {channel}=NAME)") from None
    t = getattr(spec, "time", 0)
    if not 0 <= t < img.dims.T:
        raise DataError(f"{where}: {path}: time point {t} is beyond the file's {img.dims.T} time point(s) "
                        f"(valid 0..{img.dims.T - 1}; data.channels.{channel}.time)")
    return img, c


def read_header(path: Path, field: str, channel: str, spec=None) -> ChannelHeader:
    """Open a file and read its shape/axes/dtype/pixel size (fast: no pixel data). With ``spec`` (needed for
    a ``channel``/``time`` key or a non-TIFF file), the planes are those of the selected channel."""
    import tifffile

    where = f"field {field}: channel {channel!r}: {path}"
    if uses_formats(path, spec):
        img, _ = _open(Path(path), spec, field, channel)
        return ChannelHeader(path=Path(path), shape=(img.dims.Y, img.dims.X, img.dims.Z), dtype=img.dtype.name,
                             axes=img.format, pixel_size_um=img.pixel_size_um)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(f"{where}: the TIFF holds no image")
            s = tif.series[0]
            shape, axes, dtype = tuple(s.shape), s.axes, np.dtype(s.dtype)
            pixel_size = _formats.tiff_pixel_size(tif)
    except DataError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, OSError...
        raise DataError(f"{where}: unreadable or truncated TIFF ({type(e).__name__}: {e})") from None
    h, w, n = _plane_layout(axes, shape, where)
    return ChannelHeader(path=Path(path), shape=(h, w, n), dtype=str(dtype), axes=axes, pixel_size_um=pixel_size)


def selected_planes(spec, n_planes: int, where: str) -> list[int]:
    if spec.planes == "all":
        return list(range(n_planes))
    bad = [p for p in spec.planes if p >= n_planes]
    if bad:
        raise DataError(
            f"{where}: z index {bad[0]} is beyond the stack, which has {n_planes} plane(s) "
            f"(valid 0..{n_planes - 1}; data.channels.*.planes)"
        )
    return list(spec.planes)


def output_planes(spec, n_planes: int) -> int:
    """Number of planes stored for a channel with ``n_planes`` in its file."""
    if spec.projection != "none":
        return 1
    return n_planes if spec.planes == "all" else len(spec.planes)


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.name in STORED_DTYPES:
        return dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.int8:
        return np.dtype(np.int16)
    return np.dtype(np.float32)  # float16/float64/uint32/(u)int64


def stored_dtype(spec, file_dtype: str) -> str:
    """The dtype a channel is stored in (its own, except ``mean`` projections and unsupported dtypes)."""
    if spec.projection == "mean":
        return "float32"
    return _storage_dtype(np.dtype(file_dtype)).name


def _to_hwp(arr: np.ndarray, axes: str) -> np.ndarray:
    axes = axes.upper()
    if "Y" in axes and "X" in axes:
        order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
        arr = np.transpose(arr, order)
    h, w = arr.shape[-2:]
    return np.moveaxis(arr.reshape(-1, h, w), 0, -1)  # (H, W, planes)


def select_planes(arr: np.ndarray, spec, where: str) -> np.ndarray:
    """The spec's z planes of an (H, W, planes) array (all of them for ``planes: "all"``)."""
    planes = selected_planes(spec, arr.shape[-1], where)
    return arr if spec.planes == "all" else arr[..., planes]


def project(arr: np.ndarray, spec) -> np.ndarray:
    """The spec's projection of an (H, W, planes) array: ``max``, ``mean`` (float32) or none."""
    if spec.projection == "max":
        return arr.max(axis=-1, keepdims=True)
    if spec.projection == "mean":
        return arr.astype(np.float64).mean(axis=-1, keepdims=True).astype(np.float32)
    return arr


def read_channel(path: Path, spec, field: str, channel: str) -> np.ndarray:
    """Pixels of one channel as (H, W, planes) in its stored dtype; DataError on any problem."""
    import tifffile

    where = f"field {field}: channel {channel!r}: {path}"
    if uses_formats(path, spec):
        img, c = _open(Path(path), spec, field, channel)
        selected_planes(spec, img.dims.Z, where)
        try:
            arr = img.read(c, spec.planes, spec.time)
        except DataError as e:
            raise DataError(f"field {field}: channel {channel!r}: {e.format_message()}") from None
    else:
        try:
            with tifffile.TiffFile(path) as tif:
                s = tif.series[0]
                axes = s.axes
                arr = s.asarray()
        except Exception as e:
            raise DataError(f"{where}: unreadable or truncated TIFF ({type(e).__name__}: {e})") from None
        arr = select_planes(_to_hwp(np.asarray(arr), axes), spec, where)
    arr = project(arr, spec)
    target = _storage_dtype(arr.dtype)
    if arr.dtype != target:
        arr = arr.astype(target)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            y, x, p = (int(v[0]) for v in np.nonzero(bad))
            raise DataError(
                f"{where}: {int(bad.sum())} NaN/infinite pixel value(s) in float data (first at y={y}, x={x}, "
                f"plane {p}); fix or replace them before converting"
            )
    return np.ascontiguousarray(arr)


def check_field(root: str | Path, field: str, channels: Mapping) -> dict[str, ChannelHeader]:
    """Validate a field from the file headers only: files exist and are readable, channels and time points
    exist, z indices are in range, all channels have the same height and width. Returns the headers by
    channel name."""
    headers = {}
    for name, spec in channels.items():
        path = channel_path(root, field, name, spec)
        hdr = read_header(path, field, name, spec)
        selected_planes(spec, hdr.shape[2], f"field {field}: channel {name!r}: {path}")
        headers[name] = hdr
    _check_shapes(field, {n: h.shape[:2] for n, h in headers.items()}, {n: h.path for n, h in headers.items()})
    return headers


def _check_shapes(field: str, shapes: Mapping[str, tuple], paths: Mapping[str, Path]) -> None:
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n} {h}x{w} ({Path(paths[n]).name})" for n, (h, w) in shapes.items())
        raise DataError(f"field {field}: channels have different shapes (height x width): {desc}")


def read_field(root: str | Path, field: str, channels: Mapping) -> dict[str, np.ndarray]:
    """All channels of one field: {channel: (H, W, planes) array}; checks they share H and W."""
    out, paths = {}, {}
    for name, spec in channels.items():
        path = channel_path(root, field, name, spec)
        out[name] = read_channel(path, spec, field, name)
        paths[name] = path
    _check_shapes(field, {n: a.shape[:2] for n, a in out.items()}, paths)
    return out
