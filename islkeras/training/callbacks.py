"""Callbacks of ``islkeras fit``: a resumable ``history.csv``, TensorBoard scalars and the re-estimation of
BatchNorm statistics before validation. ``TrainingControl`` (schedule, best weights, early stopping, the
safety time cap, the resumable state in ``ckpt/``) is in ``islkeras.training.control`` (re-exported here).

``history.csv``: rows of epochs that are re-run after a resume are dropped before they are rewritten, so the
file has exactly one row per finished epoch.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, Sequence

import tensorflow as tf

from islkeras.training.control import TrainingControl, monitor_mode  # noqa: F401  (re-exported)
from islkeras.utils import atomic_write_text


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
