"""cellpose 3 for nucleus masks (optional extra ``islkeras[cellpose]``): inference with the pretrained
``nuclei`` model or a model file, and training a model from scratch, offline. cellpose and torch are
imported only inside these functions."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from islkeras.segmentation.mask_io import (INSTALL_HINT, OFFLINE_HINT, TIFF_SUFFIXES, MasksError, _one_line,
                                           read_image_2d)
from islkeras.utils import PathLike


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
