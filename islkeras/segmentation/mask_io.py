"""What the nucleus-mask modules share (``masks``, ``cellpose``): :class:`MasksError` and its hints, and the
TIFF files -- a 2-D plane read from an image, the labels/mask TIFFs written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np

from islkeras.utils import PathLike, atomic_write_bytes

TIFF_SUFFIXES = (".tif", ".tiff")
OUTPUT_SUFFIXES = ("_labels", "_mask")  #: stems ending like this are our outputs, skipped in folders
INSTALL_HINT = "cellpose is not installed; pip install 'islkeras[cellpose]' (cellpose==3.1.1.3, torch 2.13.0)"
OFFLINE_HINT = (
    "cellpose's pretrained 'nuclei' model could not be downloaded (no internet?); use --method classical "
    "or --cellpose-model FILE (train one offline with --train-cellpose)"
)


class MasksError(Exception):
    """A user-facing problem, reported as one line (no traceback)."""


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, MasksError) else f"{type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------------------------- I/O
def read_image_2d(path: PathLike, channel: Optional[int] = None) -> np.ndarray:
    """A 2-D (Y, X) plane from a TIFF: the file itself if 2-D, else channel ``channel`` of a (C, Y, X) /
    (Y, X, C) image (the channel axis is taken from the TIFF's axes, ``C`` or ``S``, else it is the
    short first or last axis). A multi-channel image whose channels are all equal (grey RGB) needs no
    ``channel``. Singleton axes are dropped. Raises ValueError for Z stacks, time series, >3-D data.
    """
    import tifffile

    path = Path(path)
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        arr = series.asarray()
        axes = series.axes
    if len(axes) != arr.ndim:
        axes = "?" * arr.ndim
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    axes = "".join(axes[i] for i in keep)
    arr = arr.reshape([arr.shape[i] for i in keep])
    if arr.ndim == 2:
        if channel not in (None, 0):
            raise ValueError(f"--channel {channel} given but the image is 2-D {arr.shape}")
        return arr
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or multi-channel 2-D image, got shape {arr.shape} (axes {axes})")
    cax = next((i for i, a in enumerate(axes) if a in "CS"), None)
    if cax is None:
        if "Z" in axes or "T" in axes:
            raise ValueError(
                f"a stack of shape {arr.shape} (axes {axes}) is not a 2-D image; "
                f"pass a single plane or a projection"
            )
        if arr.shape[0] <= 8:
            cax = 0
        elif arr.shape[-1] <= 8:
            cax = 2
        else:
            raise ValueError(f"cannot tell the channel axis of shape {arr.shape} (axes {axes})")
    n = arr.shape[cax]
    if channel is None:
        first = np.take(arr, 0, axis=cax)
        if all(np.array_equal(first, np.take(arr, k, axis=cax)) for k in range(1, n)):
            return first
        raise ValueError(f"has {n} channels (shape {arr.shape}, axes {axes}): pass --channel 0..{n - 1}")
    if not -n <= channel < n:
        raise ValueError(f"--channel {channel} out of range: the image has {n} channels (shape {arr.shape})")
    return np.take(arr, channel, axis=cax)


def _tiff_bytes(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", photometric="minisblack")
    return buf.getvalue()


def labels_dtype(labels: np.ndarray) -> np.dtype:
    return np.dtype(np.uint16) if int(labels.max(initial=0)) <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_masks(labels: np.ndarray, out_dir: PathLike, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>_labels.tif`` (uint16/uint32) and ``<stem>_mask.tif`` (uint8 0/1) atomically."""
    out_dir = Path(out_dir)
    labels = np.asarray(labels)
    lab_path = out_dir / f"{stem}_labels.tif"
    mask_path = out_dir / f"{stem}_mask.tif"
    atomic_write_bytes(lab_path, _tiff_bytes(labels.astype(labels_dtype(labels))))
    atomic_write_bytes(mask_path, _tiff_bytes((labels > 0).astype(np.uint8)))
    return lab_path, mask_path
