"""TensorFlow metrics for training: Pearson correlation per image (numpy metrics: ``metrics_np``).

``pcc_per_image(y_true, y_pred)`` computes the Pearson correlation coefficient of each image and channel
over all its pixels -> ``(N, C)``. ``PCC`` is a Keras metric accumulating those values over an epoch
(every image-channel pair is one sample) and reporting their mean (``stat="mean"``, logged as ``pcc`` /
``val_pcc``) or standard deviation (``stat="std"``, ``pcc_std`` / ``val_pcc_std``). The state is a sum,
a sum of squares and a count, so it aggregates correctly over batches and replicas.
"""
from __future__ import annotations

import tensorflow as tf

EPS = 1e-8


def pcc_per_image(y_true, y_pred, eps: float = EPS):
    """Pearson correlation per image and channel over all pixels: (N, H, W, C) x2 -> (N, C).

    A constant image (zero variance) gives 0 rather than NaN.
    """
    a = tf.cast(y_true, tf.float32)
    b = tf.cast(y_pred, tf.float32)
    a = a - tf.reduce_mean(a, axis=[1, 2], keepdims=True)
    b = b - tf.reduce_mean(b, axis=[1, 2], keepdims=True)
    cov = tf.reduce_sum(a * b, axis=[1, 2])
    var = tf.reduce_sum(tf.square(a), axis=[1, 2]) * tf.reduce_sum(tf.square(b), axis=[1, 2])
    return cov / tf.sqrt(tf.maximum(var, eps))


class PCC(tf.keras.metrics.Metric):
    """Mean (or std) over images of the per-image PCC, accumulated over an epoch."""

    def __init__(self, stat: str = "mean", name=None, dtype=None, **kwargs):
        if stat not in ("mean", "std"):
            raise ValueError(f"PCC stat must be 'mean' or 'std', got {stat!r}")
        super().__init__(name=name or ("pcc" if stat == "mean" else "pcc_std"), dtype=dtype, **kwargs)
        self.stat = stat
        self.total = self.add_weight("total", initializer="zeros", dtype=tf.float64)
        self.total_sq = self.add_weight("total_sq", initializer="zeros", dtype=tf.float64)
        self.count = self.add_weight("count", initializer="zeros", dtype=tf.float64)

    def update_state(self, y_true, y_pred, sample_weight=None):
        r = tf.cast(tf.reshape(pcc_per_image(y_true, y_pred), [-1]), tf.float64)
        self.total.assign_add(tf.reduce_sum(r))
        self.total_sq.assign_add(tf.reduce_sum(tf.square(r)))
        self.count.assign_add(tf.cast(tf.size(r), tf.float64))

    def result(self):
        n = tf.maximum(self.count, 1.0)
        mean = self.total / n
        if self.stat == "mean":
            return tf.cast(mean, tf.float32)
        var = tf.maximum(self.total_sq / n - tf.square(mean), 0.0)
        return tf.cast(tf.sqrt(var), tf.float32)

    def reset_state(self):
        for v in (self.total, self.total_sq, self.count):
            v.assign(tf.zeros_like(v))

    def get_config(self):
        return dict(super().get_config(), stat=self.stat)


def pcc_metrics() -> list:
    """``[PCC("mean"), PCC("std")]`` -- logged as ``pcc``/``pcc_std`` (``val_`` prefix on validation)."""
    return [PCC("mean", name="pcc"), PCC("std", name="pcc_std")]
