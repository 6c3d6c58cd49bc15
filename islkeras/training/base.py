"""Shared pieces of the custom-``train_step`` models (pix2pix, perceptual)."""
from __future__ import annotations

import tensorflow as tf

from islkeras.training.metrics import pcc_metrics


class GeneratorModel(tf.keras.Model):
    """A ``keras.Model`` around a generator whose ``train_step`` is overridden by subclasses.

    ``call`` runs the generator, so ``model.predict`` / ``model(x)`` behave like the generator itself.
    ``global_batch_size`` scales per-example losses (``tf.nn.compute_average_loss``) so the same steps
    give the same updates under any ``tf.distribute`` strategy; ``None`` means the local batch times
    the number of replicas (used for evaluation, where the last batch may be smaller).
    Subclasses list their loss names in ``LOSS_NAMES``; each becomes a ``Mean`` tracker logged under
    that name (``val_<name>`` on validation), next to ``pcc``/``pcc_std``.
    """

    LOSS_NAMES: tuple[str, ...] = ("loss",)

    def __init__(self, generator, global_batch_size=None, loss_names=None, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.global_batch_size = global_batch_size
        self.trackers = {n: tf.keras.metrics.Mean(name=n) for n in (loss_names or self.LOSS_NAMES)}
        self.pcc_trackers = pcc_metrics()

    def call(self, x, training=False):
        return self.generator(x, training=training)

    @property
    def metrics(self):
        return [*self.trackers.values(), *self.pcc_trackers]

    def _average(self, per_example, training: bool):
        gbs = self.global_batch_size if training else None
        return tf.nn.compute_average_loss(per_example, global_batch_size=gbs)

    def _update(self, terms: dict, y, y_pred) -> dict:
        for name, tracker in self.trackers.items():
            if name in terms:
                tracker.update_state(terms[name])
        for m in self.pcc_trackers:
            m.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    @staticmethod
    def _unpack(data):
        x, y = data[0], data[1]
        return x, y

    def get_config(self):  # the wrapper is never serialised; the generator is exported on its own
        return {"global_batch_size": self.global_batch_size}
