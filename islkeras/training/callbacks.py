"""Callbacks of ``islkeras fit``: learning-rate schedule, best-generator tracking with early stopping
and a wall-clock budget, and a resumable ``history.csv``.

All state that must survive a kill -9 lives in the run folder and is written atomically after every
finished epoch (chief only); ``tf.keras.callbacks.BackupAndRestore`` (``ckpt/backup``) holds the
weights and optimizer state, so a resumed fit continues at the first unfinished epoch:

* ``ckpt/state.json``: per finished epoch its monitor value, learning rate and cumulative wall time
  (so early stopping, the budget and the schedule carry on where they were),
* ``ckpt/best_weights.h5``: generator weights of the best epoch so far (restored at the end),
* ``history.csv``: rows of epochs that are re-run after a resume are dropped before they are rewritten,
  so the file has exactly one row per finished epoch.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import tensorflow as tf

from islkeras.utils import atomic_write_json, atomic_write_text


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


class TrainingControl(tf.keras.callbacks.Callback):
    """Learning-rate schedule, best weights, early stopping and the time budget, resumable.

    * ``lr_schedule="cosine"``: ``lr = base * (1 + cos(pi * p)) / 2`` set before every batch, where the
      progress ``p`` is the larger of steps done / ``epochs * steps_per_epoch`` and, with a budget,
      wall time / ``max_minutes`` -- so a run cut short by its budget still anneals.
      ``"plateau"``: halve the learning rate when the monitor has not improved for
      ``plateau_patience`` epochs (down to ``base / 1000``). Both apply to every optimizer of the model
      (the generator's and, for pix2pix, the discriminator's, each relative to its own base rate).
    * After every epoch: ``logs["lr"]``; when the monitor improves, the generator's weights are saved
      to ``best_path``; training stops after ``patience`` epochs without improvement (``patience`` None:
      never) or after the epoch that crosses ``max_minutes`` of wall time (counted across resumes, from
      ``start_time`` of this session -- tracing included).
    * At the end: best weights restored (``restore_best``); ``self.summary`` describes the outcome.
    """

    def __init__(self, generator, state_path, best_path, *, epochs: int, steps_per_epoch: int,
                 monitor: str = "val_pcc", mode: str = "auto", patience: Optional[int] = 10,
                 restore_best: bool = True, lr_schedule: Optional[str] = None, plateau_patience: int = 3,
                 max_minutes: Optional[float] = None, start_time: Optional[float] = None, chief: bool = True):
        super().__init__()
        self.generator = generator
        self.state_path = Path(state_path)
        self.best_path = Path(best_path)
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        self.monitor, self.mode = monitor, monitor_mode(monitor, mode)
        self.patience = patience
        self.restore_best = restore_best
        self.lr_schedule = lr_schedule
        self.plateau_patience = max(1, int(plateau_patience))
        self.max_seconds = None if max_minutes is None else 60.0 * float(max_minutes)
        self.start_time = time.time() if start_time is None else start_time
        self.chief = chief
        self.entries: dict[int, dict] = {}
        self.base_lrs: list[float] = []
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

    def _load_state(self) -> dict:
        if self.state_path.is_file():
            try:
                return json.loads(self.state_path.read_text())
            except (OSError, ValueError):
                return {}
        return {}

    def _save_state(self) -> None:
        if self.chief:
            atomic_write_json(self.state_path, {
                "monitor": self.monitor, "mode": self.mode, "base_lrs": self.base_lrs,
                "epochs": {str(k): v for k, v in sorted(self.entries.items())},
            })

    def _better(self, value, best) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    def _recount(self):
        """best value/epoch and epochs without improvement, from the finished epochs' entries."""
        best, best_epoch, wait = None, None, 0
        for e in sorted(self.entries):
            v = self.entries[e].get("monitor")
            if self._better(v, best):
                best, best_epoch, wait = v, e, 0
            else:
                wait += 1
        return best, best_epoch, wait

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        state = self._load_state()
        self.entries = {int(k): v for k, v in state.get("epochs", {}).items()}
        self.base_lrs = state.get("base_lrs") or [_get_lr(o) for o in _optimizers(self.model)]
        self._first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_epoch is None:  # first epoch of this session: forget epochs that are re-run
            self._first_epoch = epoch
            self.entries = {e: v for e, v in self.entries.items() if e < epoch}
            self._offset = self.entries[epoch - 1]["elapsed_s"] if (epoch - 1) in self.entries else 0.0
            if self.lr_schedule is None and self.entries:  # lr comes back with the optimizer state anyway
                pass
        if self.lr_schedule == "cosine":
            self._cosine(epoch * self.steps_per_epoch)

    def _cosine(self, step: int):
        p = step / max(1, self.epochs * self.steps_per_epoch)
        if self.max_seconds:
            p = max(p, self.elapsed() / self.max_seconds)
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
        best, _, _ = self._recount()
        improved = self._better(value, best) or (value is None)
        self.entries[epoch] = {"monitor": value, "lr": logs["lr"], "elapsed_s": round(self.elapsed(), 3)}
        if improved and self.chief:
            tmp = self.best_path.with_name(f".{self.best_path.name}.tmp.h5")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self.generator.save_weights(str(tmp))
            os.replace(tmp, self.best_path)
        self._save_state()
        best, best_epoch, wait = self._recount()
        if self.lr_schedule == "plateau" and wait > 0 and wait % self.plateau_patience == 0:
            for opt, base in zip(opts, self.base_lrs):
                _set_lr(opt, max(_get_lr(opt) * 0.5, base / 1000.0))
        if self.patience is not None and wait >= self.patience:
            self.model.stop_training = True
            self.summary["stopped"] = "early_stopping"
        elif self.max_seconds is not None and self.elapsed() >= self.max_seconds:
            self.model.stop_training = True
            self.summary["stopped"] = "max_minutes"

    def on_train_end(self, logs=None):
        best, best_epoch, wait = self._recount()
        n = len(self.entries)
        self.summary.setdefault("stopped", "epochs" if n >= self.epochs else "interrupted")
        restored = False
        if self.restore_best and best_epoch is not None and self.best_path.is_file():
            self.generator.load_weights(str(self.best_path))
            restored = True
        self.summary.update({
            "epochs": n, "best_epoch": None if best_epoch is None else best_epoch + 1,
            "monitor": self.monitor, "best": best, "restored_best": restored,
            "minutes": round(self.elapsed() / 60.0, 2),
        })


class HistoryCSV(tf.keras.callbacks.Callback):
    """``history.csv`` with one row per finished epoch, resumable (rows of re-run epochs are replaced).

    Columns: ``epoch`` (1-based), training logs (``loss`` first), validation logs, ``lr``; the header
    of an existing file is kept when a run resumes.
    """

    def __init__(self, path, chief: bool = True):
        super().__init__()
        self.path = Path(path)
        self.chief = chief
        self.header: Optional[list[str]] = None
        self._first = True

    @staticmethod
    def order(keys: Sequence[str]) -> list[str]:
        keys = [k for k in keys if k != "epoch"]
        train = sorted((k for k in keys if not k.startswith("val_") and k != "lr"), key=lambda k: (k != "loss", 0))
        val = sorted((k for k in keys if k.startswith("val_")), key=lambda k: (k != "val_loss", 0))
        return ["epoch", *train, *val, *(["lr"] if "lr" in keys else [])]

    def _read(self):
        if not self.path.is_file():
            return None, []
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        return (rows[0], rows[1:]) if rows else (None, [])

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first:
            return
        self._first = False
        header, rows = self._read()
        if header is None:
            return
        self.header = header
        keep = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= epoch]  # 1-based epochs < this one
        if self.chief and len(keep) != len(rows):
            self._write(header, keep)

    def _write(self, header, rows):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def on_epoch_end(self, epoch, logs=None):
        if not self.chief:
            return
        logs = dict(logs or {})
        if self.header is None:
            self.header = self.order(list(logs))
        row = []
        for k in self.header:
            if k == "epoch":
                row.append(str(epoch + 1))
            else:
                v = logs.get(k)
                row.append("" if v is None else f"{float(v):.6g}")
        header, rows = self._read()
        self._write(self.header, rows + [row])


def _scalar_metadata():
    """SummaryMetadata of TensorBoard's scalar plugin, built from TensorFlow's own protos."""
    from tensorflow.core.framework import summary_pb2

    md = summary_pb2.SummaryMetadata()
    md.plugin_data.plugin_name = "scalars"
    md.plugin_data.content = b""
    md.data_class = summary_pb2.DATA_CLASS_SCALAR
    return md


class EpochTensorBoard(tf.keras.callbacks.Callback):
    """Per-epoch scalars for TensorBoard in ``log_dir/train`` and ``log_dir/validation`` (``epoch_<name>``,
    the layout of Keras' TensorBoard callback).

    Written with ``tf.summary.write`` and the scalar plugin's metadata, so it works without the
    ``tensorboard`` package installed (Keras' callback needs it just to write); ``tensorboard --logdir``
    reads the files as usual. Only the chief writes.
    """

    def __init__(self, log_dir, chief: bool = True):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.chief = chief
        self._writers: dict = {}
        self._md = None

    def _writer(self, which: str):
        if which not in self._writers:
            self._writers[which] = tf.summary.create_file_writer(str(self.log_dir / which))
        return self._writers[which]

    def on_epoch_end(self, epoch, logs=None):
        if not self.chief or not logs:
            return
        if self._md is None:
            self._md = _scalar_metadata()
        for key, value in logs.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            which, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with self._writer(which).as_default():
                tf.summary.write(f"epoch_{name}", tf.constant(v, tf.float32), step=epoch, metadata=self._md)
        for w in self._writers.values():
            w.flush()

    def on_train_end(self, logs=None):
        for w in self._writers.values():
            w.close()
        self._writers = {}


class BatchNormRecalibration(tf.keras.callbacks.Callback):
    """Re-estimate the generator's BatchNorm moving statistics before every validation ("precise BN").

    With a small batch, a randomly initialised encoder and a high learning rate, the moving averages
    (momentum 0.99) lag far behind the weights: a DenseNet121 U-Net that correlates at 0.5-0.7 in
    training mode correlated at ~0.01 in inference mode after 250 steps on aiseg-nuclei, and 0.60-0.75
    once its statistics were re-estimated on 20 training batches. So before each validation (and after
    each epoch when there is none) the generator runs forward in training mode on ``steps`` batches of
    ``dataset`` (no gradients): the first batch replaces the statistics (momentum 0), the others are
    averaged in with momentum ``momentum``. The weights saved as "best" and exported thus hold
    statistics that match them. ``strategy.run`` makes it work under any distribution strategy.
    """

    def __init__(self, generator, dataset, steps: int = 20, momentum: float = 0.9, strategy=None):
        super().__init__()
        self.generator = generator
        self.dataset = dataset
        self.steps = int(steps)
        self.momentum = float(momentum)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.bns = [l for l in generator.submodules if isinstance(l, tf.keras.layers.BatchNormalization)]
        self._iter = None
        self._fns: dict = {}
        self._validating = False

    def _fn(self, momentum: float):
        """A tf.function running the generator in training mode with every BN's momentum set to ``momentum``
        (BatchNormalization reads its momentum when traced, so each value gets its own function)."""
        if momentum not in self._fns:
            gen, strategy = self.generator, self.strategy

            @tf.function
            def step(x):
                strategy.run(lambda xx: gen(xx, training=True), args=(x,))

            self._fns[momentum] = step
        return self._fns[momentum]

    def recalibrate(self):
        if not self.bns or self.steps < 1:
            return
        if self._iter is None:
            self._iter = iter(self.dataset)
        saved = [l.momentum for l in self.bns]
        try:
            for k in range(self.steps):
                m = 0.0 if k == 0 else self.momentum
                for l in self.bns:
                    l.momentum = m
                x = next(self._iter)[0]
                self._fn(m)(x)
        finally:
            for l, m in zip(self.bns, saved):
                l.momentum = m

    def on_epoch_begin(self, epoch, logs=None):
        self._validating = False

    def on_test_begin(self, logs=None):  # fit's validation passes fit's callbacks to evaluate
        self._validating = True
        self.recalibrate()

    def on_epoch_end(self, epoch, logs=None):
        if not self._validating:
            self.recalibrate()
