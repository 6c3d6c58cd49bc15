"""Frozen VGG19 feature extractor for the perceptual loss.

VGG19 was trained on natural RGB images in [0, 255] with ImageNet (caffe) preprocessing. Fluorescence
predictions and targets are normalised intensities with one or more channels, so each channel is
mapped to an RGB image before the network:

1. ``rgb = 255 * (y - low) / (high - low)`` -- an affine map, *not clipped* (gradients flow everywhere).
   ``(low, high)`` depends on the run's normalisation: for ``zscore``/``dataset`` it is ``(-1, 4)``
   (background just below the mean maps near 0, nuclei 4 standard deviations above the mean map to 255);
   for ``minmax``/``percentile`` (already about [0, 1]) it is ``(0, 1)``.
2. The channel is repeated to 3 channels (grey image).
3. ``tf.keras.applications.vgg19.preprocess_input`` (RGB->BGR, minus the ImageNet channel means) --
   the step the thesis code skipped.

Each target channel goes through VGG19 separately (batch axis), so a two-channel target (Cy3 + GFP)
gives features per channel, compared channel by channel.

The network is frozen (``trainable = False``) and always called with ``training=False``.
Weights: ``"imagenet"`` (downloaded by Keras; offline this raises ``WeightsUnavailableError``),
``None`` (random -- only meaningful for tests and CPU smoke configs) or a local ``.h5`` file.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from islkeras.errors import UserError, WeightsUnavailableError

DEFAULT_LAYERS = ("block2_conv2", "block3_conv4", "block4_conv4")
VGG_RANGES = {"zscore": (-1.0, 4.0), "dataset": (-1.0, 4.0), "minmax": (0.0, 1.0), "percentile": (0.0, 1.0)}


def vgg_input_range(normalization: str) -> tuple[float, float]:
    """(low, high) of normalised intensities mapped to VGG's 0 and 255 (see module doc)."""
    return VGG_RANGES.get(normalization, (-1.0, 4.0))


def _vgg19(weights: Optional[str]):
    import tensorflow as tf

    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise UserError(f"loss.vgg_weights: no weights file at {weights} (use \"imagenet\", null or a file)")
    try:
        return tf.keras.applications.VGG19(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if weights == "imagenet" and ("fetch" in text.lower() or isinstance(e, (OSError, ConnectionError))):
            raise WeightsUnavailableError(
                "ImageNet weights for VGG19 (perceptual loss) could not be downloaded; "
                "use loss.vgg_weights: null or a local file"
            ) from None
        if weights not in (None, "imagenet"):
            raise UserError(f"loss.vgg_weights: could not load {weights} as VGG19 (notop) weights: {e}") from None
        raise


def build_vgg_features(layers: Sequence[str] = DEFAULT_LAYERS, weights: Optional[str] = "imagenet"):
    """Frozen ``Model(rgb_preprocessed) -> [features per layer]`` (float32 outputs)."""
    import tensorflow as tf

    layers = list(layers)
    if not layers:
        raise UserError("loss.vgg_layers must name at least one VGG19 layer")
    vgg = _vgg19(weights)
    names = [l.name for l in vgg.layers]
    for name in layers:
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"loss.vgg_layers: {name!r} is not a VGG19 layer{hint}; e.g. block3_conv4")
    vgg.trainable = False
    outs = [tf.cast(vgg.get_layer(n).output, tf.float32) for n in layers]
    model = tf.keras.Model(vgg.input, outs, name="vgg19_features")
    model.trainable = False
    return model


class VGGFeatures:
    """Maps normalised fluorescence ``(N, H, W, C)`` to VGG19 features ``[(N*C, h, w, k) per layer]``."""

    def __init__(self, layers: Sequence[str] = DEFAULT_LAYERS, weights: Optional[str] = "imagenet",
                 normalization: str = "zscore"):
        self.layers = list(layers)
        self.model = build_vgg_features(self.layers, weights)
        self.low, self.high = vgg_input_range(normalization)

    def to_rgb(self, y):
        """Normalised intensities -> preprocessed VGG input, one grey image per channel (module doc)."""
        import tensorflow as tf

        y = tf.cast(y, tf.float32)
        shape = tf.shape(y)
        # (N, H, W, C) -> (N*C, H, W, 1): every target channel is its own grey image
        y = tf.reshape(tf.transpose(y, [0, 3, 1, 2]), [shape[0] * shape[3], shape[1], shape[2], 1])
        rgb = 255.0 * (y - self.low) / (self.high - self.low)
        rgb = tf.repeat(rgb, 3, axis=-1)
        return tf.keras.applications.vgg19.preprocess_input(rgb)

    def __call__(self, y):
        out = self.model(self.to_rgb(y), training=False)
        return out if isinstance(out, (list, tuple)) else [out]
