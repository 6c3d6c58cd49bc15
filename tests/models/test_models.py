"""Networks: generators (plain U-Net, segmentation-models U-Net), PatchGAN, VGG19 features."""
from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf

from islkeras.config import ModelConfig
from islkeras.errors import UserError, WeightsUnavailableError
from islkeras.models.patchgan import build_patchgan
from islkeras.models.unet import build_generator
from islkeras.models.vgg import VGGFeatures, build_vgg_features


def _offline(monkeypatch):
    """Make every Keras weights download fail the way it does without internet."""
    def fail(fname=None, origin=None, *a, **k):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    import tf_keras.src.applications.vgg19 as vgg19_mod

    monkeypatch.setattr(tf.keras.utils, "get_file", fail)
    monkeypatch.setattr(vgg19_mod.data_utils, "get_file", fail)


def test_plain_unet_shapes_and_float32_output_under_mixed_precision():
    cfg = ModelConfig(architecture="unet", unet_filters=4, unet_depth=2)
    net = build_generator(cfg, n_inputs=3, n_outputs=2)
    assert net.input_shape == (None, None, None, 3)
    assert net(np.zeros((1, 64, 96, 3), np.float32)).shape == (1, 64, 96, 2)
    old = tf.keras.mixed_precision.global_policy()
    try:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
        net16 = build_generator(cfg, 1, 1)
        assert net16(np.zeros((1, 32, 32, 1), np.float32)).dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy(old)


def test_densenet121_unet_random_init():
    """The thesis generator: DenseNet121 U-Net, any number of inputs and outputs, float32 output."""
    tf.keras.utils.set_random_seed(1)
    cfg = ModelConfig(architecture="unet_sm", backbone="densenet121", encoder_weights=None)
    net = build_generator(cfg, n_inputs=1, n_outputs=2)
    out = net(np.zeros((1, 64, 64, 1), np.float32))
    assert out.shape == (1, 64, 64, 2) and out.dtype == tf.float32
    assert "input_adapter" not in [l.name for l in net.layers]  # random init takes the inputs directly
    assert any(l.name.startswith("conv5_block16") for l in net.layers)  # DenseNet121's last dense block


SMALL = [32, 16, 16, 8, 8]  #: a small decoder: the encoder is what these tests are about


def test_local_encoder_file_gets_a_learned_input_adapter(tmp_path, capsys):
    """A weights file (like ImageNet's) is for 3 channels: other inputs go through a learned 1x1 adapter;
    every encoder layer is loaded, and a file whose layer names match nothing is an error, not a random
    encoder."""
    from islkeras.models.unet import encoder_layers

    tf.keras.utils.set_random_seed(1)
    net3 = build_generator(ModelConfig(backbone="resnet18", encoder_weights=None, decoder_filters=SMALL), 3, 1)
    path = tmp_path / "resnet18_unet.h5"
    net3.save_weights(str(path))
    net2 = build_generator(ModelConfig(backbone="resnet18", encoder_weights=str(path), decoder_filters=SMALL), 2, 1)
    assert "input_adapter" in [l.name for l in net2.layers]
    assert net2(np.zeros((1, 64, 64, 2), np.float32)).shape == (1, 64, 64, 1)
    inner = [l for l in net2.layers if isinstance(l, tf.keras.Model)][0]
    enc3, enc2 = encoder_layers(net3), encoder_layers(inner)
    assert [l.name for l in enc2] == [l.name for l in enc3] and len(enc2) == 40 and "final_conv" not in enc2[-1].name
    for a, b in zip(enc3, enc2):  # all of them, not just the first
        for u, v in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(u, v)
    assert "warning" not in capsys.readouterr().err
    other = tmp_path / "plain_unet.h5"  # a user's own file of another network: no layer name matches
    build_generator(ModelConfig(architecture="unet", unet_filters=4, unet_depth=2), 3, 1).save_weights(str(other))
    with pytest.raises(UserError, match=rf"model.encoder_weights: {other} holds no weights for the resnet18 encoder "
                                        rf"\(matched by layer name: 0 of the {len(enc3)} resnet18 encoder layers"):
        build_generator(ModelConfig(backbone="resnet18", encoder_weights=str(other), decoder_filters=SMALL), 2, 1)
    partial = tmp_path / "partial.h5"  # a file that holds only some encoder layers: loaded, loudly
    sub = tf.keras.Model(net3.input, net3.get_layer(enc3[9].name).output)
    sub.save_weights(str(partial))
    n_sub = len([l for l in sub.layers if l.weights])
    build_generator(ModelConfig(backbone="resnet18", encoder_weights=str(partial), decoder_filters=SMALL), 2, 1)
    err = capsys.readouterr().err
    assert 0 < n_sub < len(enc3)
    assert f"warning: model.encoder_weights: {partial} set only {n_sub} of the {len(enc3)}" in err


def test_encoder_freeze_trains_the_decoder_only():
    """encoder_freeze: the encoder's convolutions stay as they are (segmentation-models keeps its BatchNorm
    layers trainable), the decoder learns."""
    from islkeras.models.unet import encoder_layers

    tf.keras.utils.set_random_seed(2)
    net = build_generator(ModelConfig(backbone="resnet18", encoder_freeze=True, decoder_filters=SMALL), 1, 1)
    enc = [l for l in encoder_layers(net) if not isinstance(l, tf.keras.layers.BatchNormalization)]
    assert enc and all(not l.trainable for l in enc)
    dec = net.get_layer("final_conv")
    before = [l.get_weights()[0].copy() for l in enc] + [dec.get_weights()[0].copy()]
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)
    with tf.GradientTape() as tape:  # one eager training step (what fit does, without tracing)
        loss = tf.reduce_mean(tf.abs(net(x, training=True) - x))
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(tape.gradient(loss, net.trainable_variables),
                                                     net.trainable_variables))
    assert all(np.array_equal(b, l.get_weights()[0]) for b, l in zip(before, enc))
    assert not np.array_equal(before[-1], dec.get_weights()[0])


def test_unknown_backbone_and_missing_weights_file():
    with pytest.raises(UserError, match="did you mean 'resnet101'"):
        build_generator(ModelConfig(backbone="resnet1O1"), 1, 1)
    with pytest.raises(UserError, match="no weights file"):
        build_generator(ModelConfig(backbone="resnet18", encoder_weights="/nonexistent/w.h5"), 1, 1)


def test_imagenet_offline_is_one_clear_line(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as e:
        build_generator(ModelConfig(backbone="resnet18", encoder_weights="imagenet"), 1, 1)
    msg = str(e.value.message)
    assert "ImageNet weights" in msg and "encoder_weights: null or a local file" in msg and "\n" not in msg
    with pytest.raises(WeightsUnavailableError) as e:
        build_vgg_features(weights="imagenet")
    assert "loss.vgg_weights: null or a local file" in e.value.message and "\n" not in e.value.message


def test_patchgan_is_conditioned_and_outputs_logits():
    d = build_patchgan(n_inputs=3, n_outputs=2, filters=8)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(2, 64, 64, 2)).astype(np.float32)
    out = d([x, y], training=False)
    assert out.shape == (2, 6, 6, 1) and out.dtype == tf.float32  # 70x70 patches: H/8 - 2
    assert not np.allclose(out.numpy(), d([x * 0, y], training=False).numpy())  # depends on the input image
    assert d.layers[-1].activation.__name__ == "linear"


def test_vgg_features_frozen_and_layer_errors(tmp_path):
    f = VGGFeatures(["block1_conv2", "block2_conv2"], weights=None)
    assert not f.model.trainable and not f.model.trainable_weights
    out = f(np.zeros((2, 64, 64, 3), np.float32))  # 3 target channels -> 6 grey images
    assert [o.shape for o in out] == [(6, 64, 64, 64), (6, 32, 32, 128)]
    with pytest.raises(UserError, match="did you mean 'block3_conv4'"):
        build_vgg_features(["block3_conv5"], weights=None)
    with pytest.raises(UserError, match="no weights file"):
        build_vgg_features(weights=str(tmp_path / "missing.h5"))
