"""Generators: segmentation-models U-Net ("U-Net on steroids") and the thesis's plain U-Net baseline.

Both take ``(None, None, n_inputs)`` images (height and width multiples of ``MULTIPLE``) and output
``n_outputs`` channels with the given activation (linear for ISL, sigmoid for segmentation).

ImageNet encoders expect 3 channels. With ``encoder_weights="imagenet"`` (or a weights file) and
``n_inputs != 3``, a learned 1x1 convolution (``input_adapter``) maps the inputs to 3 channels in front of
the pretrained encoder, so the pretrained first layer is kept intact. With random initialisation the
encoder takes ``n_inputs`` channels directly.
"""
from __future__ import annotations

import os
from typing import Optional

from islkeras.errors import UserError, WeightsUnavailableError

MULTIPLE = 32  #: height and width must be multiples of this (5 poolings)


def _sm_unet(tf, backbone: str, n_inputs: int, n_outputs: int, activation: str,
             encoder_weights: Optional[str], encoder_freeze: bool, decoder_filters):
    import segmentation_models as sm

    if backbone not in sm.Backbones.models_names():
        import difflib

        close = difflib.get_close_matches(backbone, sm.Backbones.models_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"model.backbone {backbone!r} is not a segmentation-models backbone{hint}")
    pretrained = encoder_weights is not None
    sm_weights = None
    if encoder_weights == "imagenet":
        sm_weights = "imagenet"
    elif pretrained and not os.path.isfile(encoder_weights):
        raise UserError(f"model.encoder_weights: no weights file at {encoder_weights}")
    enc_channels = 3 if pretrained else n_inputs
    try:
        net = sm.Unet(
            backbone, encoder_weights=sm_weights, input_shape=(None, None, enc_channels), classes=n_outputs,
            activation=activation, encoder_freeze=encoder_freeze, decoder_filters=tuple(decoder_filters),
        )
    except Exception as e:  # keras' get_file: URLError/HTTPError/"URL fetch failure"
        if sm_weights == "imagenet" and _is_download_error(e):
            raise WeightsUnavailableError(
                f"ImageNet weights for {backbone} could not be downloaded; use encoder_weights: null or a local file"
            ) from None
        raise
    if pretrained and sm_weights is None:
        _load_encoder_file(net, encoder_weights, backbone)
    mixed = tf.keras.mixed_precision.global_policy().compute_dtype != "float32"
    if enc_channels == n_inputs and not mixed:
        return net
    inp = tf.keras.Input((None, None, n_inputs), name="image")
    x = tf.keras.layers.Conv2D(3, 1, name="input_adapter")(inp) if enc_channels != n_inputs else inp
    y = net(x)
    if mixed:  # segmentation-models' last activation follows the policy: outputs stay float32
        y = tf.keras.layers.Activation("linear", dtype="float32", name="output_float32")(y)
    return tf.keras.Model(inp, y, name=f"unet_{backbone}")


#: layer-name prefixes of segmentation-models' U-Net decoder (everything else with weights is the encoder)
DECODER_PREFIXES = ("decoder_", "center_block", "final_conv")


def encoder_layers(net) -> list:
    """The encoder's (backbone's) layers with weights of a segmentation-models U-Net."""
    return [lay for lay in net.layers if lay.weights and not lay.name.startswith(DECODER_PREFIXES)]


def _h5_weight_shapes(path: str) -> dict:
    """``{layer name: [weight shapes]}`` of a Keras .h5 weights (or whole-model) file."""
    import h5py

    def txt(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        return {txt(n): [tuple(g[txt(n)][txt(w)].shape) for w in g[txt(n)].attrs.get("weight_names", [])]
                for n in g.attrs.get("layer_names", [])}


def _load_encoder_file(net, path: str, backbone: str) -> int:
    """Load a local weights file (Keras' ImageNet notop .h5 for the backbone, or a full U-Net's weights) by
    layer name; returns the number of encoder layers it holds (same name, same weight shapes: what Keras
    loads). None is an error, some a loud warning: a file of another network would otherwise leave the
    encoder random without a word."""
    enc = encoder_layers(net)
    try:
        net.load_weights(path, by_name=True, skip_mismatch=True)
        shapes = _h5_weight_shapes(path)
    except Exception as e:
        raise UserError(f"model.encoder_weights: could not read {path} as weights for {backbone}: {e}") from None
    loaded = sum(shapes.get(lay.name) == [tuple(w.shape) for w in lay.weights] for lay in enc)
    what = f"{loaded} of the {len(enc)} {backbone} encoder layers with weights"
    if loaded == 0:
        raise UserError(f"model.encoder_weights: {path} holds no weights for the {backbone} encoder (matched by "
                        f"layer name: {what}); use Keras' ImageNet 'notop' .h5 of {backbone} or a U-Net's weights")
    if loaded < len(enc):
        import click

        click.echo(f"islkeras: warning: model.encoder_weights: {path} set only {what}; the other "
                   f"{len(enc) - loaded} keep their random initialisation", err=True)
    return loaded


def _is_download_error(e: Exception) -> bool:
    import urllib.error

    text = f"{type(e).__name__}: {e}"
    return isinstance(e, (urllib.error.URLError, OSError, ConnectionError)) or "URL fetch failure" in text or \
        "fetch" in text.lower()


def plain_unet(tf, n_inputs: int, n_outputs: int, activation: str, filters: int = 32, depth: int = 4):
    """The thesis's baseline U-Net: conv-BN-ReLU x2 per level, max-pool down, transposed conv up."""
    L = tf.keras.layers

    def block(x, f, name):
        for i in range(2):
            x = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = L.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = L.Activation("relu", name=f"{name}_relu{i}")(x)
        return x

    inp = tf.keras.Input((None, None, n_inputs), name="image")
    x, skips = inp, []
    for d in range(depth):
        x = block(x, filters * 2 ** d, f"down{d}")
        skips.append(x)
        x = L.MaxPool2D(name=f"pool{d}")(x)
    x = block(x, filters * 2 ** depth, "bottom")
    for d in reversed(range(depth)):
        x = L.Conv2DTranspose(filters * 2 ** d, 2, strides=2, padding="same", name=f"up{d}")(x)
        x = L.Concatenate(name=f"cat{d}")([x, skips[d]])
        x = block(x, filters * 2 ** d, f"dec{d}")
    x = L.Conv2D(n_outputs, 1, name="final_conv")(x)
    out = L.Activation(activation, dtype="float32", name=activation)(x)
    return tf.keras.Model(inp, out, name="unet_plain")


def build_generator(model_cfg, n_inputs: int, n_outputs: int, activation: str = "linear"):
    """Build the generator the config asks for (see module doc)."""
    import tensorflow as tf

    if model_cfg.architecture == "unet":
        return plain_unet(tf, n_inputs, n_outputs, activation, model_cfg.unet_filters, model_cfg.unet_depth)
    if model_cfg.architecture == "unet_sm":
        return _sm_unet(tf, model_cfg.backbone, n_inputs, n_outputs, activation, model_cfg.encoder_weights,
                        model_cfg.encoder_freeze, model_cfg.decoder_filters)
    raise UserError(f"model.architecture {model_cfg.architecture!r}: expected 'unet_sm' or 'unet'")
