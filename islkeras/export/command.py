"""``islkeras export``: a run's SavedModel packaged for another tool, one ``--format`` per target.

* ``tfserving`` (default): ``OUT/<name>/<version>/`` for TensorFlow Serving and ``islkeras serve``
  (:mod:`islkeras.export.serving`);
* ``triton``: a Triton model repository ``OUT/<name>/{config.pbtxt, <version>/model.savedmodel/}``
  (:mod:`islkeras.export.triton`);
* ``bioimageio``: a BioImage Model Zoo model package ``OUT`` (a ``.zip``) (:mod:`islkeras.export.bioimageio`).

Each format module has ``export(run_dir, out, name=None, version=None, overwrite=False) -> (path, message)``;
``message`` is what the command prints (where the package went and what to run next). The module is
imported only when its format is asked for, so a missing optional dependency fails only there.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import click

#: --format -> module with ``export(run_dir, out, name, version, overwrite) -> (Path, str)``
FORMATS = {
    "tfserving": "islkeras.export.serving",
    "triton": "islkeras.export.triton",
    "bioimageio": "islkeras.export.bioimageio",
}


def export(fmt: str, run_dir, out, name: Optional[str] = None, version: Optional[int] = None,
           overwrite: bool = False) -> tuple[Path, str]:
    """Export ``run_dir`` (a run folder or a SavedModel) in format ``fmt``; returns (path, message)."""
    return importlib.import_module(FORMATS[fmt]).export(run_dir, out, name=name, version=version,
                                                        overwrite=overwrite)


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="tfserving/triton: the model base / repository folder (the model goes to OUT/<name>/...); "
                   "bioimageio: the package file to write (model.zip).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="tfserving", show_default=True,
              help="Target: TensorFlow Serving layout, Triton model repository, or BioImage Model Zoo package.")
@click.option("--name", default=None, help="Model name (URL part) [default: the run config's name].")
@click.option("--version", "version", type=click.IntRange(min=0), default=None,
              help="Version number (tfserving/triton) [default: highest existing version + 1, or 1].")
@click.option("--overwrite", is_flag=True, help="Replace an existing version folder or package file.")
def export_command(run_dir: Path, out: Path, fmt: str, name: Optional[str], version: Optional[int],
                   overwrite: bool):
    """Export the SavedModel of RUN_DIR for TensorFlow Serving, Triton or the BioImage Model Zoo.

    RUN_DIR is a run folder of `islkeras fit`/`transfer` (or a SavedModel folder, then --name is needed
    for tfserving/triton). The signature `serving_default` takes raw images (the training input's dtype,
    NHWC, any height and width) and returns float32 predictions on the target's intensity scale.

    \b
    Examples:
      islkeras export runs/aiseg_nuclei_l1/20250101-120000 --out models/
      islkeras export runs/aiseg_nuclei_l1/20250101-120000 --out models/ --name nuclei --version 3
      islkeras export runs/aiseg_nuclei_l1/20250101-120000 --format triton --out triton_models/
      islkeras export runs/aiseg_nuclei_l1/20250101-120000 --format bioimageio --out nuclei.zip
      islkeras serve models/
    """
    _, message = export(fmt, run_dir, out, name=name, version=version, overwrite=overwrite)
    click.echo(message)
