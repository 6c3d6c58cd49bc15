"""``islkeras demo``: the whole flow on synthetic data, on a fresh machine with no data of its own.

synthetic TIFF folders -> convert -> fit -> evaluate (test split) -> predict (test fields, TIFF out).
Each step is the real subcommand, so the demo exercises exactly what a user runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.json"


def _newest_run(runs_dir: Path, name: str) -> Path:
    runs = sorted((runs_dir / name).glob("*/savedmodel"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise click.ClickException(f"fit finished but no run with a savedmodel/ is under {runs_dir / name}")
    return runs[-1].parent


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Folder for the synthetic data, records, run and predictions.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Demo experiment config [default: experiments/demo.json of the islkeras checkout].")
@click.option("--fields", type=int, default=10, show_default=True, help="Number of synthetic fields.")
@click.option("--size", type=int, default=256, show_default=True, help="Synthetic field size (pixels).")
@click.option("--epochs", type=int, default=None, help="Override training.epochs.")
def demo_command(workdir: Path, config_path, fields: int, size: int, epochs):
    """Run convert -> fit -> evaluate -> predict end to end on synthetic data.

    \b
    Examples:
      islkeras demo                      # ./demo/{data,records,runs,predictions}
      islkeras demo --workdir /tmp/isl --epochs 2
    """
    from islkeras.cli import cli
    from islkeras.data.synthetic import write_synthetic

    config_path = config_path or DEFAULT_CONFIG
    if not config_path.is_file():
        raise click.ClickException(f"{config_path}: demo config not found (pass --config experiments/demo.json)")
    t0 = time.time()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(config_path.read_text())
    cfg["data"]["root"] = str(workdir / "data")
    cfg["data"]["records"] = str(workdir / "records")
    cfg["training"]["runs_dir"] = str(workdir / "runs")
    if epochs is not None:
        cfg["training"]["epochs"] = epochs
    run_cfg = workdir / "demo.json"
    run_cfg.write_text(json.dumps(cfg, indent=2) + "\n")

    def step(title, args):
        click.echo(f"\n== {title}: islkeras {' '.join(map(str, args))}", err=True)
        cli.main(args=[str(a) for a in args], prog_name="islkeras", standalone_mode=False)

    click.echo(f"== synthetic data: {fields} fields of {size}x{size} -> {workdir / 'data'}", err=True)
    write_synthetic(workdir / "data", n_fields=fields, size=size, seed=0)
    step("convert", ["convert", run_cfg])
    step("fit", ["fit", run_cfg])
    run = _newest_run(workdir / "runs", cfg["name"])
    step("evaluate", ["evaluate", run, "--split", "test"])
    from islkeras.data.manifest import read_manifest

    manifest = read_manifest(workdir / "records")
    inputs = sorted({workdir / "data" / f["field"] for f in manifest["fields"].values() if f["split"] == "test"})
    step("predict", ["predict", run, *inputs, "--out", workdir / "predictions"])
    click.echo(f"\ndemo done in {(time.time() - t0) / 60:.1f} min: run {run}, predictions {workdir / 'predictions'}")
