"""Nucleus instance masks from a nuclear-stain image (DAPI/Hoechst, or predicted fluorescence).

Two methods:

* ``classical`` (default, no extra dependencies): scikit-image pipeline, parameters in
  :class:`ClassicalParams`.
* ``cellpose`` (optional extra ``pip install 'islkeras[cellpose]'``, cellpose 3.1.1.3 on CPU torch):
  cellpose's pretrained ``nuclei`` model (downloaded on first use, so it needs internet once) or a
  model file, e.g. one trained offline with ``islkeras masks --train-cellpose``.
  cellpose and torch are imported only on this code path.

Outputs per input image ``<stem>.tif``: ``<stem>_labels.tif`` (instance labels, uint16, or uint32 when
there are 65535+ objects; 0 = background) and ``<stem>_mask.tif`` (uint8, 0/1), zlib-compressed TIFF,
each written to a temporary name and renamed into place.

The click command :data:`masks_command` is registered by the CLI (``cli.add_command(masks_command)``).
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import click
import numpy as np

from islkeras.utils import atomic_write_bytes, progress

PathLike = Union[str, Path]

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


# ------------------------------------------------------------------------------------------- classical
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


# -------------------------------------------------------------------------------------------- cellpose
def _import_cellpose():
    try:
        import cellpose.models as cp_models  # noqa: F401  (imports torch)
    except ImportError as e:
        raise MasksError(f"{INSTALL_HINT} ({_one_line(e)})") from e
    return cp_models


def _download_builtin(cp_models, name: str, timeout: float = 60.0) -> None:
    """Fetch cellpose's pretrained ``name`` weights into its cache (no-op when cached)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # cellpose calls urlopen without a timeout
    try:
        cp_models.model_path(name)
        if name in ("nuclei", "cyto", "cyto2", "cyto3"):
            cp_models.size_model_path(name)
    except Exception as e:  # URLError/OSError offline, HTTPError behind a proxy, ...
        hint = OFFLINE_HINT if name == "nuclei" else f"cellpose's pretrained {name!r} model could not be downloaded"
        raise MasksError(f"{hint} [{_one_line(e)}]") from e
    finally:
        socket.setdefaulttimeout(old)


class CellposeSegmenter:
    """Callable 2-D image -> instance labels with a cellpose 3 model (CPU unless a GPU is available).

    ``model``: None or ``"nuclei"`` = the pretrained nuclei model (downloaded once into cellpose's cache,
    ``~/.cellpose/models`` or ``$CELLPOSE_LOCAL_MODELS_PATH``); otherwise the path of a model file
    (e.g. from :func:`train_cellpose`). ``diameter``: nucleus diameter in pixels; None = the model's own
    (17 px for ``nuclei``; the training set's mean diameter for a trained model).
    """

    def __init__(self, model: Optional[PathLike] = None, diameter: Optional[float] = None, gpu: bool = False):
        if diameter is not None and diameter <= 0:
            raise MasksError(f"--diameter must be > 0, got {diameter}")
        cp_models = _import_cellpose()
        self.diameter = diameter
        if model is None or str(model) == "nuclei":
            _download_builtin(cp_models, "nuclei")
            try:
                self.model = cp_models.CellposeModel(gpu=gpu, model_type="nuclei")
            except Exception as e:
                raise MasksError(f"could not load cellpose's 'nuclei' model: {_one_line(e)}") from e
            self.name = "nuclei"
        else:
            path = Path(model)
            # (cellpose itself silently falls back to downloading 'cyto3' for a missing path)
            if not path.is_file():
                raise MasksError(f"cellpose model file not found: {path}")
            try:
                self.model = cp_models.CellposeModel(gpu=gpu, pretrained_model=str(path))
            except Exception as e:
                raise MasksError(f"could not load cellpose model {path}: {_one_line(e)}") from e
            self.name = str(path)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {img.shape}")
        x = np.nan_to_num(img.astype(np.float32))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
            out = self.model.eval(x, channels=[0, 0], diameter=self.diameter)
        return np.asarray(out[0]).astype(np.int32)


def make_segmenter(
    method: str = "classical",
    params: Optional[ClassicalParams] = None,
    cellpose_model: Optional[PathLike] = None,
    diameter: Optional[float] = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable 2-D image -> int32 instance labels for ``method`` ("classical" or "cellpose").

    For classical, ``diameter`` (px), when given and ``params.radius`` is not, sets the nucleus radius.
    Raises :class:`MasksError` with a one-line message when cellpose is missing or its model unavailable.
    """
    if method == "classical":
        p = params or ClassicalParams()
        if diameter is not None and p.radius is None:
            p = ClassicalParams(**{**p.to_dict(), "radius": diameter / 2.0})
        return lambda img: segment_classical(img, p)
    if method == "cellpose":
        return CellposeSegmenter(cellpose_model, diameter)
    raise ValueError(f"unknown method {method!r}: use 'classical' or 'cellpose'")


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


def collect_inputs(inputs: Sequence[PathLike], recursive: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into TIFF files. Returns ``(files, problems)``.

    Folders contribute their ``*.tif``/``*.tiff`` (sorted; with ``recursive`` also sub-folders), except
    files that look like our own outputs (``*_labels.tif``, ``*_mask.tif``). Files given explicitly are
    taken as they are. Missing paths and folders without TIFFs are reported in ``problems``.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen = set()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found = sorted(
                f for f in it
                if f.is_file() and f.suffix.lower() in TIFF_SUFFIXES and not f.name.startswith(".")
                and not f.stem.endswith(OUTPUT_SUFFIXES)
            )
            if not found:
                problems.append((p, "folder contains no .tif/.tiff files" + ("" if recursive else " (try --recursive)")))
            new = found
        elif p.is_file():
            new = [p]
        else:
            problems.append((p, "no such file or folder"))
            new = []
        for f in new:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, problems


def output_stems(files: Sequence[Path]) -> list[str]:
    """Output stems: the file stem, or ``<parent>_<stem>`` for stems shared by several inputs
    (e.g. dsb2018's ``<id>/image.tif``). Raises MasksError if names still collide."""
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    out = [f"{f.parent.name}_{f.stem}" if f.stem in dup else f.stem for f in files]
    if len(set(out)) != len(out):
        clash = sorted({s for s in out if out.count(s) > 1})
        raise MasksError(f"several inputs would write the same outputs ({', '.join(clash[:3])}); rename them "
                         f"or run them separately with different --out")
    return out


@dataclass
class MasksReport:
    written: list[Path] = field(default_factory=list)  #: label files written
    failed: list[tuple[Path, str]] = field(default_factory=list)  #: (input, one-line reason)
    n_objects: dict = field(default_factory=dict)  #: input path -> number of nuclei


def run_masks(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    method: str = "classical",
    channel: Optional[int] = None,
    params: Optional[ClassicalParams] = None,
    cellpose_model: Optional[PathLike] = None,
    diameter: Optional[float] = None,
    recursive: bool = False,
    on_error: Optional[Callable[[Path, str], None]] = None,
) -> MasksReport:
    """Segment every input TIFF and write its masks to ``out_dir``; failures are collected, not raised.

    Raises :class:`MasksError` only for problems that concern all files (cellpose missing, model
    unavailable, colliding output names, no inputs).
    """
    files, problems = collect_inputs(inputs, recursive=recursive)
    report = MasksReport()
    for p, why in problems:
        report.failed.append((p, why))
        if on_error:
            on_error(p, why)
    if not files:
        if not problems:
            raise MasksError("no input images given")
        return report
    stems = output_stems(files)
    segment = make_segmenter(method, params=params, cellpose_model=cellpose_model, diameter=diameter)
    out_dir = Path(out_dir)
    for f, stem in zip(progress(files, desc=f"masks ({method})", unit="file"), stems):
        try:
            img = read_image_2d(f, channel)
            labels = segment(img)
            lab_path, _ = write_masks(labels, out_dir, stem)
        except Exception as e:  # one bad file must not stop the others
            why = _one_line(e)
            report.failed.append((f, why))
            if on_error:
                on_error(f, why)
            continue
        report.written.append(lab_path)
        report.n_objects[str(f)] = int(labels.max(initial=0))
    return report


# ---------------------------------------------------------------------------------- cellpose training
def find_training_pairs(
    sources: Sequence[PathLike], image_name: str = "image.tif", labels_name: str = "labels.tif"
) -> list[tuple[Path, Path]]:
    """(image, labels) TIFF pairs from folders or CSV files.

    * a folder laid out like dsb2018: ``<folder>/<id>/<image_name>`` + ``<folder>/<id>/<labels_name>``
      (the folder itself may also hold the pair directly);
    * a flat folder of ``<stem>.tif`` + ``<stem>_labels.tif`` (what ``islkeras masks`` writes, e.g.
      after curating the labels);
    * a CSV file with columns ``image,labels`` (paths relative to the CSV's folder).
    """
    pairs: list[tuple[Path, Path]] = []
    for raw in sources:
        src = Path(raw)
        if src.is_file() and src.suffix.lower() == ".csv":
            import csv

            with open(src, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows and not {"image", "labels"} <= set(rows[0]):
                raise MasksError(f"{src}: a pairs CSV needs the columns image,labels (has {', '.join(rows[0])})")
            for row in rows:
                pairs.append((src.parent / row["image"], src.parent / row["labels"]))
            continue
        if not src.is_dir():
            raise MasksError(f"training source not found (need a folder or a .csv of image,labels): {src}")
        found = []
        for d in [src, *sorted(x for x in src.iterdir() if x.is_dir())]:
            if (d / image_name).is_file() and (d / labels_name).is_file():
                found.append((d / image_name, d / labels_name))
        if not found:
            for lab in sorted(src.glob("*_labels.tif*")):
                stem = lab.name[: lab.name.rindex("_labels")]
                for suf in TIFF_SUFFIXES:
                    if (src / f"{stem}{suf}").is_file():
                        found.append((src / f"{stem}{suf}", lab))
                        break
        if not found:
            raise MasksError(
                f"no training pairs in {src}: expected <id>/{image_name} + <id>/{labels_name} "
                f"(change with --image-name/--labels-name) or <stem>.tif + <stem>_labels.tif"
            )
        pairs.extend(found)
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise MasksError(f"training file not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    return pairs


class _EchoHandler(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "train_loss" in msg or record.levelno >= logging.WARNING:
            from tqdm.auto import tqdm

            tqdm.write(f"cellpose: {msg.strip()}", file=sys.stderr)


def train_cellpose(
    pairs: Sequence[tuple[PathLike, PathLike]],
    model_path: PathLike,
    epochs: int = 100,
    learning_rate: float = 0.005,
    batch_size: int = 8,
    channel: Optional[int] = None,
    diam_mean: float = 17.0,
    min_train_masks: int = 1,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Train a cellpose 3 model from scratch (no pretrained weights, works offline) and save it.

    ``pairs``: (image TIFF, instance-label TIFF) pairs. Uses ``cellpose.train.train_seg`` (AdamW,
    ``learning_rate``, weight decay 1e-5, random 224 px crops rescaled so that nuclei are ``diam_mean``
    px across, 17 px like cellpose's ``nuclei`` model). The weights file is written atomically to
    ``model_path`` and reloads with ``CellposeModel(pretrained_model=path)`` / ``--cellpose-model``.
    Returns a summary dict (images used, epochs, final training loss, seconds).
    """
    if epochs < 1:
        raise MasksError(f"--epochs must be >= 1, got {epochs}")
    _import_cellpose()
    import tifffile
    import torch
    from cellpose import models as cp_models
    from cellpose import train as cp_train
    from skimage.segmentation import relabel_sequential

    model_path = Path(model_path)
    if model_path.is_dir():
        raise MasksError(f"--out for --train-cellpose is the model file to write, but {model_path} is a folder")
    images, labels, used = [], [], []
    for img_p, lab_p in pairs:
        try:
            img = read_image_2d(img_p, channel)
            lab = np.asarray(tifffile.imread(lab_p))
            lab = lab.reshape([n for n in lab.shape if n != 1]) if lab.ndim > 2 else lab
        except Exception as e:
            raise MasksError(f"cannot read training pair {img_p}: {_one_line(e)}") from e
        if lab.shape != img.shape:
            raise MasksError(f"{lab_p}: labels shape {lab.shape} differs from image shape {img.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise MasksError(f"{lab_p}: labels must be integers (0 = background), got {lab.dtype}")
        lab = relabel_sequential(lab.astype(np.int64))[0].astype(np.int32)
        if lab.max() < min_train_masks:
            continue
        images.append(np.nan_to_num(img.astype(np.float32)))
        labels.append(lab)
        used.append(str(img_p))
    if not images:
        raise MasksError(f"no training image has at least {min_train_masks} labelled nuclei")

    handler = _EchoHandler() if verbose else None
    tlog = logging.getLogger(cp_train.__name__)
    old_level = tlog.level
    if handler:
        tlog.addHandler(handler)
        tlog.setLevel(logging.INFO)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_path.name}.", suffix=".tmp", dir=model_path.parent))
    t0 = time.time()
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = cp_models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=diam_mean)
        out_file, train_losses, _ = cp_train.train_seg(
            model.net, train_data=images, train_labels=labels, channels=[0, 0], normalize=True,
            n_epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, weight_decay=1e-5,
            save_path=str(tmp), save_every=max(epochs, 1), model_name="model", min_train_masks=min_train_masks,
        )
        os.replace(out_file, model_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if handler:
            tlog.removeHandler(handler)
            tlog.setLevel(old_level)
    return {
        "model": str(model_path),
        "n_images": len(images),
        "images": used,
        "epochs": epochs,
        "final_train_loss": float(train_losses[-1]),
        "diam_mean": diam_mean,
        "diam_labels": float(model.net.diam_labels.item()),
        "seconds": round(time.time() - t0, 1),
    }


# --------------------------------------------------------------------------------------------- CLI
_D = ClassicalParams()

MASKS_HELP = """Nucleus instance labels and binary masks from nuclear-stain images.

INPUT... are TIFF files or folders of TIFFs (*.tif, *.tiff; --recursive for sub-folders) of a nuclear
stain: DAPI/Hoechst, or fluorescence predicted by islkeras. 2-D images are used as they are; for a
multi-channel image pick the nuclear channel with --channel. For each image <stem>.tif two files are
written into --out: <stem>_labels.tif (instance labels, uint16, uint32 above 65535 nuclei, 0 =
background) and <stem>_mask.tif (uint8 0/1). Inputs that share a stem (e.g. <id>/image.tif) are written
as <folder>_<stem>_labels.tif. Files are written under a temporary name and renamed into place.

\b
Methods:
  classical  scikit-image: smoothing, threshold, distance-transform watershed (default; no extras)
  cellpose   cellpose 3 (pip install 'islkeras[cellpose]'): the pretrained 'nuclei' model, which is
             downloaded once and so needs internet, or a model file given with --cellpose-model

A file that cannot be read or segmented is reported on one line and skipped; the others are still
processed and the exit code is 1 if any file failed.

With --train-cellpose SOURCE (repeatable) a cellpose model is instead trained from scratch, offline,
on labelled images and saved to --out (a file). SOURCE is a folder of <id>/image.tif + <id>/labels.tif
(names set with --image-name/--labels-name; the dsb2018-nuclei layout), a folder of <stem>.tif +
<stem>_labels.tif, or a CSV with columns image,labels. On a 2-core CPU an
epoch over two 256 x 256 images took 2-15 s here (one batch of --batch-size random 224 px crops per 8
images); from scratch, a few hundred epochs are needed before the model finds nuclei.

\b
Examples:
  islkeras masks "plate 1/hoechst.tif" --out masks/
  islkeras masks predictions/ --out masks/ --threshold li --min-size 30
  islkeras masks stack.tif --channel 2 --out masks/
  islkeras masks fields/ --recursive --method cellpose --diameter 20 --out masks/
  islkeras masks --train-cellpose ../shared/data/dsb2018-nuclei --epochs 300 --out nuclei.cpmodel
  islkeras masks fields/ --method cellpose --cellpose-model nuclei.cpmodel --out masks/
"""


@click.command("masks", help=MASKS_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path), metavar="[INPUT]...")
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path),
              help="Output folder for the masks (with --train-cellpose: the model file to write).")
@click.option("--method", type=click.Choice(["classical", "cellpose"]), default="classical", show_default=True,
              help="Segmentation method.")
@click.option("--channel", type=int, default=None,
              help="Channel index of the nuclear stain in multi-channel images (C or S axis).")
@click.option("--recursive", "-r", is_flag=True, help="Also take TIFFs in sub-folders of folder inputs.")
@click.option("--threshold", default=str(_D.threshold), show_default=True,
              help="classical: otsu, li, triangle, yen, mean, or a number in [0, 1] on the "
                   "percentile-normalised image.")
@click.option("--threshold-scale", type=float, default=_D.threshold_scale, show_default=True,
              help="classical: multiplies an automatic threshold (<1 keeps dimmer nuclei).")
@click.option("--sigma", type=float, default=_D.sigma, show_default=True,
              help="classical: Gaussian smoothing in pixels before thresholding.")
@click.option("--min-size", type=int, default=_D.min_size, show_default=True,
              help="classical: remove objects smaller than this many pixels.")
@click.option("--min-distance", type=int, default=None,
              help="classical: minimum distance (px) between watershed seeds "
                   f"[default: {_D.min_distance_factor} x the nucleus radius].")
@click.option("--no-split", is_flag=True, help="classical: do not split touching nuclei (connected components).")
@click.option("--diameter", type=float, default=None,
              help="Typical nucleus diameter in pixels [default: cellpose: the model's; "
                   "classical: estimated per image].")
@click.option("--cellpose-model", type=click.Path(path_type=Path), default=None,
              help="cellpose model file (implies --method cellpose) instead of the pretrained 'nuclei' model.")
@click.option("--train-cellpose", "train_sources", multiple=True, type=click.Path(path_type=Path),
              metavar="IMAGES_DIR_OR_PAIRS_CSV",
              help="Train a cellpose model from scratch on these labelled images and save it to --out.")
@click.option("--image-name", default="image.tif", show_default=True, help="Training image file name in <id>/.")
@click.option("--labels-name", default="labels.tif", show_default=True, help="Training labels file name in <id>/.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Training epochs.")
@click.option("--learning-rate", type=float, default=0.005, show_default=True, help="Training learning rate (AdamW).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Training batch size.")
def masks_command(inputs, out, method, channel, recursive, threshold, threshold_scale, sigma, min_size,
                  min_distance, no_split, diameter, cellpose_model, train_sources, image_name, labels_name,
                  epochs, learning_rate, batch_size):
    if train_sources:
        if inputs:
            raise click.UsageError("INPUT images and --train-cellpose cannot be combined: train first, then "
                                   "segment with --cellpose-model")
        try:
            pairs = find_training_pairs(train_sources, image_name, labels_name)
            click.echo(f"training a cellpose model from scratch on {len(pairs)} image(s), {epochs} epochs", err=True)
            info = train_cellpose(pairs, out, epochs=epochs, learning_rate=learning_rate,
                                  batch_size=batch_size, channel=channel)
        except MasksError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"saved cellpose model to {info['model']} ({info['n_images']} images, {epochs} epochs, "
                   f"final loss {info['final_train_loss']:.4f}, {info['seconds']:.0f} s); "
                   f"use it with --method cellpose --cellpose-model \"{info['model']}\"")
        return
    if not inputs:
        raise click.UsageError("give INPUT images/folders (or --train-cellpose to train a model)")
    if cellpose_model is not None:
        method = "cellpose"
    params = None
    if method == "classical":
        try:
            params = ClassicalParams(sigma=sigma, threshold=threshold, threshold_scale=threshold_scale,
                                     min_size=min_size, min_distance=min_distance, split=not no_split,
                                     radius=None if diameter is None else diameter / 2.0)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a folder", param_hint="--out")

    def on_error(path, why):
        from tqdm.auto import tqdm

        tqdm.write(f"error: {path}: {why}", file=sys.stderr)

    try:
        report = run_masks(inputs, out, method=method, channel=channel, params=params,
                           cellpose_model=cellpose_model, diameter=diameter, recursive=recursive,
                           on_error=on_error)
    except MasksError as e:
        raise click.ClickException(str(e)) from None
    n_ok, n_bad = len(report.written), len(report.failed)
    click.echo(f"wrote masks of {n_ok} image(s) to {out}"
               + (f" ({sum(report.n_objects.values())} nuclei)" if n_ok else ""))
    if n_bad:
        click.echo(f"{n_bad} input(s) failed: " + ", ".join(str(p) for p, _ in report.failed[:5])
                   + (" ..." if n_bad > 5 else ""), err=True)
        sys.exit(1)
