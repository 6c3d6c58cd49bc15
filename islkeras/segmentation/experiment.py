"""The few-image experiment (the analogue of the thesis's Figure 27): does ISL pretraining help nuclei
segmentation when only 1, 3, ... annotated fields are available?

Run by ``islkeras transfer CONFIG`` when ``transfer.sweep_train_fields`` is set (``experiments/
aiseg_transfer.json``)::

    <runs_dir>/<name>/<timestamp>/
        isl/                 ISL pretraining run (islkeras fit of transfer.pretrain + transfer.pretrain_set),
                             skipped when transfer.isl_run names an existing ISL run
        n01_isl/ n01_scratch/ n03_isl/ ...   one `islkeras transfer` run folder per (N, initialisation)
        results.csv          one row per run: train_fields, init, test_iou (mean over the test fields), ...
        per_field.csv        test IoU per field and run
        results.md           the table in Markdown (+ timings and machine load)
        curve.png            mean test IoU vs number of train fields, ISL-initialised vs scratch
        summary.json         wall time, pretraining time, load averages before/after

Both arms use the same architecture and normalisation (the ISL run's) and, for each N, the same first N
train fields sorted by name. Re-running with ``--run-dir`` on an interrupted experiment continues it:
finished runs are kept, an interrupted pretraining resumes.

This module also holds the ``islkeras transfer`` command (:data:`transfer_command`): one segmentation run
(``islkeras.segmentation.transfer.run_transfer``) or, with ``transfer.sweep_train_fields``, this experiment.
"""
from __future__ import annotations

import copy
import csv
import io
import os
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np

from islkeras.errors import ConfigError


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _clear_session() -> None:
    """Free the finished run's graphs and models before the next one (one process runs them all)."""
    import gc

    import tensorflow as tf

    tf.keras.backend.clear_session()
    gc.collect()


def pretrain_config(cfg):
    """The ISL experiment config of ``transfer.pretrain`` with ``transfer.pretrain_set`` applied."""
    from islkeras.config import load_config

    tr = cfg.transfer
    if not tr.pretrain:
        raise ConfigError(f"{cfg.source}: transfer.sweep_train_fields needs transfer.isl_run (an ISL run) or "
                          f"transfer.pretrain (an ISL experiment config to train first)")
    return load_config(tr.pretrain, overrides=dict(tr.pretrain_set or {}))


def run_experiment(cfg, out_dir=None, isl_run_given: bool = False) -> Path:
    """Pretrain once (unless ``transfer.isl_run``), then ISL-initialised vs scratch for every N."""
    t0, load0 = time.time(), _load()
    from islkeras.data.records import ensure_records
    from islkeras.training import run as R
    from islkeras.segmentation.isl_source import adopt_isl_settings, resolve_isl
    from islkeras.segmentation.transfer import run_transfer, train_subset
    from islkeras.utils import atomic_write_json

    tr = cfg.transfer
    sweep = sorted(set(int(n) for n in tr.sweep_train_fields))
    # fail before any training: records, mask channel, enough train fields, a usable ISL source
    manifest = ensure_records(cfg)
    for n in sweep:
        train_subset(manifest, n)
    isl_cfg = None if tr.isl_run else pretrain_config(cfg)
    if isl_cfg is not None and list(isl_cfg.data.inputs) != list(cfg.data.inputs):
        raise ConfigError(f"{tr.pretrain}: data.inputs {isl_cfg.data.inputs} differ from {cfg.source}'s "
                          f"{cfg.data.inputs}")
    references = stain_threshold_references(cfg, manifest, sweep)
    exp_dir = Path(out_dir) if out_dir else R.new_run_dir(cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    R.save_run_config(cfg, exp_dir)
    click.echo(f"islkeras transfer experiment: {cfg.name}, train fields {sweep} -> {exp_dir}", err=True)

    timings: dict = {}
    if tr.isl_run:
        isl_path = tr.isl_run
        resolve_isl(isl_path)
        timings["pretrain_minutes"] = None
    else:
        from islkeras.training.fit import fit

        t1 = time.time()
        click.echo(f"== ISL pretraining: {isl_cfg.name} ({tr.pretrain}) -> {exp_dir / 'isl'}", err=True)
        pre = fit(isl_cfg, run_dir=exp_dir / "isl")
        _clear_session()
        isl_path = str(exp_dir / "isl")
        timings["pretrain_minutes"] = round((time.time() - t1) / 60.0, 2)
        timings["pretrain_steps"] = pre.get("steps")
    isl = resolve_isl(isl_path)

    base = copy.deepcopy(cfg)
    base.transfer.sweep_train_fields = None
    notes = adopt_isl_settings(base, isl)  # scratch runs get the same architecture and normalisation
    for n in notes:
        click.echo(f"  note: {n}", err=True)
    arms = [("isl", str(isl.savedmodel))] + ([("scratch", None)] if tr.compare_scratch else [])
    rows, per_field = [], []
    for n in sweep:
        for arm, src in arms:
            sub = copy.deepcopy(base)
            sub.transfer.train_fields = n
            sub.transfer.isl_run = src
            d = exp_dir / f"n{n:02d}_{arm}"
            click.echo(f"== segmentation: {n} train field(s), {arm} -> {d}", err=True)
            t1 = time.time()
            run_transfer(sub, run_dir=d)
            _clear_session()
            s = R.read_summary(d) or {}
            rows.append({
                "train_fields": n, "init": arm if arm == "scratch" else f"isl:{tr.init}",
                "test_iou": s.get("test_iou"), "test_iou_std": s.get("test_iou_std"),
                "start_test_iou": s.get("start_test_iou"), "kept_start": s.get("kept_start"),
                "test_pixel_accuracy": s.get("test_pixel_accuracy"), "best_val_iou": s.get("best"),
                "epochs": s.get("epochs"), "steps": s.get("steps"), "steps_budget": s.get("steps_budget"),
                "stopped": s.get("stopped"), "best_epoch": s.get("best_epoch"),
                "minutes": s.get("minutes_total", round((time.time() - t1) / 60.0, 2)), "run": d.name,
            })
            mf = d / "metrics.csv"
            if mf.is_file():
                with open(mf, newline="") as f:
                    for r in csv.DictReader(f):
                        per_field.append({"train_fields": n, "init": rows[-1]["init"], "field": r["field"],
                                          "iou": float(r["iou"]), "pixel_accuracy": float(r["pixel_accuracy"])})
            write_results(exp_dir, rows, per_field, name=cfg.name, references=references)  # after every run, so partial results are visible
    wall = round((time.time() - t0) / 60.0, 2)
    summary = {"name": cfg.name, "wall_minutes": wall, **timings,
               "segmentation_minutes": round(sum(r["minutes"] or 0 for r in rows), 2),
               "loadavg_start": load0, "loadavg_end": _load(), "cpus": os.cpu_count(),
               "isl_run": str(isl.savedmodel), "sweep": sweep, "results": rows,
               "stain_threshold_test_iou": {str(k): v for k, v in references.items()}}
    atomic_write_json(exp_dir / "summary.json", summary)
    md = write_results(exp_dir, rows, per_field, summary, name=cfg.name, references=references)
    plot_curve(rows, per_field, exp_dir / "curve.png", title=cfg.name)
    click.echo(md)
    click.echo(f"experiment done in {wall:.1f} min -> {exp_dir}")
    return exp_dir


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def _steps(r) -> str:
    """Training steps of one run: ``800``, or ``600 of 800`` when it stopped early (``max_minutes``: the cap)."""
    if not r or r.get("steps") is None:
        return "n/a"
    budget = r.get("steps_budget")
    cap = " (cap)" if r.get("stopped") == "max_minutes" else ""
    return str(r["steps"]) if budget in (None, r["steps"]) else f"{r['steps']} of {budget}{cap}"


def markdown_table(rows: list[dict], references: Optional[dict] = None) -> str:
    """| train fields | scratch | ISL-initialised | gain | ISL + threshold only | stain + threshold | pixel acc. |
    steps |

    (mean test IoU). "ISL + threshold only": the calibrated start, before segmentation training; "stain +
    threshold": the true nuclear stain thresholded at the level that fits the same annotated fields best
    (``references``, by number of fields) -- what thresholding a perfect ISL prediction would give; steps:
    the training steps each run actually ran (scratch / ISL).
    """
    references = references or {}
    ns = sorted({r["train_fields"] for r in rows})
    by = {(r["train_fields"], "scratch" if r["init"] == "scratch" else "isl"): r for r in rows}
    lines = ["| train fields | test IoU, scratch | test IoU, ISL-initialised | gain | ISL + threshold only "
             "| true stain + threshold | pixel accuracy (scratch / ISL) | steps (scratch / ISL) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        s, i = by.get((n, "scratch")), by.get((n, "isl"))
        si = s["test_iou"] if s else None
        ii = i["test_iou"] if i else None
        gain = ii - si if (si is not None and ii is not None) else None
        start = _fmt(i.get("start_test_iou")) if i else "n/a"
        if i and i.get("kept_start"):
            start += " (kept)"
        pa = " / ".join(_fmt(r["test_pixel_accuracy"], 4) if r else "n/a" for r in (s, i))
        lines.append(f"| {n} | {_fmt(si)} | {_fmt(ii)} | {'n/a' if gain is None else f'{gain:+.3f}'} | {start} "
                     f"| {_fmt(references.get(n))} | {pa} | {_steps(s)} / {_steps(i)} |")
    return "\n".join(lines)


def stain_threshold_references(cfg, manifest: dict, ns, stain: Optional[str] = None) -> dict:
    """``{n: mean test IoU}`` of the true nuclear stain thresholded at the level (``calibration.best_level``,
    the calibration's search) that fits the masks of the first ``n`` train fields best; None values without
    a stain channel or test fields. The records are read once for all ``ns``."""
    from islkeras.data.reader import load_fields
    from islkeras.segmentation.calibration import best_level, threshold_ious
    from islkeras.segmentation.transfer import train_subset

    mask = cfg.transfer.mask_channel
    stain = stain or next((c for c in cfg.data.targets if c != mask and c not in cfg.data.masks), None)
    if stain is None or not any(f["split"] == "test" for f in manifest["fields"].values()):
        return {n: None for n in ns}
    train = {f.name: f for f in load_fields(cfg, "train", manifest=manifest, channels=[stain, mask])}
    test = load_fields(cfg, "test", manifest=manifest, channels=[stain, mask])
    out = {}
    for n in ns:
        chosen = [train[name] for name in train_subset(manifest, n)]
        t = best_level([f.arrays[stain][..., 0].astype(np.float32) for f in chosen],
                       [f.arrays[mask][..., 0] for f in chosen])[0]
        out[n] = float(np.mean(threshold_ious([f.arrays[stain][..., 0] for f in test],
                                              [f.arrays[mask][..., 0] for f in test], t)))
    return out


def write_results(exp_dir: Path, rows: list[dict], per_field: list[dict], summary: Optional[dict] = None,
                  name: str = "", references: Optional[dict] = None) -> str:
    from islkeras.utils import atomic_write_text

    def to_csv(items):
        buf = io.StringIO()
        if items:
            w = csv.DictWriter(buf, fieldnames=list(items[0]), lineterminator="\n")
            w.writeheader()
            for r in items:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                            for k, v in r.items()})
        return buf.getvalue()

    atomic_write_text(exp_dir / "results.csv", to_csv(rows))
    atomic_write_text(exp_dir / "per_field.csv", to_csv(per_field))
    md = [f"# {name or exp_dir.name}: few-image nuclei segmentation, ISL-initialised vs scratch", "",
          "Mean test IoU at threshold 0.5 over the test fields (whole fields; IoU = 1 when both masks are empty).",
          "", markdown_table(rows, references), ""]
    if per_field:
        fields = sorted({r["field"] for r in per_field})
        md += ["Per test field:", "", "| train fields | init | " + " | ".join(fields) + " |",
               "|---:|---|" + "---:|" * len(fields)]
        keys = sorted({(r["train_fields"], r["init"]) for r in per_field})
        for k in keys:
            vals = {r["field"]: r["iou"] for r in per_field if (r["train_fields"], r["init"]) == k}
            md.append(f"| {k[0]} | {k[1]} | " + " | ".join(_fmt(vals.get(f)) for f in fields) + " |")
        md.append("")
    if summary:
        steps = summary.get("pretrain_steps")
        md += [f"Wall time {summary['wall_minutes']:.1f} min (ISL pretraining "
               f"{_fmt(summary.get('pretrain_minutes'), 1)} min{'' if steps is None else f', {steps} steps'}, "
               f"segmentation runs "
               f"{summary['segmentation_minutes']:.1f} min) on {summary['cpus']} CPUs; load average "
               f"(1/5/15 min) {summary['loadavg_start']} at the start, {summary['loadavg_end']} at the end.", ""]
    text = "\n".join(md)
    atomic_write_text(exp_dir / "results.md", text)
    return text


def plot_curve(rows: list[dict], per_field: list[dict], path, title: str = "") -> None:
    """Mean test IoU vs number of train fields (log x), one line per initialisation, fields as dots."""
    from islkeras.utils import new_figure, save_figure

    fig = new_figure((5.5, 4))
    ax = fig.add_subplot()
    inits = sorted({r["init"] for r in rows}, key=lambda s: s == "scratch")
    ns = sorted({r["train_fields"] for r in rows})
    for k, init in enumerate(inits):
        pts = sorted((r["train_fields"], r["test_iou"]) for r in rows
                     if r["init"] == init and r["test_iou"] is not None)
        label = "scratch" if init == "scratch" else f"ISL-initialised ({init.split(':', 1)[-1]})"
        color = "C0" if init != "scratch" else "C3"
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label, lw=2)
        pf = [(r["train_fields"], r["iou"]) for r in per_field if r["init"] == init]
        if pf:
            jitter = 1.0 + (0.04 if init != "scratch" else -0.04)
            ax.scatter([p[0] * jitter for p in pf], [p[1] for p in pf], color=color, alpha=0.3, s=14)
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_ylim(0, 1)
    ax.set_xlabel("annotated train fields")
    ax.set_ylabel("test IoU at 0.5 (mean over fields; dots: fields)")
    ax.set_title(title or "few-image nuclei segmentation")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------------------------- CLI
@click.command("transfer", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--isl-run", "isl_run", default=None, metavar="RUN|none",
              help="ISL run folder or SavedModel to initialise from, or 'none' for from-scratch "
                   "(default: transfer.isl_run of the config).")
@click.option("--train-fields", type=click.IntRange(min=1), default=None,
              help="Use only the first N train fields, sorted by name (default: transfer.train_fields / all).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Write the run (or the experiment) here instead of <runs_dir>/<name>/<timestamp>.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path, JSON value), e.g. --set transfer.init=all. Repeatable.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Replace data.root of the config.")
def transfer_command(config, isl_run, train_fields, run_dir, sets, data_root):
    """Train nuclei segmentation from CONFIG, initialised from an ISL model (or from scratch).

    The segmentation net is the ISL generator's architecture with a sigmoid output, trained with the soft
    Jaccard distance on the mask channel (transfer.mask_channel); every layer but the head is copied from
    the ISL SavedModel (transfer.init). Writes a run folder like `islkeras fit`, plus metrics.csv (IoU at
    0.5 and pixel accuracy per test field, whole fields) and the test mean in summary.json.

    A config with transfer.sweep_train_fields runs the few-image experiment instead: ISL pretraining
    (transfer.pretrain) once, then pretrained vs scratch for each number of train fields; table
    (results.csv/.md) and curve (curve.png) in the experiment folder.

    \b
    Examples:
      islkeras transfer my_transfer.json --isl-run runs/aiseg_nuclei_l1/20250101-120000
      islkeras transfer my_transfer.json --isl-run none --train-fields 1
      islkeras transfer experiments/aiseg_transfer.json        # the few-image experiment
    """
    from islkeras.config import load_config, parse_set_option
    from islkeras.segmentation.transfer import prepare_transfer_config, run_transfer

    cfg = load_config(config, overrides=parse_set_option(sets), data_root=data_root)
    cfg = prepare_transfer_config(cfg, isl_run if isl_run is not None else "__config__",
                                  train_fields if train_fields is not None else "__config__")
    if cfg.transfer.sweep_train_fields:
        run_experiment(cfg, out_dir=run_dir, isl_run_given=isl_run is not None)
        return
    run_transfer(cfg, run_dir=run_dir)
