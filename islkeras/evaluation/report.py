"""``islkeras report``: several runs side by side.

For every RUN_DIR and split the per-image table ``RUN_DIR/evaluate/<split>/metrics.csv`` of
``islkeras evaluate`` is read (and computed first, whole fields, when missing and ``--evaluate-missing``).
Outputs in ``--out`` (default ``./report``):

* ``report.csv``: one row per run and channel -- run, name, architecture, loss, ``steps`` (training steps run,
  from the run's ``summary.json``), ``steps_budget``, ``stopped`` (why training ended), channel, and per split
  ``pcc_mean_<split>``, ``pcc_std_<split>``, ``pcc_median_<split>``, ``n_<split>`` (images),
  ``pcc_nonempty_mean_<split>``, ``pcc_nonempty_std_<split>``, ``mode_<split>`` (whole fields or crops);
* ``report.md``: the same as a Markdown table with the steps and ``PCC mean +- std`` per split (like the
  thesis's Table 2 / Figure 17);
* ``pcc_boxplot.png``: PCC per image of every run, channel and split.

Figures come from :mod:`islkeras.evaluation.figures`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import click
import numpy as np

from islkeras.errors import UserError
from islkeras.evaluation.figures import architecture_label, plot_pcc_comparison

__all__ = ["report_command", "build_report", "to_markdown"]


def _run_label(run: Path, name: str) -> str:
    return f"{name}/{run.name}"


def _fmt(mean, std) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and np.isnan(mean)) else f"{mean:.3f} ± {std:.3f}"


def build_report(run_dirs: Sequence[Union[str, Path]], splits: Sequence[str] = ("val", "test"),
                 evaluate_missing: bool = True, mask_jaccard: bool = False):
    """(table DataFrame, {box label: PCC values}) for the runs (see module doc)."""
    import pandas as pd

    from islkeras.evaluation import metrics as M
    from islkeras.evaluation.evaluate import EVAL_DIR, evaluate_run
    from islkeras.training.run import read_summary, run_config_of

    rows, groups = [], {}
    for rd in run_dirs:
        run = Path(rd)
        if run.name == "savedmodel":
            run = run.parent
        cfg = run_config_of(run) if run.exists() else None
        if cfg is None:
            raise UserError(f"{rd}: not a run folder (no config.json)")
        label = _run_label(run, cfg.name)
        per_channel: dict[str, dict] = {}
        for split in splits:
            f = run / EVAL_DIR / split / "metrics.csv"
            mode = None
            if f.is_file():
                df = pd.read_csv(f)
                sj = f.parent / "summary.json"
                if sj.is_file():
                    mode = json.loads(sj.read_text()).get("mode")
            elif evaluate_missing:
                click.echo(f"report: evaluating {label} on {split} (no {f})", err=True)
                df = evaluate_run(run, split, mask_jaccard=mask_jaccard)
                mode = "whole fields"
            else:
                continue
            for ch, sub in df.groupby("channel", sort=False):
                a = M.summary_stats(sub["pcc"])
                ne = M.summary_stats(sub.loc[~sub["empty"].astype(bool), "pcc"]) if "empty" in sub else a
                d = per_channel.setdefault(str(ch), {})
                d.update({f"pcc_mean_{split}": a["mean"], f"pcc_std_{split}": a["std"],
                          f"pcc_median_{split}": a["median"], f"n_{split}": a["n"],
                          f"pcc_nonempty_mean_{split}": ne["mean"], f"pcc_nonempty_std_{split}": ne["std"],
                          f"mode_{split}": mode})
                groups[f"{label} {ch} {split}"] = sub["pcc"].to_numpy(float)
        if not per_channel:
            raise UserError(f"{run}: no evaluation for split(s) {', '.join(splits)} (run `islkeras evaluate "
                            f"{run} --split SPLIT` or drop --no-evaluate-missing)")
        trained = read_summary(run) or {}
        for ch, vals in per_channel.items():
            rows.append({"run": label, "run_dir": str(run), "name": cfg.name, "architecture": architecture_label(cfg),
                         "loss": cfg.loss.kind, "steps": trained.get("steps"),
                         "steps_budget": trained.get("steps_budget"), "stopped": trained.get("stopped"),
                         "channel": ch, **vals})
    table = pd.DataFrame(rows)
    for split in splits:  # same columns for every run, even where a split is missing
        for k in ("pcc_mean", "pcc_std", "pcc_median", "n", "pcc_nonempty_mean", "pcc_nonempty_std", "mode"):
            if f"{k}_{split}" not in table:
                table[f"{k}_{split}"] = None
    return table, groups


def _num(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def steps_cell(r) -> str:
    """``1680``; ``1000 of 1680 (max_minutes)`` when training stopped before its step budget; n/a unknown."""
    steps, budget, stopped = _num(r.get("steps")), _num(r.get("steps_budget")), r.get("stopped")
    if steps is None:
        return "n/a"
    if budget is None or int(budget) == int(steps):
        return str(int(steps))
    return f"{int(steps)} of {int(budget)} ({stopped})"


def to_markdown(table, splits: Sequence[str]) -> str:
    head = ["run", "architecture", "loss", "steps", "channel"] + [f"PCC {s} (mean ± std)" for s in splits] + \
        [f"n {s}" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in table.iterrows():
        num = _num
        cells = [str(r["run"]), str(r["architecture"]), str(r["loss"]), steps_cell(r), str(r["channel"])]
        cells += [_fmt(num(r[f"pcc_mean_{s}"]), num(r[f"pcc_std_{s}"])) for s in splits]
        cells += ["" if num(r[f"n_{s}"]) is None else str(int(r[f"n_{s}"])) for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command("report", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="report", show_default=True,
              help="Output folder for report.csv, report.md and pcc_boxplot.png.")
@click.option("--split", "splits", multiple=True, default=("val", "test"), show_default=True,
              help="Split(s) to compare (repeatable).")
@click.option("--evaluate-missing/--no-evaluate-missing", default=True, show_default=True,
              help="Run `islkeras evaluate` (whole fields, no mask Jaccard) for runs/splits without "
                   "evaluate/<split>/metrics.csv (written into the run folder).")
def report_command(run_dirs, out_dir, splits, evaluate_missing):
    """Compare runs side by side: PCC mean +- std per split and channel (CSV + Markdown) and a box plot.

    Each RUN_DIR is a run folder (runs/<name>/<stamp>). Results come from RUN_DIR/evaluate/<split>/ as
    written by `islkeras evaluate` (whole fields or crops -- the mode column says which).

    \b
    Example:
      islkeras report runs/aiseg_nuclei_l1/2025* runs/aiseg_nuclei_pix2pix/2025* --out report/
    """
    from islkeras.utils import atomic_write_text

    table, groups = build_report(run_dirs, splits, evaluate_missing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.csv", table.drop(columns=["run_dir"]).to_csv(index=False))
    md = to_markdown(table, splits)
    atomic_write_text(out / "report.md", md)
    plot_pcc_comparison(groups, out / "pcc_boxplot.png", title="PCC per image: " + ", ".join(splits))
    click.echo(md, nl=False)
    click.echo(f"-> {out / 'report.csv'}, {out / 'report.md'}, {out / 'pcc_boxplot.png'}")
