"""The ``islkeras`` command: one entry point, one subcommand per step of the data flow.

Subcommands are imported lazily (TensorFlow loads only when a command runs), so ``islkeras --help``
is fast. Each subcommand lives beside the code it drives and is registered here by name.
"""
from __future__ import annotations

import importlib
import sys

import click

from islkeras import __version__

# name -> (module:attribute, one-line description shown by `islkeras --help`), in data-flow order
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("islkeras.data.records:convert_command", "TIFF folders -> TFRecord shards + manifest.json."),
    "fit": ("islkeras.training.fit:fit_command", "Train an ISL model from an experiment config; writes a run folder."),
    "evaluate": ("islkeras.evaluation.evaluate:evaluate_command", "PCC/SSIM/PSNR per image of a run on a split; figures."),
    "predict": ("islkeras.inference.predict:predict_command", "Whole-field tiled prediction, TIFF in -> TIFF out."),
    "crossval": ("islkeras.evaluation.crossval:crossval_command", "Leave-one-group-out (e.g. experiment) training + evaluation."),
    "report": ("islkeras.evaluation.report:report_command", "Compare several runs: table (CSV/Markdown) and PCC box plot."),
    "masks": ("islkeras.segmentation.masks:masks_command", "Nucleus instance labels and binary masks from a nuclei stain."),
    "transfer": ("islkeras.segmentation.experiment:transfer_command", "Fine-tune a nuclei segmentation net from an ISL model."),
    "export": ("islkeras.export.command:export_command", "Package a run for TF Serving, Triton or the BioImage Model Zoo."),
    "serve": ("islkeras.serving.http:serve_command", "Serve exported models: TF Serving REST + KServe V2 (Triton clients)."),
    "demo": ("islkeras.demo:demo_command", "Synthetic data end to end: convert -> fit -> evaluate -> predict."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        mod, attr = target.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except ImportError as e:  # e.g. a missing optional dependency
            reason = f"{type(e).__name__}: {e}"

            @click.command(name, help=f"{COMMANDS[name][1]} (unavailable: {reason})")
            def unavailable():
                raise click.ClickException(f"islkeras {name} is unavailable: {reason}")
            return unavailable

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="islkeras")
def cli():
    """islkeras: in silico labeling for microscopy.

    Learns to predict fluorescence (nuclei, membranes, cell-cycle markers) from transmitted-light images,
    then reuses that model to train nuclei segmentation from one or a few annotated images.

    \b
    Typical flow:
      islkeras convert experiments/aiseg_nuclei_l1.json     # TIFF folders -> records
      islkeras fit experiments/aiseg_nuclei_l1.json         # -> runs/<name>/<stamp>/
      islkeras evaluate runs/aiseg_nuclei_l1/<stamp> --split test
      islkeras predict runs/aiseg_nuclei_l1/<stamp> my_fields/ --out predictions/
    """


def main(argv=None):
    """Console-script entry point: errors from islkeras become one line on stderr, exit code 1."""
    import logging

    from islkeras.errors import UserError

    # the package's own messages (records being converted, how training fields are drawn, ...) on stderr
    log = logging.getLogger("islkeras")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("islkeras: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        return cli.main(args=argv, prog_name="islkeras", standalone_mode=True)
    except UserError as e:  # raised outside a command's own handling
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
