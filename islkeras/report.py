"""``islkeras report``: several runs side by side, plus the matplotlib figure helpers ``evaluate`` uses.

For every RUN_DIR and split the per-image table ``RUN_DIR/evaluate/<split>/metrics.csv`` of
``islkeras evaluate`` is read (and computed first, whole fields, when missing and ``--evaluate-missing``).
Outputs in ``--out`` (default ``./report``):

* ``report.csv``: one row per run and channel -- run, name, architecture, loss, channel, and per split
  ``pcc_mean_<split>``, ``pcc_std_<split>``, ``pcc_median_<split>``, ``n_<split>`` (images),
  ``pcc_nonempty_mean_<split>``, ``pcc_nonempty_std_<split>``, ``mode_<split>`` (whole fields or crops);
* ``report.md``: the same as a Markdown table with ``PCC mean +- std`` per split (like the thesis's
  Table 2 / Figure 17);
* ``pcc_boxplot.png``: PCC per image of every run, channel and split.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed) and
written atomically.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import click
import numpy as np

from islkeras.errors import UserError

__all__ = [
    "report_command", "build_report", "architecture_label", "plot_pcc_distribution", "plot_learning_curves",
    "plot_panels", "plot_pcc_comparison", "save_figure", "new_figure",
]


# ------------------------------------------------------------------------------------------- figures
def new_figure(figsize=(6.0, 4.0)):
    """A matplotlib Figure on an Agg canvas (thread-safe, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Union[str, Path], dpi: int = 100) -> Path:
    from islkeras.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_pcc_distribution(df, path, title: Optional[str] = None, column: str = "pcc") -> Path:
    """Box plot of PCC per channel with every image as a dot (filled: non-empty, hollow: empty)."""
    chans = list(dict.fromkeys(df["channel"])) if len(df) else []
    fig = new_figure((max(3.5, 1.6 * len(chans) + 2), 4.0))
    ax = fig.add_subplot()
    data = [df.loc[df["channel"] == c, column].to_numpy(float) for c in chans]
    if chans:
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(chans) + 1), chans)
        rng = np.random.default_rng(0)
        for i, c in enumerate(chans):
            sub = df[df["channel"] == c]
            empty = sub["empty"].astype(bool).to_numpy() if "empty" in sub else np.zeros(len(sub), bool)
            xs = i + 1 + rng.uniform(-0.15, 0.15, len(sub))
            v = sub[column].to_numpy(float)
            ax.scatter(xs[~empty], v[~empty], s=14, color="tab:blue", alpha=0.7, label="non-empty" if i == 0 else None)
            if empty.any():
                ax.scatter(xs[empty], v[empty], s=14, facecolors="none", edgecolors="tab:orange",
                           label="empty" if i == 0 else None)
        ax.legend(loc="lower left", fontsize=8)
    ax.set_ylabel("PCC (per image)")
    ax.set_ylim(min(-0.05, float(np.nanmin(df[column])) - 0.05) if len(df) else -0.05, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "PCC distribution", fontsize=10)
    return save_figure(fig, path)


def plot_learning_curves(history_csv, path, title: Optional[str] = None) -> Path:
    """Learning curves from ``history.csv``: generator losses, the discriminator's (pix2pix), and PCC."""
    import pandas as pd

    h = pd.read_csv(history_csv)
    x = h["epoch"] if "epoch" in h else pd.Series(range(len(h)))
    cols = [c for c in h.columns if c != "epoch"]
    base = lambda c: c[4:] if c.startswith("val_") else c  # noqa: E731
    disc = [c for c in cols if base(c).startswith("d_")]
    gen = [c for c in cols if "loss" in c and c not in disc] + [c for c in cols if base(c) in ("g_gan", "g_l1")]
    gen = list(dict.fromkeys(gen))
    pcc = [c for c in cols if base(c) == "pcc"]
    panels = [("generator loss" if disc else "loss", gen)] + ([("discriminator loss", disc)] if disc else []) + \
        ([("PCC", pcc)] if pcc else [])
    fig = new_figure((4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, cs) in zip(axes, panels):
        for c in cs:
            ls = "--" if c.startswith("val_") else "-"
            ax.plot(x, h[c], ls, marker="." if len(h) < 30 else None, label=c)
            std = f"{c}_std"
            if name == "PCC" and std in h:
                ax.fill_between(x, h[c] - h[std], h[c] + h[std], alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if cs:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _limits(img) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(img, np.float64), [0.5, 99.8])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def plot_panels(panels: Sequence[Mapping], path, max_side: int = 512) -> Path:
    """Rows of ``input | target | prediction | |error|``; ``panels`` items have ``name``, ``input``,
    ``target``, ``prediction`` (2-D arrays, prediction on the target's scale) and optional ``channel``.
    Target and prediction share the target's display range; images are subsampled to ``max_side``."""
    n = len(panels)
    fig = new_figure((12.0, 3.1 * n))
    axes = fig.subplots(n, 4, squeeze=False)
    for r, p in enumerate(panels):
        step = max(1, int(np.ceil(max(np.shape(p["target"])) / max_side)))
        inp, tgt, prd = (np.asarray(p[k])[::step, ::step] for k in ("input", "target", "prediction"))
        err = np.abs(prd.astype(np.float64) - tgt.astype(np.float64))
        lo, hi = _limits(tgt)
        ilo, ihi = _limits(inp)
        ch = p.get("channel", "target")
        specs = [(inp, "gray", ilo, ihi, f"{p['name']}: input"), (tgt, "magma", lo, hi, f"{ch}: target"),
                 (prd, "magma", lo, hi, f"{ch}: prediction"), (err, "viridis", 0.0, hi - lo, "|error|")]
        for ax, (img, cmap, vmin, vmax, label) in zip(axes[r], specs):
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[r][3], shrink=0.8)
    return save_figure(fig, path)


def plot_pcc_comparison(groups: Mapping[str, Sequence[float]], path, title: Optional[str] = None) -> Path:
    """One box (with dots) per labelled group of per-image PCC values."""
    labels = list(groups)
    fig = new_figure((max(4.0, 0.9 * len(labels) + 2.5), 4.6))
    ax = fig.add_subplot()
    data = [np.asarray(groups[k], float) for k in labels]
    if labels:
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)
        for i, v in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(v)), v, s=10, alpha=0.6, color="tab:blue")
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("PCC (per image)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "PCC per run", fontsize=10)
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------------- report
def architecture_label(cfg) -> str:
    m = cfg.model
    return f"unet_sm/{m.backbone}" if m.architecture == "unet_sm" else f"unet/{m.unet_filters}x{m.unet_depth}"


def _run_label(run: Path, name: str) -> str:
    return f"{name}/{run.name}"


def _fmt(mean, std) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and np.isnan(mean)) else f"{mean:.3f} ± {std:.3f}"


def build_report(run_dirs: Sequence[Union[str, Path]], splits: Sequence[str] = ("val", "test"),
                 evaluate_missing: bool = True, mask_jaccard: bool = False):
    """(table DataFrame, {box label: PCC values}) for the runs (see module doc)."""
    import pandas as pd

    from islkeras import metrics_np as M
    from islkeras.evaluate import EVAL_DIR, evaluate_run
    from islkeras.predict import run_config_of

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
        for ch, vals in per_channel.items():
            rows.append({"run": label, "run_dir": str(run), "name": cfg.name, "architecture": architecture_label(cfg),
                         "loss": cfg.loss.kind, "channel": ch, **vals})
    table = pd.DataFrame(rows)
    for split in splits:  # same columns for every run, even where a split is missing
        for k in ("pcc_mean", "pcc_std", "pcc_median", "n", "pcc_nonempty_mean", "pcc_nonempty_std", "mode"):
            if f"{k}_{split}" not in table:
                table[f"{k}_{split}"] = None
    return table, groups


def to_markdown(table, splits: Sequence[str]) -> str:
    head = ["run", "architecture", "loss", "channel"] + [f"PCC {s} (mean ± std)" for s in splits] + \
        [f"n {s}" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in table.iterrows():
        def num(v):
            return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

        cells = [str(r["run"]), str(r["architecture"]), str(r["loss"]), str(r["channel"])]
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
