"""Figures of an evaluation: PCC distributions, learning curves, image panels, run comparisons.

Drawn with matplotlib's object API on the Agg canvas (:func:`islkeras.utils.new_figure`: no pyplot state, no
display needed) and written atomically (:func:`islkeras.utils.save_figure`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from islkeras.utils import new_figure, save_figure

__all__ = ["plot_pcc_distribution", "plot_learning_curves", "plot_panels", "plot_pcc_comparison",
           "architecture_label"]


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
    finite = df[column].to_numpy(float)[np.isfinite(df[column].to_numpy(float))] if len(df) else np.zeros(0)
    ax.set_ylim(min(-0.05, float(finite.min()) - 0.05) if finite.size else -0.05, 1.02)  # NaN: a diverged model
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
