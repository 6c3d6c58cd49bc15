"""PatchGAN discriminator conditioned on the input image (pix2pix, Isola et al. 2017).

The discriminator sees the transmitted-light input and a fluorescence image (real or generated)
concatenated along channels, and outputs one *logit* per overlapping patch (70x70 receptive field
with the default 3 strided layers). Losses use ``from_logits=True`` (see ``islkeras.training.losses``).
"""
from __future__ import annotations


def build_patchgan(n_inputs: int, n_outputs: int, filters: int = 64, n_layers: int = 3, name: str = "patchgan"):
    """``Model([x, y]) -> logits (N, H/2**n_layers - 2, W/2**n_layers - 2, 1)``, float32 output.

    Layout as in pix2pix: C64-C128-C256 (stride 2) then C512 (stride 1) and a 1-channel conv;
    no normalisation on the first layer, batch normalisation after the others, LeakyReLU(0.2).
    """
    import tensorflow as tf

    L = tf.keras.layers
    def init():
        return tf.keras.initializers.RandomNormal(0.0, 0.02)

    x_in = tf.keras.Input((None, None, n_inputs), name="input_image")
    y_in = tf.keras.Input((None, None, n_outputs), name="target_image")
    x = L.Concatenate(name="concat")([x_in, y_in])
    for i in range(n_layers):
        f = filters * min(2 ** i, 8)
        x = L.Conv2D(f, 4, strides=2, padding="same", use_bias=i == 0, kernel_initializer=init(), name=f"down{i}")(x)
        if i > 0:
            x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.LeakyReLU(0.2, name=f"lrelu{i}")(x)
    x = L.ZeroPadding2D(name="pad0")(x)
    x = L.Conv2D(filters * min(2 ** n_layers, 8), 4, use_bias=False, kernel_initializer=init(), name="conv")(x)
    x = L.BatchNormalization(name="bn_last")(x)
    x = L.LeakyReLU(0.2, name="lrelu_last")(x)
    x = L.ZeroPadding2D(name="pad1")(x)
    x = L.Conv2D(1, 4, kernel_initializer=init(), name="logits_conv")(x)
    out = L.Activation("linear", dtype="float32", name="logits")(x)
    return tf.keras.Model([x_in, y_in], out, name=name)
