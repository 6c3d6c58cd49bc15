"""Nucleus instance masks from a nuclear-stain image (DAPI/Hoechst, or predicted fluorescence).

Two methods:

* ``classical`` (default, no extra dependencies): scikit-image pipeline,
  :mod:`islkeras.segmentation.classical`, parameters in its ``ClassicalParams``.
* ``cellpose`` (optional extra ``pip install 'islkeras[cellpose]'``, cellpose 3.1.1.3 on CPU torch):
  cellpose's pretrained ``nuclei`` model (downloaded on first use, so it needs internet once) or a
  model file, e.g. one trained offline with ``islkeras masks --train-cellpose``
  (:mod:`islkeras.segmentation.cellpose`). cellpose and torch are imported only on this code path.

Outputs per input image ``<stem>.tif``: ``<stem>_labels.tif`` (instance labels, uint16, or uint32 when
there are 65535+ objects; 0 = background) and ``<stem>_mask.tif`` (uint8, 0/1), zlib-compressed TIFF,
each written to a temporary name and renamed into place (:mod:`islkeras.segmentation.mask_io`).

This module: :func:`make_segmenter` (either method as one callable), the batch run over files
(:func:`run_masks`) and the click command :data:`masks_command`, registered in ``islkeras.cli.COMMANDS``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import click
import numpy as np

from islkeras.segmentation.cellpose import CellposeSegmenter, find_training_pairs, train_cellpose
from islkeras.segmentation.classical import ClassicalParams, segment_classical
from islkeras.segmentation.mask_io import (OUTPUT_SUFFIXES, TIFF_SUFFIXES, MasksError, _one_line, read_image_2d,
                                           write_masks)
from islkeras.utils import PathLike, progress


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


# ------------------------------------------------------------------------------------- the batch run
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
