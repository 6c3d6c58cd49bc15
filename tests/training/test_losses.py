"""Losses (islkeras.training.losses) and the TF PCC metric (islkeras.training.metrics)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from islkeras.training import losses as L
from islkeras.training.metrics import PCC, pcc_per_image


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def nuclei_crops(aiseg_dir):
    """Four 64x64 z-scored crops of a real nuclei image, (4, 64, 64, 1)."""
    import tifffile

    img = tifffile.imread(aiseg_dir / "fov_001" / "nuclei.tif").astype(np.float32)
    img = (img - img.mean()) / img.std()
    crops = [img[y:y + 64, x:x + 64] for y, x in ((300, 300), (500, 200), (100, 700), (640, 640))]
    return np.stack(crops)[..., None]


@pytest.fixture(scope="module")
def vgg_random():
    from islkeras.models.vgg import VGGFeatures

    tf.keras.utils.set_random_seed(0)
    return VGGFeatures(["block1_conv2", "block2_conv2", "block3_conv4"], weights=None)


# ---------------------------------------------------------------------------------------------- pixel
def test_pixel_losses_per_example_match_numpy():
    a, b = _rng().normal(size=(2, 3, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(L.l1_per_example(a, b).numpy(), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(L.l2_per_example(a, b).numpy(), ((a - b) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    assert L.pixel_per_example("l1") is L.l1_per_example
    with pytest.raises(ValueError):
        L.pixel_per_example("l3")


def test_total_variation_is_per_pixel():
    const = np.full((1, 16, 16, 1), 3.0, np.float32)
    assert float(L.total_variation_per_example(const)[0]) == 0.0
    stripes = np.zeros((1, 16, 16, 1), np.float32)
    stripes[:, :, 1::2] = 1.0  # every horizontal neighbour differs by 1, vertical ones not at all
    assert float(L.total_variation_per_example(stripes)[0]) == pytest.approx(1.0)
    big = np.zeros((1, 64, 64, 1), np.float32)
    big[:, :, 1::2] = 1.0
    # a per-pixel mean: the same pattern on a larger image has the same TV (the thesis's sum grew with size)
    assert float(L.total_variation_per_example(big)[0]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- perceptual
def test_vgg_mapping_to_rgb_is_documented_affine(vgg_random):
    y = np.array([-1.0, 4.0], np.float32).reshape(1, 1, 2, 1)
    rgb = vgg_random.to_rgb(y).numpy()  # preprocess_input: RGB->BGR minus the ImageNet means
    means = np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(rgb[0, 0, 0], 0.0 - means, atol=1e-3)
    np.testing.assert_allclose(rgb[0, 0, 1], 255.0 - means, atol=1e-3)
    two = np.stack([np.zeros((4, 4)), np.ones((4, 4))], -1)[None].astype(np.float32)
    assert vgg_random.to_rgb(two).shape == (2, 4, 4, 3)  # one grey image per target channel


def test_perceptual_zero_for_identical_and_grows_with_blur(nuclei_crops, vgg_random):
    y = nuclei_crops
    loss = L.PerceptualLoss(vgg_random, content=0.8, pixel=0.1, tv=0.0, style=0.1)
    assert np.abs(loss(y, y).numpy()).max() < 1e-6
    content = []
    for sigma in (1.0, 2.0, 4.0):
        blurred = ndimage.gaussian_filter(y, (0, sigma, sigma, 0)).astype(np.float32)
        t = loss.terms(y, blurred)
        content.append(float(tf.reduce_mean(t["content"])))
        assert set(t) == {"content", "pixel", "tv", "style", "total"}
        assert all(float(tf.reduce_min(t[k])) > 0 for k in ("content", "pixel", "style"))
    assert content[0] < content[1] < content[2]
    # the TV regulariser penalises the prediction's own roughness (not a distance): blur lowers it
    tv_sharp = float(tf.reduce_mean(L.total_variation_per_example(y)))
    tv_blur = float(tf.reduce_mean(L.total_variation_per_example(ndimage.gaussian_filter(y, (0, 2, 2, 0)))))
    assert tv_blur < tv_sharp


def test_perceptual_weights_combine_terms(nuclei_crops, vgg_random):
    y = nuclei_crops
    p = (y + 0.3 * _rng(1).normal(size=y.shape)).astype(np.float32)
    t = L.PerceptualLoss(vgg_random, content=0.8, pixel=0.1, tv=0.1, pixel_kind="l2").terms(y, p)
    expected = 0.8 * t["content"] + 0.1 * t["pixel"] + 0.1 * t["tv"]
    np.testing.assert_allclose(t["total"].numpy(), expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(t["pixel"].numpy(), ((y - p) ** 2).mean(axis=(1, 2, 3)), rtol=1e-4)
    assert "style" not in t and t["total"].shape == (4,)


def _content_np(ft, fp, n):
    """The content term by hand: per layer and (example x channel) image mean((a-b)^2) / max(mean(a^2),
    mean(b^2)) (0 when both are 0), the mean over layers, then over each example's channels."""
    per_layer = []
    for a, b in zip(ft, fp):
        a, b = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (a, b))
        err, den = ((a - b) ** 2).mean(1), np.maximum((a ** 2).mean(1), (b ** 2).mean(1))
        per_layer.append(np.divide(err, den, out=np.zeros_like(err), where=den > 0))
    return np.mean(per_layer, axis=0).reshape(n, -1).mean(1)


def test_content_term_matches_numpy_and_survives_an_empty_target():
    rng = _rng(8)
    # 2 examples x 2 channels = 4 feature "images" per layer, two layers of different sizes and scales
    ft = [rng.normal(size=(4, 8, 8, 3)).astype(np.float32), 50 * rng.random((4, 4, 4, 5)).astype(np.float32)]
    fp = [f + rng.normal(scale=0.5 * f.std(), size=f.shape).astype(np.float32) for f in ft]
    fp[0][1] *= 3.0  # one prediction with more feature energy than its target
    np.testing.assert_allclose(L.content_per_example(ft, fp, 2).numpy(), _content_np(ft, fp, 2), rtol=1e-5)
    # a target without feature energy (an empty crop in a deep layer) used to be divided by 1e-6
    ft[1][0] = 0.0
    got = L.content_per_example(ft, fp, 2).numpy()
    np.testing.assert_allclose(got, _content_np(ft, fp, 2), rtol=1e-5)
    assert got.max() < 4.0  # bounded: mean((a-b)^2) <= 4 max(mean(a^2), mean(b^2))
    both = [np.zeros((2, 4, 4, 1), np.float32)]
    assert L.content_per_example(both, both, 2).numpy().tolist() == [0.0, 0.0]  # nothing to compare: 0, not NaN


def test_perceptual_terms_match_numpy_on_known_features():
    """PerceptualLoss with a known feature map (two fixed convolutions): every term against numpy."""
    rng = _rng(9)
    k1, k2 = rng.normal(size=(3, 3, 1, 2)).astype(np.float32), rng.normal(size=(1, 1, 1, 3)).astype(np.float32)

    def feats(y):  # (N, H, W, C) -> per channel, like VGGFeatures: (N*C, h, w, k)
        g = tf.reshape(tf.transpose(y, [0, 3, 1, 2]), [-1, y.shape[1], y.shape[2], 1])
        return [tf.nn.relu(tf.nn.conv2d(g, k1, 1, "SAME")), tf.nn.conv2d(g[:, ::2, ::2], k2, 1, "SAME")]

    y = rng.normal(size=(2, 16, 16, 2)).astype(np.float32)
    p = (0.7 * y + 0.5 * rng.normal(size=y.shape)).astype(np.float32)
    t = L.PerceptualLoss(feats, content=0.8, pixel=0.1, tv=0.1).terms(y, p)
    f_np = [[f.numpy() for f in feats(tf.constant(v))] for v in (y, p)]
    content = _content_np(f_np[0], f_np[1], 2)
    pixel = np.abs(y - p).mean(axis=(1, 2, 3))
    tv = np.abs(np.diff(p, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(p, axis=2)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(t["content"].numpy(), content, rtol=1e-5)
    np.testing.assert_allclose(t["pixel"].numpy(), pixel, rtol=1e-5)
    np.testing.assert_allclose(t["tv"].numpy(), tv, rtol=1e-5)
    np.testing.assert_allclose(t["total"].numpy(), 0.8 * content + 0.1 * pixel + 0.1 * tv, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GAN
def _bce(z, label):
    return np.maximum(z, 0) - z * label + np.log1p(np.exp(-np.abs(z)))


def test_gan_losses_match_formulas():
    real, fake = _rng(2).normal(size=(2, 3, 6, 6, 1)).astype(np.float32)
    np.testing.assert_allclose(L.generator_gan_per_example(fake).numpy(), _bce(fake, 1).mean(axis=(1, 2, 3)), rtol=1e-5)
    d = 0.5 * (_bce(real, 1) + _bce(fake, 0)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(L.discriminator_per_example(real, fake).numpy(), d, rtol=1e-5)
    y, p = _rng(3).normal(size=(2, 3, 8, 8, 1)).astype(np.float32)
    g = L.pix2pix_generator_per_example(y, p, fake, l1_lambda=100.0)
    np.testing.assert_allclose(g["g_loss"].numpy(), (g["g_gan"] + 100.0 * g["g_l1"]).numpy(), rtol=1e-5)
    # a confident, correct discriminator has a small loss; the non-saturating generator loss is then large
    assert float(L.discriminator_per_example(np.full((1, 4, 4, 1), 8.0), np.full((1, 4, 4, 1), -8.0))[0]) < 1e-3
    assert float(L.generator_gan_per_example(np.full((1, 4, 4, 1), -8.0))[0]) > 7.9


# --------------------------------------------------------------------------------------- segmentation
def test_jaccard_distance():
    m = np.zeros((2, 16, 16, 1), np.float32)
    m[0, :8], m[1, :, :4] = 1, 1
    np.testing.assert_allclose(L.jaccard_distance(m, m).numpy(), [0, 0], atol=1e-6)
    other = np.zeros_like(m)
    other[0, 8:], other[1, :, 12:] = 1, 1
    assert np.all(L.jaccard_distance(m, other, smooth=0.0).numpy() == 1.0)
    half = m.copy()
    half[0, 4:8] = 0  # 64 of 128 pixels: IoU 0.5
    assert float(L.jaccard_distance(m, half, smooth=0.0)[0]) == pytest.approx(0.5)
    loss = L.JaccardDistance(smooth=1.0)
    assert float(loss(m, half)) == pytest.approx(float(tf.reduce_mean(L.jaccard_distance(m, half, 1.0))))
    assert loss.get_config()["smooth"] == 1.0


# ------------------------------------------------------------------------------------------------ PCC
def test_pcc_per_image_matches_numpy():
    a = _rng(4).normal(size=(3, 16, 16, 2)).astype(np.float32)
    b = (0.5 * a + _rng(5).normal(size=a.shape)).astype(np.float32)
    got = pcc_per_image(a, b).numpy()
    for i in range(3):
        for c in range(2):
            assert got[i, c] == pytest.approx(np.corrcoef(a[i, ..., c].ravel(), b[i, ..., c].ravel())[0, 1], abs=1e-5)
    assert pcc_per_image(np.ones((1, 8, 8, 1)), a[:1, :8, :8, :1]).numpy()[0, 0] == 0.0  # constant: 0, not NaN


def test_pcc_metric_accumulates_mean_and_std_over_batches():
    a = _rng(6).normal(size=(5, 16, 16, 1)).astype(np.float32)
    b = (a * np.arange(5).reshape(5, 1, 1, 1) * 0.3 + _rng(7).normal(size=a.shape)).astype(np.float32)
    per = pcc_per_image(a, b).numpy().ravel()
    mean, std = PCC("mean"), PCC("std")
    for s in (slice(0, 2), slice(2, 5)):
        mean.update_state(a[s], b[s])
        std.update_state(a[s], b[s])
    assert float(mean.result()) == pytest.approx(per.mean(), abs=1e-6)
    assert float(std.result()) == pytest.approx(per.std(), abs=1e-6)
    assert mean.name == "pcc" and std.name == "pcc_std"
    mean.reset_state()
    assert float(mean.result()) == 0.0
