"""Robustness augmentation of training crops (``pipeline.augment``, islkeras.config.AugmentConfig), in tf.data.

A model trained on one microscope's fields meets another day's focus, lamp and camera, and often another
objective: the transforms here imitate that, on training crops only, each with its probability and range,
drawn from stateless seeds (one key per crop: reproducible under ``pipeline.seed``).

- ``zoom_window``: the source window of a zoomed crop (factor f > 1 magnifies: a ``crop/f`` window resampled to the
  crop size, anti-aliased; f < 1 a larger window shrunk) -- input and target resampled identically, crop size kept.
- ``jitter_inputs``: on the normalised input crop, in this order (the order light takes): defocus blur, contrast
  (around the crop's mean), brightness (an offset), gamma (on the crop scaled to [0, 1]), Gaussian or Poisson noise.
  The target is never touched by them.
"""
from __future__ import annotations

import math

RANGE_KEYS = ("zoom", "brightness", "contrast", "gamma", "blur", "noise")


def crop_keys(tf, base, k: int):
    """``k`` stateless seed keys ``(k, 2)`` int64 derived from a crop batch's base seed."""
    return tf.random.stateless_uniform([k, 2], base + [0, 3 << 40], minval=0, maxval=1 << 62, dtype=tf.int64)


def _u(tf, key, i: int, shape=()):
    return tf.random.stateless_uniform(list(shape), key + tf.constant([0, 1], tf.int64) * (1000 + i))


def _in_range(tf, key, i: int, lo: float, hi: float, log: bool = False):
    u = _u(tf, key, i)
    if log:
        return tf.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)


def zoom_window(tf, key, zoom, cs: int, height, width):
    """``(size, y0, x0)`` of the source window of one crop: ``size = round(cs / f)`` clipped to the field, ``f``
    log-uniform in ``zoom.range`` with probability ``zoom.p`` (else 1: the plain crop)."""
    lo, hi = zoom.range
    f = tf.where(_u(tf, key, 0) < zoom.p, _in_range(tf, key, 1, lo, hi, log=True), 1.0)
    size = tf.cast(tf.round(cs / f), tf.int32)
    size = tf.clip_by_value(size, 1, tf.minimum(height, width))
    y0 = tf.cast(tf.floor(_u(tf, key, 2) * tf.cast(height - size + 1, tf.float32)), tf.int32)
    x0 = tf.cast(tf.floor(_u(tf, key, 3) * tf.cast(width - size + 1, tf.float32)), tf.int32)
    return size, y0, x0


def resample_window(tf, a, size, y0, x0, cs: int, nearest: bool):
    """The window ``a[y0:y0+size, x0:x0+size]`` (H, W, C) resampled to (cs, cs, C) float32: bilinear with
    anti-aliasing (images), nearest neighbour (label/mask channels); a window of the crop size is only cut."""
    win = tf.cast(a[y0:y0 + size, x0:x0 + size], tf.float32)

    def resized():
        if nearest:
            return tf.image.resize(win, [cs, cs], method="nearest")
        return tf.image.resize(win, [cs, cs], method="bilinear", antialias=True)

    out = tf.cond(tf.equal(size, cs), lambda: win, resized)
    out.set_shape([cs, cs, a.shape[-1]])
    return out


def _blur(tf, x, sigma, max_sigma: float):
    r = int(math.ceil(3 * max_sigma))
    d = tf.range(-r, r + 1, dtype=tf.float32)
    g = tf.exp(-0.5 * tf.square(d / sigma))
    g = g / tf.reduce_sum(g)
    c = x.shape[-1]
    xp = tf.pad(x[None], [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    ky = tf.tile(tf.reshape(g, [-1, 1, 1, 1]), [1, 1, c, 1])
    kx = tf.tile(tf.reshape(g, [1, -1, 1, 1]), [1, 1, c, 1])
    xp = tf.nn.depthwise_conv2d(xp, ky, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(xp, kx, [1, 1, 1, 1], "VALID")[0]


def jitter_inputs(tf, x, key, aug):
    """Blur, contrast, brightness, gamma and noise of one normalised input crop (H, W, C) float32, each applied
    with its probability; transforms with ``p == 0`` add nothing to the graph."""
    axes = [0, 1]

    def maybe(i, t, fn):
        nonlocal x
        if t.p > 0:
            x = tf.cond(_u(tf, key, i) < t.p, fn, lambda: x)

    if aug.blur.p > 0 and aug.blur.range[1] > 0:
        lo, hi = aug.blur.range
        sigma = tf.maximum(_in_range(tf, key, 11, lo, hi), 1e-3)
        maybe(10, aug.blur, lambda: _blur(tf, x, sigma, hi))
    if aug.contrast.p > 0:
        c = _in_range(tf, key, 21, *aug.contrast.range, log=True)
        maybe(20, aug.contrast, lambda: tf.reduce_mean(x, axes, keepdims=True)
              + (x - tf.reduce_mean(x, axes, keepdims=True)) * c)
    if aug.brightness.p > 0:
        b = _in_range(tf, key, 31, *aug.brightness.range)
        maybe(30, aug.brightness, lambda: x + b)
    if aug.gamma.p > 0:
        g = _in_range(tf, key, 41, *aug.gamma.range, log=True)

        def gamma():
            lo, hi = tf.reduce_min(x, axes, keepdims=True), tf.reduce_max(x, axes, keepdims=True)
            span = tf.maximum(hi - lo, 1e-6)
            return lo + tf.pow((x - lo) / span, g) * span

        maybe(40, aug.gamma, gamma)
    if aug.noise.p > 0:
        r = _in_range(tf, key, 51, *aug.noise.range)
        sd = tf.math.reduce_std(x, axes, keepdims=True)

        def gaussian():
            return x + r * sd * tf.random.stateless_normal(tf.shape(x), key + [0, 52])

        def poisson():  # shot noise whose std at the crop's mean brightness is r * std
            lo = tf.reduce_min(x, axes, keepdims=True)
            z = (x - lo) / tf.maximum(sd, 1e-6)  # >= 0, in units of the crop's std
            mean_z = tf.maximum(tf.reduce_mean(z, axes, keepdims=True), 1e-3)
            photons = mean_z / tf.maximum(r, 1e-3) ** 2  # photons per unit of z: relative noise r at the mean
            counts = tf.random.stateless_poisson(tf.shape(x), key + [0, 53], z * photons, dtype=tf.float32)
            return lo + counts / photons * sd

        noisy = (lambda: tf.cond(_u(tf, key, 54) < aug.noise.poisson, poisson, gaussian)) \
            if aug.noise.poisson > 0 else gaussian
        maybe(50, aug.noise, noisy)
    return x
