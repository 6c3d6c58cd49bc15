"""Microscope files, the one place that opens them: :func:`open_image` -> :class:`MicroscopeImage`.

* **Plain TIFF** (``.tif``/``.tiff`` without OME-XML): tifffile, no extra needed. Axes from tifffile's series:
  ``T`` is time, ``C`` the channels, every other non-YX axis (``Z``, ``S`` = RGB samples, ``Q``, ``I``...) is
  flattened in file order into the planes (``dims.Z``). Channel names: the ImageJ ``Labels`` when there is
  one per channel (islkeras's prediction TIFFs, Fiji hyperstacks), else ``channel_0``, ``channel_1``...
  Pixel size: ImageJ's ``unit`` (micron, nm...) with the X/YResolution tags, or ResolutionUnit centimetre;
  None otherwise (a TIFF's default 72 dpi says nothing about the microscope).
* **OME-TIFF, OME-Zarr, CZI, ND2, LIF** and any other format a bioio reader plugin reads: ``bioio.BioImage``
  with the plugin of the format (``pip install 'islkeras[formats]'``; a missing one is a one-line DataError
  naming the file, the format and the package). The first scene (series, position) is read. ``dims`` are
  bioio's T, C, Z, Y, X; RGB samples (``S``) are folded into the planes like a TIFF's ``YXS``
  (plane = z * S + s). Channel names and the physical pixel size (converted to micrometres) come from the
  file's metadata.

``MicroscopeImage.read(channel, planes=None, time=0)`` returns ``(Y, X, planes)`` in the file's dtype;
``channel`` is a name (``"DAPI"``) or an index, ``planes`` ``None``/``"all"`` or a list of plane indices.
Every problem a user can fix raises ``islkeras.errors.DataError`` naming the file.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

from islkeras.errors import DataError

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
EXTRA = "pip install 'islkeras[formats]'"
#: suffix -> (format, bioio plugin module, its PyPI package); longest suffixes first
PLUGINS = {
    ".ome.tiff": ("OME-TIFF", "bioio_ome_tiff", "bioio-ome-tiff"),
    ".ome.tif": ("OME-TIFF", "bioio_ome_tiff", "bioio-ome-tiff"),
    ".ome.zarr": ("OME-Zarr", "bioio_ome_zarr", "bioio-ome-zarr"),
    ".zarr": ("OME-Zarr", "bioio_ome_zarr", "bioio-ome-zarr"),
    ".czi": ("CZI", "bioio_czi", "bioio-czi"),
    ".nd2": ("ND2", "bioio_nd2", "bioio-nd2"),
    ".lif": ("LIF", "bioio_lif", "bioio-lif"),
}
IMAGE_SUFFIXES = TIFF_SUFFIXES + tuple(PLUGINS)  #: what a folder scan takes for an image
#: length units (OME, ImageJ, pint spellings) in micrometres
_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
       "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6,
       "meter": 1e6, "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6}


class Dims(NamedTuple):
    T: int
    C: int
    Z: int  #: planes per channel and time point (RGB samples and other axes folded in)
    Y: int
    X: int


def suffix_of(path: Union[str, Path]) -> str:
    """The format suffix of a path, lower case (``.ome.tif`` before ``.tif``)."""
    name = Path(path).name.lower()
    for s in PLUGINS:
        if name.endswith(s):
            return s
    return Path(name).suffix


def is_tiff(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def is_image_path(path: Union[str, Path]) -> bool:
    """A file with an image suffix, or a folder that is one image (``*.zarr``)."""
    p = Path(path)
    if p.is_dir():
        return p.name.lower().endswith(".zarr")
    return p.is_file() and suffix_of(p) in IMAGE_SUFFIXES


def _to_um(value, unit) -> Optional[float]:
    if value is None or unit is None:
        return None
    u = str(getattr(unit, "value", unit)).strip().lower().replace("\\u00b5", "µ")
    f = _UM.get(u)
    v = float(value) * f if f is not None else None
    return float(f"{v:.9g}") if v is not None and np.isfinite(v) and v > 0 else None  # 1/(20/13) -> 0.65


def tiff_pixel_size(tif) -> Optional[tuple[float, float]]:
    """(y, x) pixel size in micrometres of an open ``tifffile.TiffFile``, or None (see the module doc)."""
    import tifffile

    if tif.is_ome:
        try:
            img = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            px = (img[0] if isinstance(img, list) else img)["Pixels"]
            yx = [_to_um(px.get(f"PhysicalSize{a}"), px.get(f"PhysicalSize{a}Unit", "µm")) for a in "YX"]
        except Exception:  # malformed OME-XML: no pixel size rather than no image
            return None
        return (yx[0], yx[1]) if None not in yx else None
    tags = tif.pages[0].tags
    xr, yr, ru = (tags.get(k) for k in ("XResolution", "YResolution", "ResolutionUnit"))
    unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    if unit is None and ru is not None and int(ru.value) == 3:  # RESUNIT.CENTIMETER
        unit = "cm"
    if unit is None or xr is None or yr is None:
        return None
    try:
        per = [r.value[0] / r.value[1] for r in (yr, xr)]  # pixels per unit
        yx = [_to_um(1.0 / p, unit) for p in per]
    except (ZeroDivisionError, TypeError, IndexError):
        return None
    return (yx[0], yx[1]) if None not in yx else None


# ------------------------------------------------------------------------------------------- the image
class MicroscopeImage:
    """One opened microscope image (first scene); see the module doc. Subclasses implement ``_read``."""

    path: Path
    format: str  #: "TIFF", "OME-TIFF", "OME-Zarr", "CZI", "ND2", "LIF" or the bioio reader's name
    channel_names: list[str]
    dims: Dims
    dtype: np.dtype
    pixel_size_um: Optional[tuple[float, float]]  #: (y, x) in micrometres, None when the file has none
    scenes: tuple = ()  #: scene names of a bioio file (the first is read)

    def __repr__(self) -> str:
        return (f"MicroscopeImage({str(self.path)!r}, {self.format}, channels={self.channel_names}, "
                f"dims={tuple(self.dims)}, pixel_size_um={self.pixel_size_um})")

    def channel_index(self, channel: Union[str, int, None]) -> int:
        """Index of ``channel`` (a name or an index; None = the only channel), DataError otherwise."""
        names = ", ".join(self.channel_names)
        if channel is None:
            if self.dims.C == 1:
                return 0
            raise DataError(f"{self.path}: the file holds {self.dims.C} channels ({names}); name the one to read")
        if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool):
            if 0 <= channel < self.dims.C:
                return int(channel)
            raise DataError(f"{self.path}: channel index {channel} is beyond the file's {self.dims.C} "
                            f"channel(s) ({names}; valid 0..{self.dims.C - 1})")
        if channel in self.channel_names:
            return self.channel_names.index(channel)
        folded = [n.casefold() for n in self.channel_names]
        if folded.count(str(channel).casefold()) == 1:
            return folded.index(str(channel).casefold())
        raise DataError(f"{self.path}: no channel {channel!r} in the file (its channels: {names})")

    def plane_indices(self, planes=None) -> list[int]:
        if planes is None or planes == "all":
            return list(range(self.dims.Z))
        if isinstance(planes, (str, bytes)) or not len(planes):
            raise DataError(f"{self.path}: planes {planes!r}: expected 'all' or a list of plane indices")
        bad = [p for p in planes if not 0 <= int(p) < self.dims.Z]
        if bad:
            raise DataError(f"{self.path}: z index {bad[0]} is beyond the stack, which has {self.dims.Z} "
                            f"plane(s) (valid 0..{self.dims.Z - 1})")
        return [int(p) for p in planes]

    def read(self, channel: Union[str, int, None] = None, planes=None, time: int = 0) -> np.ndarray:
        """Pixels of one channel at one time point: ``(Y, X, len(planes))`` in the file's dtype."""
        c = self.channel_index(channel)
        zs = self.plane_indices(planes)
        if not 0 <= int(time) < self.dims.T:
            raise DataError(f"{self.path}: time point {time} is beyond the file's {self.dims.T} time point(s) "
                            f"(valid 0..{self.dims.T - 1})")
        try:
            arr = np.asarray(self._read(c, zs, int(time)))
        except DataError:
            raise
        except Exception as e:  # truncated file, codec missing...
            raise DataError(f"{self.path}: unreadable {self.format} pixel data ({_short(e)})") from None
        return np.ascontiguousarray(arr)

    def _read(self, c: int, zs: list[int], t: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _short(e: Exception) -> str:
    lines = [ln.strip(" -") for ln in str(e).strip().splitlines()] or [""]
    if "Readers attempted:" in lines:  # bioio's UnsupportedFileFormatError: the plugin's own reason
        return lines[-1].split(": ", 1)[-1][:200]
    return f"{type(e).__name__}: {lines[0][:200]}"


class _Quiet(logging.Filter):
    """Drops bioio's "reader attempt failed" warnings: the DataError says why, in one line."""

    def filter(self, record) -> bool:
        return False


class _TiffImage(MicroscopeImage):
    """A plain TIFF through tifffile (the whole series is read, then indexed)."""

    def __init__(self, path: Path):
        import tifffile

        self.path, self.format = Path(path), "TIFF"
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise DataError(f"{path}: the TIFF holds no image")
                s = tif.series[0]
                self._axes, shape, self.dtype = s.axes.upper(), tuple(s.shape), np.dtype(s.dtype)
                self.pixel_size_um = tiff_pixel_size(tif)
                labels = (tif.imagej_metadata or {}).get("Labels") if tif.is_imagej else None
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: unreadable or truncated TIFF ({_short(e)})") from None
        if "Y" not in self._axes or "X" not in self._axes:  # unnamed axes: the last two are the image
            self._axes = "Q" * (len(shape) - 2) + "YX"
        size = dict(zip(self._axes, shape))
        t, c = size.get("T", 1), size.get("C", 1)
        z = int(np.prod(shape, dtype=np.int64)) // (t * c * size["Y"] * size["X"])
        self.dims = Dims(t, c, z, size["Y"], size["X"])
        labels = [labels] if isinstance(labels, str) else list(labels or [])
        if labels and len(labels) % c == 0 and labels == labels[:c] * (len(labels) // c):
            self.channel_names = [str(x) for x in labels[:c]]
        else:
            self.channel_names = [f"channel_{i}" for i in range(c)]

    def _read(self, c, zs, t):
        import tifffile

        arr = tifffile.imread(self.path, series=0)
        axes = self._axes
        for name, i in (("T", t), ("C", c)):
            if name in axes:
                arr = np.take(arr, i, axis=axes.index(name))
                axes = axes.replace(name, "")
        order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
        arr = np.transpose(arr, order).reshape(-1, self.dims.Y, self.dims.X)
        return np.moveaxis(arr[zs], 0, -1)


class _BioImage(MicroscopeImage):
    """Any format through ``bioio.BioImage`` with its reader plugin (first scene)."""

    def __init__(self, path: Path, fmt: str, reader=None):
        import bioio

        self.path, self.format = Path(path), fmt
        quiet, logger = _Quiet(), logging.getLogger("bioio.bio_image")
        logger.addFilter(quiet)
        try:
            img = bioio.BioImage(path, reader=reader) if reader is not None else bioio.BioImage(path)
            order, shape = img.dims.order, img.dims.shape
            self.scenes = tuple(img.scenes)
            self.channel_names = [str(n) for n in img.channel_names]
            self.dtype = np.dtype(img.dtype)
            self.pixel_size_um = _bioio_pixel_size(img)
        except Exception as e:
            if type(e).__name__ == "UnsupportedFileFormatError" and reader is None:
                raise DataError(f"{path}: no installed bioio reader plugin reads {suffix_of(path) or 'these'} "
                                f"files ({EXTRA} covers OME-TIFF, OME-Zarr, CZI, ND2 and LIF; other formats: "
                                f"their bioio-<format> plugin)") from None
            raise DataError(f"{path}: unreadable {fmt} file ({_short(e)})") from None
        finally:
            logger.removeFilter(quiet)
        if len(self.scenes) > 1:
            log.warning("%s holds %d scenes; reading the first (%s)", path, len(self.scenes), self.scenes[0])
        size = dict(zip(order, shape))
        self._samples = size.get("S", 1)
        self.dims = Dims(size.get("T", 1), size.get("C", 1), size.get("Z", 1) * self._samples,
                         size["Y"], size["X"])
        self._img = img

    def _read(self, c, zs, t):
        if self._samples == 1:
            arr = self._img.get_image_data("ZYX", T=t, C=c, Z=list(zs))
            return np.moveaxis(arr, 0, -1)
        arr = self._img.get_image_data("ZYXS", T=t, C=c)  # (Z, Y, X, S) -> planes z * S + s
        arr = np.moveaxis(arr, 3, 1).reshape(-1, self.dims.Y, self.dims.X)
        return np.moveaxis(arr[zs], 0, -1)


def _bioio_pixel_size(img) -> Optional[tuple[float, float]]:
    pps = img.physical_pixel_sizes
    if pps.Y is None or pps.X is None:
        return None
    units = {}
    try:  # OME metadata (OME-TIFF) carries its unit; a pint unit from the reader (OME-Zarr); else micrometres
        from ome_types import OME

        if isinstance(img.metadata, OME):
            px = img.metadata.images[img.current_scene_index].pixels
            units = {"Y": px.physical_size_y_unit, "X": px.physical_size_x_unit}
        else:
            dp = img.dimension_properties
            units = {a: getattr(getattr(dp, a), "unit", None) for a in "YX"}
    except Exception:
        units = {}
    yx = [_to_um(getattr(pps, a), units.get(a) or "µm") for a in "YX"]
    return (yx[0], yx[1]) if None not in yx else None


# ---------------------------------------------------------------------------------------------- opening
def plugin_for(path: Union[str, Path]) -> Optional[tuple[str, str, str]]:
    """(format, bioio plugin module, package) for a non-TIFF suffix or an OME-TIFF, None for a plain TIFF."""
    s = suffix_of(path)
    if s in TIFF_SUFFIXES:
        return PLUGINS[".ome.tif"] if _tiff_is_ome(path) else None
    return PLUGINS.get(s)


def _tiff_is_ome(path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception as e:
        raise DataError(f"{path}: unreadable or truncated TIFF ({_short(e)})") from None


def _reader(path: Path, fmt: str, module: str, package: str):
    """The plugin's Reader class, or the one-line DataError naming the extra (and the package)."""
    try:
        import bioio  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading {fmt} files needs bioio: {EXTRA}") from None
    try:
        return importlib.import_module(module).Reader
    except ImportError:
        raise DataError(f"{path}: reading {fmt} files needs the bioio plugin {package}: "
                        f"{EXTRA} (or pip install {package})") from None


def open_image(path: Union[str, Path]) -> MicroscopeImage:
    """Open a microscope file (or an OME-Zarr folder): tifffile for a plain TIFF, bioio for the rest."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir() and not p.name.lower().endswith(".zarr"):
        raise DataError(f"{p}: a folder, not an image (OME-Zarr folders end in .zarr)")
    entry = plugin_for(p)
    if entry is None and is_tiff(p):
        return _TiffImage(p)
    if entry is None:  # another format: let bioio find an installed plugin
        try:
            import bioio  # noqa: F401
        except ImportError:
            raise DataError(f"{p}: reading {suffix_of(p) or 'these'} files needs bioio and its plugin for "
                            f"the format: {EXTRA}") from None
        return _BioImage(p, suffix_of(p).lstrip(".").upper() or "image")
    fmt, module, package = entry
    return _BioImage(p, fmt, _reader(p, fmt, module, package))

