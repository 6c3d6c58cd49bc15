"""``islkeras predict``: whole fields of a trained model, microscope files (TIFF, CZI, ND2, LIF, OME) in,
TIFF out.

The arrays are predicted by :func:`islkeras.inference.tiling.predict_field` (tiles blended with a Hann
window); :mod:`islkeras.inference.fields` finds, reads and writes the files.
"""
from __future__ import annotations

from pathlib import Path

import click

from islkeras.errors import UserError
from islkeras.inference.fields import FieldResult, FieldSettings, InputItem, find_inputs, input_specs, output_names
from islkeras.inference.fields import predict_one, unique_names
from islkeras.inference.tiling import DEFAULT_BATCH, DEFAULT_OVERLAP, DEFAULT_TILE, check_tiling


# ------------------------------------------------------------------------------------------------ CLI
@click.command("predict", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (created): one <name>_prediction.tif per field.")
@click.option("--tile", default=DEFAULT_TILE, show_default=True,
              help="Memory bound: at most --batch tiles of this size (multiple of 32) per forward pass. The grid "
                   "is chosen within it to compute the fewest pixels (tiles may be larger or non-square; a field "
                   "that fits is one pass). Larger = faster, more memory.")
@click.option("--overlap", default=DEFAULT_OVERLAP, show_default=True,
              help="Minimum overlap of neighbouring tiles in pixels; blended with a smooth window.")
@click.option("--batch", default=DEFAULT_BATCH, show_default=True,
              help="Tiles of --tile size per forward pass (the memory bound is batch x tile x tile pixels).")
@click.option("--dtype", type=click.Choice(["float32", "uint16"]), default="float32", show_default=True,
              help="float32: the prediction on the training target's intensity scale. "
                   "uint16: clip(round(prediction), 0, 65535) (segmentation: round(p * 65535)).")
@click.option("--channel", "channel_files", multiple=True, metavar="NAME=FILE",
              help="File name (glob) of input channel NAME inside a field folder, replacing the run's layout.")
@click.option("--planes", multiple=True, metavar="[NAME=]LIST",
              help="z planes to use: 'all', '0,2,4' or '0-12' (for channel NAME, or every input channel).")
@click.option("--projection", multiple=True, metavar="[NAME=]MODE",
              help="Collapse the planes: none, max or mean (for channel NAME, or every input channel).")
@click.option("--file-channel", "file_channels", multiple=True, metavar="[NAME=]CHANNEL",
              help="The channel inside a multi-channel file (CZI, ND2, LIF, OME-TIFF/-Zarr) that is input NAME: "
                   "its name in the file, or its index when a number.")
@click.option("--time", "times", multiple=True, metavar="[NAME=]T",
              help="Time point of a time-lapse file (default 0).")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the predictions of the 8 rot90/flip "
                                          "symmetries of each field (8x the time).")
@click.option("--output-format", "output_format", type=click.Choice(["tiff", "ome-zarr"]), default="tiff",
              show_default=True,
              help="ome-zarr: write OUT/<name>_prediction.ome.zarr tile by tile (float32, NGFF 0.4); an OME-Zarr "
                   "input is also read tile by tile, so memory stays flat for fields of any size.")
@click.option("--dask", "dask", default=None, metavar="ADDRESS",
              help="Predict the fields on a running Dask cluster: its scheduler's address (tcp://HOST:8786). "
                   "Workers need islkeras, and the model, inputs and --out on a shared filesystem. Extra [dask].")
@click.option("--workers", default=0, show_default=True, metavar="N",
              help="Predict the fields on N local Dask worker processes (0: in this process). Extra [dask].")
@click.option("--dask-timeout", default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the --dask scheduler to answer.")
@click.option("--pixel-size", "pixel_size", default=None, type=float, metavar="UM",
              help="Pixel size of the fields (micrometres): each field is resampled to the model's pixel size, "
                   "predicted, and the prediction resampled back (output shape = input shape).")
@click.option("--diameter", default=None, metavar="PX|auto",
              help="Nucleus diameter in the fields (pixels), or 'auto' to estimate it from a first prediction; "
                   "the fields are rescaled so nuclei match the training nuclei.")
def predict_command(model, inputs, out_dir, tile, overlap, batch, dtype, channel_files, planes, projection,
                    file_channels, times, tta, output_format, dask, workers, dask_timeout, pixel_size=None,
                    diameter=None):
    """Predict fluorescence for whole fields with a trained model, microscope files in -> TIFF out.

    MODEL is a run folder (runs/<name>/<stamp>) or a SavedModel folder. Each INPUT is an image file (TIFF,
    OME-TIFF, OME-Zarr folder, CZI, ND2, LIF), a field folder laid out like the training data, or a folder
    of those.

    \b
    Input layout: with a run folder, the run's config.json says which files of a field folder are the
    input channels (data.channels / data.inputs: file name, z planes, projection); a bare SavedModel
    expects <channel>.tif. A single TIFF is a 2-D image (one input plane) or a stack (ZYX, CYX, YXS...)
    whose planes are the input planes; --channel / --planes / --projection override the layout. In a
    multi-channel file (CZI, ND2, LIF, OME) --file-channel NAME=CHANNEL picks the channel that is input NAME
    by its name in the file (the run's data.channels.NAME.channel by default), --time a time point; formats
    other than TIFF need the extra: pip install 'islkeras[formats]'.

    \b
    Fields of any size are predicted in overlapping tiles (--tile, --overlap) blended with a smooth
    window, after normalising the whole field at once; the output has the input's height and width.

    \b
    Output: OUT/<name>_prediction.tif, <name> = the field folder's name or the file's name without
    extension (_2, _3... when names repeat). ImageJ TIFF, axes YX (one channel) or CYX, channel names as
    labels. float32 (default) is on the training target's intensity scale; --dtype uint16 stores
    uint16 = clip(round(prediction), 0, 65535), i.e. the same grey values as a uint8/uint16 target
    (negative predictions become 0; the number of clipped pixels is reported).

    \b
    --tta averages the predictions of the 8 rot90/flip symmetries of each field (the symmetries training
    augments with), each mapped back: smoother, usually a little more accurate, 8x slower.

    \b
    An input that cannot be predicted (unreadable, wrong number of planes, smaller than 32 pixels) is
    reported and skipped; the others are still predicted and the exit code is 1.

    \b
    Huge fields (stitched wells, slide scans): --output-format ome-zarr predicts tile by tile into
    OUT/<name>_prediction.ome.zarr (the same tiles, normalisation and blending as the TIFF output); an
    OME-Zarr input is read only where the tiles are, so peak memory depends on --tile/--batch, not on the
    field. The image gets its name only when complete (a temporary .<name>*.partial folder until then).

    \b
    Many fields: --workers N predicts them on N local worker processes, --dask tcp://HOST:8786 on a running
    Dask cluster (docs/dask.md); each worker loads the model once and writes its fields itself. A field
    whose worker dies is retried on another one; fields already written are not written again.

    \b
    Examples:
      islkeras predict runs/aiseg_nuclei_l1/20250101-120000 /data/plate1/ --out predictions/
      islkeras predict runs/x/20250101-120000/savedmodel "my scans/field 1.tif" --out "out dir" --dtype uint16
      islkeras predict runs/neurons/20250101-120000 A4/phase.tif --planes 0-12 --out preds/ --tile 256
      islkeras predict runs/x/20250101-120000 plate1.czi --file-channel "TL Brightfield" --planes 3 --out preds/
      islkeras predict runs/x/20250101-120000 /shared/plate1/ --out /shared/preds/ --dask tcp://head:8786
      islkeras predict runs/x/20250101-120000 well_A1.ome.zarr --out preds/ --output-format ome-zarr
    """
    import sys

    from tqdm.auto import tqdm

    from islkeras.utils import progress

    check_tiling(tile, overlap)
    if batch < 1:
        raise UserError(f"--batch {batch}: must be >= 1")
    if output_format == "ome-zarr" and (tta or dtype != "float32"):
        raise UserError(f"--output-format ome-zarr writes float32 tile by tile: "
                        f"{'--tta' if tta else '--dtype ' + dtype} needs the TIFF output (--output-format tiff)")
    if dask and workers:
        raise UserError(f"--dask {dask} and --workers {workers}: give one of them (a running cluster, or N local "
                        "worker processes)")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be >= 0 (0: predict in this process)")
    if dask or workers:  # the model is loaded by the workers; here only its metadata is read
        from islkeras.inference.distributed import model_info

        em = model_info(model)
    else:
        from islkeras.models.savedmodel import ExportedModel

        em = ExportedModel(model)
    from islkeras.inference.rescale import check_options, parse_diameter

    check_options(em.meta, pixel_size, diameter)  # before anything is predicted or written
    if output_format == "ome-zarr" and (pixel_size is not None or diameter is not None):
        raise UserError("--pixel-size/--diameter need the TIFF output (--output-format tiff)")
    specs = input_specs(em, channel_files, planes, projection, file_channels, times)
    items = find_inputs(inputs, specs)
    if not items:
        raise UserError("no inputs to predict")
    names = unique_names(items)
    out = Path(out_dir)
    settings = FieldSettings(out=out, specs=specs, labels=tuple(output_names(em.meta)), dtype=dtype,
                             kind=em.meta.get("kind", "isl"), tile=tile, overlap=overlap, batch=batch, tta=tta,
                             output_format=output_format, pixel_size=pixel_size,
                             diameter=parse_diameter(diameter))
    failed: set[int] = set()  # id() of the failed items (reported as they finish, summed up in input order)

    def report(item: InputItem, res: FieldResult) -> None:
        if not res.ok:
            failed.add(id(item))
            tqdm.write(f"error: {res.message}", file=sys.stderr)
        elif res.message:
            tqdm.write(res.message, file=sys.stderr)

    if dask or workers:
        from islkeras.inference.distributed import predict_on_dask

        predict_on_dask(em.path, items, names, settings, report, address=dask, workers=workers,
                        timeout=dask_timeout)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for item, name in progress(list(zip(items, names)), desc="predict", unit="field"):
            report(item, predict_one(em, item, name, settings))
    click.echo(f"predicted {len(items) - len(failed)} of {len(items)} input(s) -> {out}")
    if failed:
        raise UserError(f"{len(failed)} of {len(items)} input(s) failed: "
                        + "; ".join(str(i.path) for i in items if id(i) in failed))
