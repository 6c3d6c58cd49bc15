"""``islkeras evaluate``: per-image metrics of a run on a split, summaries and figures.

The split's fields come from the run's records (``islkeras.data.reader.load_fields``: raw arrays and the
statistics stored at conversion). Predictions use the same code path as ``islkeras predict``:

* whole fields (default): ``islkeras.inference.tiling.predict_field`` -- whole-field normalisation, tiled, blended;
* ``--crops N``: N crops of the run's ``pipeline.crop_size`` per field at deterministic positions (seeded
  by ``pipeline.seed`` and the field name, so every run sees the same crops), each normalised with its
  whole field's statistics (as in training) and predicted on its own, like the thesis's crop evaluation.

``metrics.csv`` has one row per image (field or crop) and output channel:

==========================  ===========================================================================
column                      meaning
==========================  ===========================================================================
split, field, image         split, field name, image id (the field, or ``<field>@y<y0>x<x0>`` for crops)
y0, x0, height, width       where the image lies in the field
channel                     output (target) channel name
pcc                         Pearson correlation (``islkeras.evaluation.metrics.pcc``; constant image -> 0). PCC is
                            invariant to the z-scoring, so it has no ``_z`` twin.
ssim, psnr, nrmse           on the target's **original intensity scale** (prediction mapped back with the
                            run's target constants); data range = the target dtype's range (255 for uint8,
                            65535 for uint16; a float target: its own max - min)
ssim_z, psnr_z, nrmse_z     on the **z-scored scale**: target and prediction both z-scored with the target
                            field's stored mean/std; data range = max - min of the z-scored target image
                            (so ``nrmse_z`` of a whole field is the RMSE in units of the field's std)
empty, above_fraction       empty = fewer than ``pipeline.empty_fraction`` of the target's pixels are above
                            the field's stored (Otsu) ``threshold``; above_fraction is that fraction
ceiling                     the target's noise ceiling: PCC of the target with its Gaussian-smoothed self
                            (``--ceiling-sigma``, default 2 px; ``metrics.noise_ceiling``): about what a
                            noise-free prediction of a noisy stain can reach
pcc_over_ceiling            pcc / ceiling: near 1 = limited by the stain's noise, well below = the model fails
mask_jaccard                Jaccard of nucleus masks from prediction vs target
                            (``islkeras.segmentation.metrics.mask_jaccard_from_fluorescence``), NaN when disabled
                            or unavailable
finite                      False when the prediction has a NaN or infinite pixel (a diverged model): its
                            metrics are NaN, not scores
==========================  ===========================================================================

``summary.json``: mean/std/median per metric and channel, over all images and separately for empty and
non-empty ones (``islkeras.evaluation.metrics.summarize``; NaN values are left out and counted by
``n_finite``), ``non_finite_predictions`` (images whose prediction is not finite; a warning is printed too)
and ``training`` (epochs and steps the run trained, its step budget and why it stopped, from the run's
``summary.json``). ``figures/``: ``pcc_distribution.png``,
``learning_curves.png`` (from ``history.csv``), ``panels.png`` (input | target | prediction | |error|).
Everything goes to ``RUN_DIR/evaluate/<split>/`` (or ``--out``).
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Optional, Union

import click
import numpy as np

from islkeras.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["evaluate_run", "evaluate_command", "crop_boxes", "load_run", "EVAL_DIR"]

EVAL_DIR = "evaluate"
N_PANELS = 3


def load_run(run_dir: Union[str, Path]):
    """(run folder, ExperimentConfig, ExportedModel) of a run folder (or its ``savedmodel/``)."""
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.training.run import run_config_of

    p = Path(run_dir)
    if not p.exists():
        raise UserError(f"{p}: no such run folder")
    if p.name == "savedmodel" and (p.parent / "config.json").is_file():
        p = p.parent
    cfg = run_config_of(p)
    if cfg is None:
        raise UserError(f"{p}: not a run folder (no config.json); evaluate needs the run's data and records")
    return p, cfg, ExportedModel(p)


def crop_boxes(name: str, height: int, width: int, crop: int, n: int, seed: int = 0) -> list[tuple]:
    """``n`` deterministic (y0, x0, h, w) crops of a field: uniform positions from a generator seeded by
    ``seed`` and the field's name (independent of the order of fields). A field smaller than ``crop``
    gives crops of its own size rounded down to a multiple of 32."""
    from islkeras.inference.tiling import MULTIPLE

    ch = min(crop, height // MULTIPLE * MULTIPLE)
    cw = min(crop, width // MULTIPLE * MULTIPLE)
    if ch < MULTIPLE or cw < MULTIPLE:
        raise UserError(f"field {name}: {height} x {width} pixels is too small for crops")
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    ys = rng.integers(0, height - ch + 1, size=n)
    xs = rng.integers(0, width - cw + 1, size=n)
    return [(int(y), int(x), ch, cw) for y, x in zip(ys, xs)]


def _output_layout(fields, targets, n_out) -> list[tuple[str, int]]:
    """(target channel, plane) for each output channel, in the model's output order."""
    out = [(c, p) for c in targets for p in range(fields[0].arrays[c].shape[-1])]
    if len(out) != n_out:
        desc = ", ".join(f"{c}: {fields[0].arrays[c].shape[-1]}" for c in targets)
        raise UserError(f"the model predicts {n_out} channel(s) but the records' targets have {len(out)} plane(s) ({desc})")
    return out


def _mask_jaccard_fn(enabled: bool):
    if not enabled:
        return None
    try:
        from islkeras.segmentation.metrics import mask_jaccard_from_fluorescence
    except ImportError as e:  # written by another engineer; optional here
        log.warning("mask Jaccard unavailable: %s", e)
        return None
    return mask_jaccard_from_fluorescence


def _predict_crops(model, x, boxes, batch):
    from islkeras.inference.tiling import check_image, to_output_scale

    xn = model.normalize(check_image(x, model.n_inputs))  # whole-field statistics, as in training
    preds = []
    for b0 in range(0, len(boxes), batch):
        chunk = boxes[b0:b0 + batch]
        tiles = np.stack([xn[y:y + h, x0:x0 + w] for y, x0, h, w in chunk])
        p = model.predict_normalized(tiles)
        preds.extend(to_output_scale(model, np.ascontiguousarray(p[k])) for k in range(len(chunk)))
    return preds


def evaluate_run(run_dir: Union[str, Path], split: str = "test", whole_fields: bool = True,
                 crops: Optional[int] = None, *, tile: int = 512, overlap: int = 64, batch: int = 4,
                 mask_jaccard: bool = True, out_dir: Union[str, Path, None] = None, write: bool = True,
                 n_panels: int = N_PANELS, tta: bool = False, ceiling_sigma: float = 2.0):
    """Predict ``split`` of a run and return the per-image metrics (pandas DataFrame; module doc).

    ``crops=N`` evaluates N deterministic crops per field instead of whole fields. With ``write`` the
    table, ``summary.json`` and figures go to ``out_dir`` (default ``RUN_DIR/evaluate/<split>``).
    ``tta``: whole fields predicted with test-time augmentation (``predict_field(tta=True)``).
    ``ceiling_sigma``: the Gaussian of the noise ceiling (``metrics.noise_ceiling``; columns ``ceiling`` and
    ``pcc_over_ceiling``).
    """
    import pandas as pd

    from islkeras.evaluation import metrics as M
    from islkeras.data.reader import load_fields
    from islkeras.data.records import ensure_records
    from islkeras.inference.fields import output_names
    from islkeras.inference.tiling import predict_field
    from islkeras.utils import progress

    if crops is not None:
        if crops < 1:
            raise UserError(f"--crops {crops}: must be >= 1")
        whole_fields = False
    elif not whole_fields:
        crops = 1
    if tta and not whole_fields:
        raise UserError("--tta works on whole fields; drop --crops")
    if not np.isfinite(ceiling_sigma) or ceiling_sigma <= 0:
        raise UserError(f"--ceiling-sigma {ceiling_sigma}: must be a positive number of pixels")
    run, cfg, model = load_run(run_dir)
    inputs, targets = list(model.meta["inputs"]), list(model.meta["targets"])
    manifest = ensure_records(cfg)
    splits = sorted({f["split"] for f in manifest["fields"].values()})
    if split not in splits:
        raise UserError(f"split {split!r} is not in the records of {run} (splits: {', '.join(splits)})")
    fields = load_fields(cfg, split, manifest=manifest, channels=list(dict.fromkeys(inputs + targets)))
    if not fields:
        raise UserError(f"split {split!r} of {run} has no fields")
    layout = _output_layout(fields, targets, model.n_outputs)
    labels = output_names(model.meta)
    jaccard = _mask_jaccard_fn(mask_jaccard)
    empty_fraction = cfg.pipeline.empty_fraction
    rows, panels = [], []
    for fld in progress(fields, desc=f"evaluate {split}", unit="field"):
        x = np.concatenate([fld.arrays[c] for c in inputs], axis=-1) if len(inputs) > 1 else fld.arrays[inputs[0]]
        h, w = x.shape[:2]
        if whole_fields:
            images = [((0, 0, h, w), predict_field(model, x, tile=tile, overlap=overlap, batch=batch, tta=tta))]
        else:
            boxes = crop_boxes(fld.name, h, w, cfg.pipeline.crop_size, crops, cfg.pipeline.seed)
            images = list(zip(boxes, _predict_crops(model, x, boxes, batch)))
        for (y0, x0, ih, iw), pred in images:
            image_id = fld.name if whole_fields else f"{fld.name}@y{y0}x{x0}"
            for k, (ch, plane) in enumerate(layout):
                st = fld.stats[ch]
                tgt = fld.arrays[ch][y0:y0 + ih, x0:x0 + iw, plane]
                p = pred[..., k]
                thr = float(st["threshold"][plane])
                above = float(np.count_nonzero(tgt > thr)) / tgt.size
                row = {"split": split, "field": fld.name, "image": image_id, "y0": y0, "x0": x0,
                       "height": ih, "width": iw, "channel": labels[k]}
                row.update(M.image_metrics(p, tgt, M.default_data_range(tgt, tgt.dtype)))
                row["ceiling"] = M.noise_ceiling(tgt, ceiling_sigma)
                row["pcc_over_ceiling"] = row["pcc"] / row["ceiling"] if row["ceiling"] > 0 else float("nan")
                mean, std = float(st["mean"][plane]), max(float(st["std"][plane]), 1e-6)
                tz = (tgt.astype(np.float64) - mean) / std
                pz = (p.astype(np.float64) - mean) / std
                z = M.image_metrics(pz, tz, M.default_data_range(tz), suffix="_z")
                z.pop("pcc_z")
                row.update(z)
                row.update(empty=above < empty_fraction, above_fraction=above, threshold=thr)
                row["finite"] = bool(np.isfinite(p).all())
                row["mask_jaccard"] = _safe_jaccard(jaccard, p, tgt) if row["finite"] else float("nan")
                rows.append(row)
            if len(panels) < n_panels:
                panels.append({"name": image_id, "input": x[y0:y0 + ih, x0:x0 + iw, 0],
                               "target": fld.arrays[layout[0][0]][y0:y0 + ih, x0:x0 + iw, layout[0][1]],
                               "prediction": pred[..., 0], "channel": labels[0]})
    df = pd.DataFrame(rows)
    df.attrs.update(run=str(run), split=split, ceiling_sigma=float(ceiling_sigma),
                    mode=("whole+tta" if tta else "whole") if whole_fields else f"crops:{crops}")
    if write:
        write_evaluation(run, df, panels, out_dir or run / EVAL_DIR / split, cfg, model,
                         whole_fields=whole_fields, crops=crops, tta=tta)
    return df


_JACCARD_WARNED = False


def _safe_jaccard(fn, pred, true) -> float:
    global _JACCARD_WARNED
    if fn is None:
        return float("nan")
    try:
        return float(fn(pred, true))
    except Exception as e:  # a failing optional metric must not lose the others
        if not _JACCARD_WARNED:
            log.warning("mask Jaccard failed (%s: %s); column left NaN", type(e).__name__, e)
            _JACCARD_WARNED = True
        return float("nan")


def write_evaluation(run: Path, df, panels, out_dir, cfg, model, whole_fields=True, crops=None, tta=False) -> Path:
    """metrics.csv, summary.json and figures/ of one evaluation (atomic writes)."""
    from islkeras.evaluation import metrics as M
    from islkeras.evaluation import figures as R
    from islkeras.utils import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.csv", df.to_csv(index=False))
    summary = {
        "run": str(run), "name": cfg.name, "split": df.attrs.get("split"),
        "mode": ("whole fields" + (", test-time augmentation (8 symmetries)" if tta else "")) if whole_fields
                else f"{crops} crop(s) of {cfg.pipeline.crop_size} per field",
        "tta": tta, "ceiling_sigma": df.attrs.get("ceiling_sigma"),
        "architecture": R.architecture_label(cfg), "loss": cfg.loss.kind,
        "n_fields": int(df["field"].nunique()) if len(df) else 0,
        "n_images": int(df["image"].nunique()) if len(df) else 0,
        "empty_fraction": cfg.pipeline.empty_fraction,
        "non_finite_predictions": n_non_finite(df),
        "training": training_record(run),
        "scales": {
            "original": "pcc, ssim, psnr, nrmse: target's intensity scale; data range = target dtype range "
                        "(float targets: their max - min)",
            "z": "ssim_z, psnr_z, nrmse_z: target and prediction z-scored with the target field's stored "
                 "mean/std; data range = max - min of the z-scored target (PCC is scale-invariant)",
        },
        "metrics": M.summarize(df),
    }
    atomic_write_json(out / "summary.json", summary)
    R.plot_pcc_distribution(df, fig_dir / "pcc_distribution.png", title=f"{cfg.name}: PCC ({summary['split']})")
    hist = run / "history.csv"
    if hist.is_file():
        R.plot_learning_curves(hist, fig_dir / "learning_curves.png", title=cfg.name)
    if panels:
        R.plot_panels(panels, fig_dir / "panels.png")
    return out


def n_non_finite(df) -> int:
    """Images (fields or crops) whose prediction has a NaN or infinite pixel in some channel."""
    return int(df.loc[~df["finite"].astype(bool), "image"].nunique()) if len(df) and "finite" in df else 0


def training_record(run: Path) -> dict:
    """What the run trained (from its ``summary.json``): epochs, steps, step budget, why it stopped."""
    from islkeras.training.run import read_summary

    s = read_summary(run) or {}
    return {k: s.get(k) for k in ("epochs", "steps", "steps_budget", "stopped", "max_minutes")}


def summary_lines(df) -> list[str]:
    """One human line per channel: PCC mean +- std (n), non-empty and empty; a warning first when some
    predictions are not finite."""
    from islkeras.evaluation import metrics as M

    out = []
    bad = n_non_finite(df)
    if bad:
        out.append(f"WARNING: {bad} of {df['image'].nunique()} prediction(s) contain NaN or infinite values "
                   f"(diverged model?); their metrics are NaN and left out of the means")
    for ch, sub in df.groupby("channel", sort=False):
        a = M.summary_stats(sub["pcc"])
        ne = M.summary_stats(sub.loc[~sub["empty"].astype(bool), "pcc"])
        e = M.summary_stats(sub.loc[sub["empty"].astype(bool), "pcc"])

        def fmt(s):
            return "n/a" if s["mean"] is None else f"{s['mean']:.3f} +- {s['std']:.3f} (n={s['n']})"

        ps = M.summary_stats(sub["psnr"])["mean"]
        ceil = ""
        if "pcc_over_ceiling" in sub:
            c, r = M.summary_stats(sub["ceiling"])["mean"], M.summary_stats(sub["pcc_over_ceiling"])["mean"]
            ceil = "" if c is None or r is None else f"; noise ceiling {c:.3f}, PCC/ceiling {r:.3f}"
        out.append(f"{ch}: PCC {fmt(a)}; non-empty {fmt(ne)}; empty {fmt(e)}; SSIM {sub['ssim'].mean():.3f}, "
                   f"PSNR {'n/a' if ps is None else f'{ps:.2f}'} dB{ceil}")
    return out


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dir", type=click.Path())
@click.option("--split", default="test", show_default=True, help="Split of the run's records to evaluate.")
@click.option("--whole-fields", "whole", is_flag=True, default=False,
              help="Predict whole fields with tiled inference (the default).")
@click.option("--crops", type=int, default=None, metavar="N",
              help="Instead: N deterministic crops of pipeline.crop_size per field, each predicted alone.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default RUN_DIR/evaluate/<split>).")
@click.option("--tile", default=512, show_default=True, help="Tile size of whole-field prediction.")
@click.option("--overlap", default=64, show_default=True, help="Tile overlap of whole-field prediction.")
@click.option("--batch", default=4, show_default=True, help="Tiles (or crops) per forward pass.")
@click.option("--mask-jaccard/--no-mask-jaccard", default=True, show_default=True,
              help="Also compare nucleus masks segmented from prediction and target (mask_jaccard column).")
@click.option("--panels", "n_panels", default=N_PANELS, show_default=True,
              help="Images shown in figures/panels.png.")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average the 8 rot90/flip symmetries of each "
                                          "whole field (8x the time; summary.json mode 'whole+tta').")
@click.option("--ceiling-sigma", default=2.0, show_default=True, metavar="PX",
              help="Noise ceiling: PCC of the target with its Gaussian-smoothed self (this sigma); columns "
                   "ceiling and pcc_over_ceiling.")
def evaluate_command(run_dir, split, whole, crops, out_dir, tile, overlap, batch, mask_jaccard, n_panels, tta,
                     ceiling_sigma):
    """Evaluate a trained run on a split: metrics.csv, summary.json and figures.

    RUN_DIR is a run folder of `islkeras fit` (runs/<name>/<stamp>). One row per image and target channel:
    PCC, SSIM, PSNR, NRMSE on the target's intensity scale and (suffix _z) on the z-scored scale, the
    empty flag (fewer than pipeline.empty_fraction of the target's pixels above the field's stored
    threshold) and the nucleus-mask Jaccard. summary.json has mean, std and median per metric and channel,
    over all images and separately for empty and non-empty ones.

    \b
    Examples:
      islkeras evaluate runs/aiseg_nuclei_l1/20250101-120000
      islkeras evaluate runs/aiseg_nuclei_l1/20250101-120000 --split val --crops 16
    """
    if whole and crops is not None:
        raise UserError("--whole-fields and --crops N exclude each other")
    df = evaluate_run(run_dir, split, whole_fields=crops is None, crops=crops, tile=tile, overlap=overlap,
                      batch=batch, mask_jaccard=mask_jaccard, out_dir=out_dir, n_panels=n_panels, tta=tta,
                      ceiling_sigma=ceiling_sigma)
    run = Path(df.attrs["run"])
    out = Path(out_dir) if out_dir else run / EVAL_DIR / split
    for line in summary_lines(df):
        click.echo(f"{split}: {line}")
    click.echo(f"-> {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'figures'}")
