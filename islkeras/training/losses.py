"""Losses for ISL training and segmentation. No globals: weights are arguments.

Per-example functions return a ``(N,)`` float32 vector (mean over pixels and channels of each image),
so custom train steps reduce them with ``tf.nn.compute_average_loss(per_example, global_batch_size=...)``
and the result does not depend on the number of replicas.

* Pixel losses: ``l1_per_example``, ``l2_per_example`` (and ``pixel_per_example(kind)``).
* Perceptual (Johnson et al. 2016): ``content_per_example`` (squared VGG feature difference per
  element, relative to the target's feature energy -- or the prediction's when larger, so an empty target
  does not divide by ~0 --, averaged over layers), ``style_per_example`` (the
  same on Gram matrices normalised by h*w*k),
  ``total_variation_per_example`` (mean absolute neighbour difference per pixel), combined by
  ``PerceptualLoss`` with weights ``content``, ``pixel``, ``tv``, ``style``. Every term is a per-element
  mean, so the weights say how much each term counts (the thesis's unnormalised TV summed over the
  image and swamped the rest).
* GAN (pix2pix): ``generator_gan_per_example`` (non-saturating BCE on logits against "real") and
  ``discriminator_per_example`` (0.5 * (BCE(real, 1) + BCE(fake, 0))).
* Segmentation: ``jaccard_distance`` (soft Jaccard / IoU distance on probabilities) and
  ``JaccardDistance`` (a ``tf.keras.losses.Loss``).
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf


def _mean_per_example(t):
    return tf.reduce_mean(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)


# ------------------------------------------------------------------------------------------- pixel
def l1_per_example(y_true, y_pred):
    return _mean_per_example(tf.abs(tf.cast(y_true, tf.float32) - tf.cast(y_pred, tf.float32)))


def l2_per_example(y_true, y_pred):
    return _mean_per_example(tf.square(tf.cast(y_true, tf.float32) - tf.cast(y_pred, tf.float32)))


def pixel_per_example(kind: str):
    if kind == "l1":
        return l1_per_example
    if kind == "l2":
        return l2_per_example
    raise ValueError(f"unknown pixel loss {kind!r}; expected 'l1' or 'l2'")


def pixel_loss(kind: str):
    """The ``tf.keras.losses.Loss`` used with standard ``compile``/``fit`` for ``loss.kind`` l1/l2."""
    if kind == "l1":
        return tf.keras.losses.MeanAbsoluteError(name="l1")
    if kind == "l2":
        return tf.keras.losses.MeanSquaredError(name="l2")
    raise ValueError(f"unknown pixel loss {kind!r}; expected 'l1' or 'l2'")


# -------------------------------------------------------------------------------------- perceptual
def total_variation_per_example(y):
    """Mean absolute difference between vertical and horizontal neighbours, per pixel and channel."""
    y = tf.cast(y, tf.float32)
    dy = tf.abs(y[:, 1:, :, :] - y[:, :-1, :, :])
    dx = tf.abs(y[:, :, 1:, :] - y[:, :, :-1, :])
    return _mean_per_example(dy) + _mean_per_example(dx)


def _per_example_from_channels(v, n):
    """VGG features are computed per (example, channel) pair: (N*C,) -> (N,) mean over channels."""
    return tf.reduce_mean(tf.reshape(v, [n, -1]), axis=1)


def _relative(a, b):
    """``mean((a - b)**2) / max(mean(a**2), mean(b**2))`` per example (the denominator held constant).

    Relative to the target's (``a``) own energy -- unless the prediction has more: a target with (almost) no
    feature energy (an empty crop in a deep layer) would otherwise divide by ~0 and swamp the batch; this
    way the term stays in [0, 4] (Cauchy-Schwarz), and 0 when both are 0.
    """
    den = tf.maximum(_mean_per_example(tf.square(a)), _mean_per_example(tf.square(b)))
    return tf.math.divide_no_nan(_mean_per_example(tf.square(a - b)), tf.stop_gradient(den))


def content_per_example(feats_true: Sequence, feats_pred: Sequence, n_examples):
    """Relative squared feature difference, averaged over layers -> (N,).

    Per layer: ``mean((f_true - f_pred)**2) / mean(f_true**2)`` over the feature map's elements (the
    prediction's ``mean(f_pred**2)`` when it is larger, see ``_relative``). VGG activations are in arbitrary
    units that differ by orders of magnitude between layers and weights; relative to the target's own
    feature energy, a content of 0.1 means a 10 % feature error whatever the layer, so it is on the scale of
    the pixel loss of normalised intensities and the weights mean what they say.
    """
    terms = [_relative(a, b) for a, b in zip(feats_true, feats_pred)]
    return _per_example_from_channels(tf.add_n(terms) / float(len(terms)), n_examples)


def gram_matrix(f):
    """(B, h, w, k) -> (B, k, k) normalised by h*w*k."""
    s = tf.shape(f)
    flat = tf.reshape(f, [s[0], s[1] * s[2], s[3]])
    norm = tf.cast(s[1] * s[2] * s[3], tf.float32)
    return tf.matmul(flat, flat, transpose_a=True) / norm


def style_per_example(feats_true: Sequence, feats_pred: Sequence, n_examples):
    """Relative squared Gram-matrix difference (as ``content_per_example``), averaged over layers -> (N,)."""
    terms = [_relative(gram_matrix(a), gram_matrix(b)) for a, b in zip(feats_true, feats_pred)]
    return _per_example_from_channels(tf.add_n(terms) / float(len(terms)), n_examples)


class PerceptualLoss:
    """``content * VGG content + pixel * pixel loss + tv * total variation (+ style * Gram)`` per example.

    ``features`` maps normalised images (N, H, W, C) to a list of VGG feature maps
    (``islkeras.models.vgg.VGGFeatures``). ``terms(y_true, y_pred)`` returns a dict of per-example (N,)
    vectors: ``content``, ``pixel``, ``tv`` (``style`` when its weight is > 0) and the weighted ``total``.
    """

    def __init__(self, features, content: float = 0.8, pixel: float = 0.1, tv: float = 0.1,
                 style: float = 0.0, pixel_kind: str = "l1"):
        self.features = features
        self.weights = {"content": float(content), "pixel": float(pixel), "tv": float(tv), "style": float(style)}
        self.pixel_fn = pixel_per_example(pixel_kind)

    def terms(self, y_true, y_pred) -> dict:
        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.cast(y_pred, tf.float32)
        n = tf.shape(y_true)[0]
        f_true = [tf.stop_gradient(f) for f in self.features(y_true)]
        f_pred = self.features(y_pred)
        out = {
            "content": content_per_example(f_true, f_pred, n),
            "pixel": self.pixel_fn(y_true, y_pred),
            "tv": total_variation_per_example(y_pred),
        }
        if self.weights["style"] > 0:
            out["style"] = style_per_example(f_true, f_pred, n)
        out["total"] = tf.add_n([self.weights[k] * v for k, v in out.items()])
        return out

    def __call__(self, y_true, y_pred):
        return self.terms(y_true, y_pred)["total"]


# --------------------------------------------------------------------------------------------- GAN
def _bce_logits_per_example(labels_value: float, logits):
    logits = tf.cast(logits, tf.float32)
    labels = tf.fill(tf.shape(logits), labels_value)
    return _mean_per_example(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def generator_gan_per_example(fake_logits):
    """Non-saturating generator loss: BCE(D(x, G(x)), 1), mean over patches."""
    return _bce_logits_per_example(1.0, fake_logits)


def discriminator_per_example(real_logits, fake_logits):
    """0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)), mean over patches."""
    return 0.5 * (_bce_logits_per_example(1.0, real_logits) + _bce_logits_per_example(0.0, fake_logits))


def pix2pix_generator_per_example(y_true, y_pred, fake_logits, l1_lambda: float = 100.0) -> dict:
    """``g_gan + l1_lambda * g_l1`` per example, with both terms."""
    g_gan = generator_gan_per_example(fake_logits)
    g_l1 = l1_per_example(y_true, y_pred)
    return {"g_gan": g_gan, "g_l1": g_l1, "g_loss": g_gan + float(l1_lambda) * g_l1}


# ------------------------------------------------------------------------------------ segmentation
def jaccard_distance(y_true, y_pred, smooth: float = 1.0):
    """Soft Jaccard distance per example: ``1 - (|y.p| + s) / (|y| + |p| - |y.p| + s)`` -> (N,).

    ``y_true`` in {0, 1}, ``y_pred`` probabilities in [0, 1]; sums run over pixels and channels.
    """
    y = tf.cast(y_true, tf.float32)
    p = tf.cast(y_pred, tf.float32)
    n = tf.shape(y)[0]
    y = tf.reshape(y, [n, -1])
    p = tf.reshape(p, [n, -1])
    inter = tf.reduce_sum(y * p, axis=1)
    union = tf.reduce_sum(y, axis=1) + tf.reduce_sum(p, axis=1) - inter
    return 1.0 - (inter + smooth) / (union + smooth)


class JaccardDistance(tf.keras.losses.Loss):
    """``tf.keras.losses.Loss`` for ``jaccard_distance`` (per example, then the batch mean)."""

    def __init__(self, smooth: float = 1.0, name: str = "jaccard_distance", **kw):
        super().__init__(name=name, **kw)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        return jaccard_distance(y_true, y_pred, self.smooth)

    def get_config(self):
        return dict(super().get_config(), smooth=self.smooth)
