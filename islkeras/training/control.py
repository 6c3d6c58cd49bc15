"""``TrainingControl``: learning-rate schedule, best weights, early stopping, the safety time cap, and the
resumable state of a run (``ckpt/`` of the run folder).

The budget of a run is its steps (``training.epochs * training.steps_per_epoch``); ``training.max_minutes``
is only a safety cap: training stops after the epoch that crosses it, and the summary says so
(``stopped: "max_minutes"`` with the steps actually run). The schedules depend on steps alone, so the same
config trains the same way on a fast and on a slow machine.

What must survive a kill -9 is written atomically (chief only; ``tf.keras.callbacks.BackupAndRestore``
in ``ckpt/backup`` holds the weights and optimizer state of the last finished epoch):

* ``ckpt/state.json``: per finished epoch its monitor value, learning rate, cumulative wall time and steps
  (early stopping, the cap and the schedule carry on where they were), and once training is over
  ``finished``: the outcome and the file holding the weights to export. A run killed after that (during
  the export) is exported on ``--resume`` without training again.
* ``ckpt/best_weights-eNNN.h5``: generator weights of the best epoch NNN so far. A new best gets a new file;
  the previous one is removed only once the backup of the new best's epoch is complete (at the next
  epoch's start), so after a kill between the two saves the best file always matches the best epoch of
  the epochs the backup holds.
* ``ckpt/final_weights.h5``: the weights to export when they are not a best-weights file (no restore of
  the best epoch, or a segmentation run that keeps its calibrated start).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import tensorflow as tf

from islkeras.utils import atomic_write_json

FINAL_WEIGHTS = "final_weights.h5"


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """'max' for correlations/accuracies, 'min' for losses (``mode`` wins unless 'auto')."""
    if mode in ("max", "min"):
        return mode
    m = monitor.lower()
    return "max" if any(k in m for k in ("pcc", "acc", "iou", "ssim", "psnr", "auc", "ap")) and "loss" not in m \
        else "min"


def _optimizers(model) -> list:
    opts = [model.optimizer] + [getattr(model, "d_optimizer", None)]
    return [o for o in opts if o is not None]


def _get_lr(opt) -> float:
    lr = opt.learning_rate
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(opt.iterations))
    return float(tf.keras.backend.get_value(lr))


def _set_lr(opt, value: float) -> None:
    opt.learning_rate.assign(value) if hasattr(opt.learning_rate, "assign") else setattr(opt, "learning_rate", value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def finished_training(state_path) -> Optional[tuple[dict, Path]]:
    """``(summary, weights file)`` of a run whose training is over but which may not be exported yet
    (``finished`` in ``state.json`` and its weights file present), else None."""
    state_path = Path(state_path)
    fin = _read_json(state_path).get("finished")
    if not fin:
        return None
    weights = state_path.parent / fin.get("weights", "")
    if not fin.get("weights") or not weights.is_file():
        return None
    return {k: v for k, v in fin.items() if k != "weights"}, weights


class TrainingControl(tf.keras.callbacks.Callback):
    """Learning-rate schedule, best weights, early stopping and the safety cap, resumable (module doc).

    * ``lr_schedule="cosine"``: ``lr = base * (1 + cos(pi * p)) / 2`` set before every batch, ``p`` = steps
      done / ``epochs * steps_per_epoch``. ``"plateau"``: halve the learning rate when the monitor has not
      improved for ``plateau_patience`` epochs (down to ``base / 1000``). Both apply to every optimizer of
      the model (the generator's and, for pix2pix, the discriminator's, each relative to its own base rate).
    * After every epoch: ``logs["lr"]``; when the monitor improves, the generator's weights are saved to a
      best-weights file; training stops after ``patience`` epochs without improvement (``patience`` None:
      never; epochs whose monitor is missing or NaN do not count) or after the epoch that crosses
      ``max_minutes`` of wall time (counted across resumes, from ``start_time`` of this session).
    * At the end: best weights restored (``restore_best``); ``self.summary`` describes the outcome, with
      ``steps`` (run), ``steps_budget`` and ``max_minutes``; the state is marked ``finished``.
    """

    def __init__(self, generator, state_path, best_path, *, epochs: int, steps_per_epoch: int,
                 monitor: str = "val_pcc", mode: str = "auto", patience: Optional[int] = 10,
                 restore_best: bool = True, lr_schedule: Optional[str] = None, plateau_patience: int = 3,
                 max_minutes: Optional[float] = None, start_time: Optional[float] = None, chief: bool = True):
        super().__init__()
        self.generator = generator
        self.state_path = Path(state_path)
        self.best_path = Path(best_path)  #: best files are named after it: best_weights.h5 -> best_weights-e003.h5
        self.final_path = self.state_path.with_name(FINAL_WEIGHTS)
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        self.monitor, self.mode = monitor, monitor_mode(monitor, mode)
        self.patience = patience
        self.restore_best = restore_best
        self.lr_schedule = lr_schedule
        self.plateau_patience = max(1, int(plateau_patience))
        self.max_minutes = max_minutes
        self.max_seconds = None if max_minutes is None else 60.0 * float(max_minutes)
        self.start_time = time.time() if start_time is None else start_time
        self.chief = chief
        self.entries: dict[int, dict] = {}
        self.base_lrs: list[float] = []
        self.finished: Optional[dict] = None
        self._first_epoch = None
        self._offset = 0.0
        self._epoch = 0
        self._warned = False
        self.summary: dict = {}
        # the batch hook only sets the learning rate: no need for Keras to sync the logs to numpy every step
        self._supports_tf_logs = True

    def _implements_train_batch_hooks(self):
        return self.lr_schedule == "cosine"

    # ------------------------------------------------------------------ state
    def elapsed(self) -> float:
        return self._offset + (time.time() - self.start_time)

    def best_file(self, epoch: int) -> Path:
        """The best-weights file of (0-based) ``epoch``."""
        return self.best_path.with_name(f"{self.best_path.stem}-e{epoch + 1:03d}{self.best_path.suffix}")

    def _save_state(self) -> None:
        if self.chief:
            state = {"monitor": self.monitor, "mode": self.mode, "base_lrs": self.base_lrs,
                     "epochs": {str(k): v for k, v in sorted(self.entries.items())}}
            if self.finished is not None:
                state["finished"] = self.finished
            atomic_write_json(self.state_path, state)

    def _better(self, value, best) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    def _recount(self):
        """best value/epoch and epochs without improvement (epochs without a monitor value do not count)."""
        best, best_epoch, wait = None, None, 0
        for e in sorted(self.entries):
            v = self.entries[e].get("monitor")
            if self._better(v, best):
                best, best_epoch, wait = v, e, 0
            elif v is not None:
                wait += 1
        return best, best_epoch, wait

    def _prune(self) -> None:
        """Remove best-weights files other than the best epoch's (stale ones of a killed session too)."""
        if not self.chief:
            return
        keep = self._recount()[1]
        for p in self.best_path.parent.glob(f"{self.best_path.stem}-e*{self.best_path.suffix}"):
            if keep is None or p != self.best_file(keep):
                p.unlink(missing_ok=True)

    def _save_weights(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp.h5")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.generator.save_weights(str(tmp))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        state = _read_json(self.state_path)
        self.entries = {int(k): v for k, v in state.get("epochs", {}).items()}
        self.base_lrs = state.get("base_lrs") or [_get_lr(o) for o in _optimizers(self.model)]
        self.finished = None
        self._first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_epoch is None:  # first epoch of this session: forget epochs that are re-run
            self._first_epoch = epoch
            self.entries = {e: v for e, v in self.entries.items() if e < epoch}
            self._offset = self.entries[epoch - 1]["elapsed_s"] if (epoch - 1) in self.entries else 0.0
        self._prune()  # the backup of the previous epoch is complete: older best files can go
        if self.lr_schedule == "cosine":
            self._cosine(epoch * self.steps_per_epoch)

    def _cosine(self, step: int):
        p = step / max(1, self.epochs * self.steps_per_epoch)
        f = 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
        for opt, base in zip(_optimizers(self.model), self.base_lrs):
            _set_lr(opt, base * f)

    def on_train_batch_begin(self, batch, logs=None):
        if self.lr_schedule == "cosine":
            self._cosine(self._epoch * self.steps_per_epoch + batch)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        opts = _optimizers(self.model)
        logs["lr"] = _get_lr(opts[0])
        value = logs.get(self.monitor)
        if value is None and not self._warned:
            self._warned = True
            tf.get_logger().warning(f"early stopping monitor {self.monitor!r} is not in the logs "
                                    f"({', '.join(logs)}); keeping the last epoch's weights")
        value = None if value is None else float(value)
        improved = self._better(value, self._recount()[0])
        self.entries[epoch] = {"monitor": value, "lr": logs["lr"], "elapsed_s": round(self.elapsed(), 3),
                               "steps": self.steps_per_epoch}
        if improved and self.chief:
            self._save_weights(self.best_file(epoch))
        self._save_state()
        best, best_epoch, wait = self._recount()
        if self.lr_schedule == "plateau" and wait > 0 and wait % self.plateau_patience == 0:
            for opt, base in zip(opts, self.base_lrs):
                _set_lr(opt, max(_get_lr(opt) * 0.5, base / 1000.0))
        if self.patience is not None and wait >= self.patience:
            self.model.stop_training = True
            self.summary["stopped"] = "early_stopping"
        elif self.max_seconds is not None and self.elapsed() >= self.max_seconds and epoch + 1 < self.epochs:
            self.model.stop_training = True
            self.summary["stopped"] = "max_minutes"
            tf.get_logger().warning(
                f"training.max_minutes ({self.max_minutes:g} min) reached after epoch {epoch + 1}: stopping after "
                f"{self.steps_run()} of {self.epochs * self.steps_per_epoch} steps")

    def steps_run(self) -> int:
        return int(sum(e.get("steps", self.steps_per_epoch) for e in self.entries.values()))

    def on_train_end(self, logs=None):
        best, best_epoch, wait = self._recount()
        n = len(self.entries)
        self.summary.setdefault("stopped", "epochs" if n >= self.epochs else "interrupted")
        restored = False
        if self.restore_best and best_epoch is not None and self.best_file(best_epoch).is_file():
            self.generator.load_weights(str(self.best_file(best_epoch)))
            restored = True
        self.summary.update({
            "epochs": n, "best_epoch": None if best_epoch is None else best_epoch + 1,
            "monitor": self.monitor, "best": best, "restored_best": restored,
            "minutes": round(self.elapsed() / 60.0, 2), "steps": self.steps_run(),
            "steps_budget": self.epochs * self.steps_per_epoch, "max_minutes": self.max_minutes,
        })
        if self.summary["stopped"] != "interrupted":  # a resume exports these weights without training again
            self.finish(None if not restored else self.best_file(best_epoch))

    def finish(self, weights: Optional[Path] = None, **summary) -> None:
        """Mark training as over: ``weights`` (a best-weights file) or, when None, the generator's current
        weights saved to ``final_weights.h5`` are what gets exported; ``summary`` items are added."""
        self.summary.update(summary)
        if weights is None:
            if self.chief:
                self._save_weights(self.final_path)
            weights = self.final_path
        self.finished = dict(self.summary, weights=Path(weights).name)
        self._save_state()
