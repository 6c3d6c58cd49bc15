"""The run folder: ``<training.runs_dir>/<name>/<YYYYmmdd-HHMMSS>/`` (see docs/ARCHITECTURE.md).

Layout: ``config.json`` (the resolved config), ``history.csv``, ``tb/`` (TensorBoard), ``ckpt/``
(``backup/`` for BackupAndRestore, ``state.json``, ``best_weights.h5``), ``savedmodel/``,
``summary.json``. Only the chief writes (``is_chief``); other workers of a multi-worker run write to
temporary folders (BackupAndRestore does so itself).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Union

from islkeras.errors import UserError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "history.csv"


def is_chief(strategy=None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker run (``TF_CONFIG`` task type
    ``chief``, or ``worker`` 0 when there is no chief); see ``islkeras.training.cluster.is_chief``."""
    from islkeras.training.cluster import is_chief as _is_chief

    return _is_chief(strategy)


def runs_root(cfg) -> Path:
    return Path(cfg.training.runs_dir) / cfg.name


def new_run_dir(cfg) -> Path:
    """A fresh ``<runs_dir>/<name>/<timestamp>`` (suffix ``-2``, ``-3``... if it already exists)."""
    root = runs_root(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cand, i = root / stamp, 1
    while cand.exists():
        i += 1
        cand = root / f"{stamp}-{i}"
    return cand


def latest_run_dir(cfg) -> Path:
    """The newest run folder of ``cfg.name`` (what ``islkeras fit CONFIG --resume`` continues)."""
    root = runs_root(cfg)
    runs = sorted(d for d in root.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file()) if root.is_dir() else []
    if not runs:
        raise UserError(f"--resume: no run of {cfg.name!r} in {root} to resume; start one with `islkeras fit CONFIG`")
    return runs[-1]


def save_run_config(cfg, run_dir: Union[str, Path]) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    cfg.save(path)
    return path


def load_run_config(run_dir: Union[str, Path]):
    """The resolved ``ExperimentConfig`` a run was trained with (``<run_dir>/config.json``).

    ``run_dir`` may also be the run's ``savedmodel`` folder or the config file itself.
    """
    from islkeras.config import from_dict

    p = Path(run_dir)
    if p.is_file():
        path = p
    elif (p / CONFIG_FILE).is_file():
        path = p / CONFIG_FILE
    elif (p.parent / CONFIG_FILE).is_file():
        path = p.parent / CONFIG_FILE
    else:
        raise UserError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return from_dict(data, base_dir=path.parent, source=str(path))


def run_config_of(path: Union[str, Path]):
    """The ``ExperimentConfig`` of the run holding a SavedModel (run folder, its ``savedmodel/`` or a
    config file), or None for a bare SavedModel (no ``config.json`` beside it)."""
    p = Path(path)
    cand = [p / CONFIG_FILE, p.parent / CONFIG_FILE] if p.is_dir() else [p]
    if not any(c.is_file() for c in cand):
        return None
    return load_run_config(p)


def read_summary(run_dir: Union[str, Path]) -> Optional[dict]:
    f = Path(run_dir) / SUMMARY_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def steps_text(summary: dict) -> str:
    """How much of the step budget ran: ``1680 steps``, or ``1000 of 1680 steps`` when the run stopped early."""
    steps, budget = summary.get("steps"), summary.get("steps_budget")
    if steps is None:
        return "? steps"
    return f"{steps} steps" if budget in (None, steps) else f"{steps} of {budget} steps"


def summary_line(summary: dict) -> str:
    """The line ``fit``/``transfer`` print at the end; says so when the safety cap ``max_minutes`` stopped
    training before its step budget."""
    best = summary.get("best")
    best_s = "n/a" if best is None else f"{best:.4f}"
    stopped = summary.get("stopped")
    if stopped == "max_minutes":
        stopped = f"stopped by the safety cap training.max_minutes={summary.get('max_minutes')}"
    return (f"{summary.get('name', 'run')}: {summary.get('epochs')} epochs, {steps_text(summary)} ({stopped}), "
            f"best {summary.get('monitor')} {best_s} at epoch {summary.get('best_epoch')}, "
            f"{summary.get('minutes')} min -> {summary.get('savedmodel')}")
