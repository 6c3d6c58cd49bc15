"""islkeras.evaluation.metrics against numpy/scipy/scikit-image reference values on real image pairs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from islkeras.evaluation import metrics as M


@pytest.fixture(scope="module")
def pair(aiseg_dir):
    """Real pair: nuclear fluorescence of fov_001 and a plausible 'prediction' (blurred, rescaled, noisy)."""
    import tifffile
    from scipy import ndimage

    true = tifffile.imread(aiseg_dir / "fov_001" / "nuclei.tif")[:512, :512]  # uint8
    rng = np.random.default_rng(0)
    pred = ndimage.gaussian_filter(true.astype(np.float32), 2.0) * 0.8 + 5 + rng.normal(0, 3, true.shape)
    return pred.astype(np.float32), true


def test_pcc_matches_numpy_and_scipy(pair):
    from scipy import stats

    pred, true = pair
    ref_np = np.corrcoef(pred.ravel().astype(np.float64), true.ravel().astype(np.float64))[0, 1]
    ref_sp = stats.pearsonr(pred.ravel(), true.ravel().astype(np.float64))[0]
    got = M.pcc(pred, true)
    assert got == pytest.approx(ref_np, abs=1e-9)
    assert got == pytest.approx(ref_sp, abs=1e-6)
    assert 0.5 < got < 1.0
    # invariance to positive affine maps (so PCC on the z-scored scale equals PCC on the original scale)
    assert M.pcc(pred * 3.0 - 7.0, (true - 10.0) / 5.0) == pytest.approx(got, abs=1e-9)


def test_perfect_and_constant_predictions(pair):
    _, true = pair
    assert M.pcc(true, true) == pytest.approx(1.0, abs=1e-12)
    assert M.pcc(true.astype(np.float32) * 2 + 1, true) == pytest.approx(1.0, abs=1e-9)
    assert M.pcc(-true.astype(np.float32), true) == pytest.approx(-1.0, abs=1e-9)
    const = np.full(true.shape, 17.0, np.float32)
    assert M.pcc(const, true) == 0.0  # documented: constant image -> 0, never NaN
    assert M.pcc(true, np.zeros_like(true)) == 0.0
    assert M.pcc(const, const) == 0.0
    # the other metrics stay finite or are documented infinities
    assert np.isfinite(M.ssim(const, true))
    assert M.psnr(true.astype(np.float32), true) == np.inf
    assert M.nrmse(true, true) == 0.0
    assert M.nrmse(const, np.zeros_like(const)) == np.inf


def test_diverged_prediction_is_nan_not_zero(pair):
    """A NaN or infinite pixel (a diverged model) gives NaN, so it cannot pass for an uncorrelated one (0)."""
    pred, true = pair
    for bad in (np.nan, np.inf, -np.inf):
        p = pred.copy()
        p[10, 20] = bad
        assert np.isnan(M.pcc(p, true)) and np.isnan(M.pcc(true.astype(np.float32), p))
    assert np.isnan(M.pcc(np.full(true.shape, np.nan, np.float32), true))
    assert np.isnan(M.pcc_channels(np.stack([pred, np.full_like(pred, np.nan)], -1),
                                   np.stack([true, true], -1))).tolist() == [False, True]
    s = M.summary_stats([0.5, np.nan, 0.7])  # NaN is left out of the mean and counted
    assert s["mean"] == pytest.approx(0.6) and (s["n"], s["n_finite"]) == (3, 2)


def test_ssim_psnr_nrmse_match_scikit_image(pair):
    from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

    pred, true = pair
    t64, p64 = true.astype(np.float64), pred.astype(np.float64)
    assert M.default_data_range(true) == 255.0
    assert M.ssim(pred, true) == pytest.approx(structural_similarity(t64, p64, data_range=255.0), abs=1e-12)
    assert M.psnr(pred, true) == pytest.approx(peak_signal_noise_ratio(t64, p64, data_range=255.0), abs=1e-9)
    # PSNR by hand: 10 log10(R^2 / MSE)
    mse = np.mean((t64 - p64) ** 2)
    assert M.psnr(pred, true) == pytest.approx(10 * np.log10(255.0 ** 2 / mse), abs=1e-9)
    assert M.nrmse(pred, true) == pytest.approx(normalized_root_mse(t64, p64), abs=1e-12)
    assert M.nrmse(pred, true) == pytest.approx(np.sqrt(mse) / np.sqrt(np.mean(t64 ** 2)), abs=1e-12)
    # float targets use their own dynamic range
    tz = (t64 - t64.mean()) / t64.std()
    assert M.default_data_range(tz) == pytest.approx(tz.max() - tz.min())
    assert M.default_data_range(np.zeros((4, 4), np.float32)) == 1.0
    assert M.default_data_range(np.zeros((4, 4), np.uint16)) == 65535.0
    # image_metrics bundles them, with an optional suffix
    m = M.image_metrics(pred, true, suffix="_z")
    assert set(m) == {"pcc_z", "ssim_z", "psnr_z", "nrmse_z"}


def test_pcc_channels_and_errors(pair):
    pred, true = pair
    p = np.stack([pred, pred[::-1]], -1)
    t = np.stack([true, true[::-1]], -1)
    np.testing.assert_allclose(M.pcc_channels(p, t), [M.pcc(pred, true)] * 2, atol=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        M.pcc(pred, true[:10])
    with pytest.raises(ValueError, match="2-D"):
        M.ssim(p, t)


def test_is_empty_and_summaries():
    t = np.zeros((100, 100), np.uint8)
    t[:2, :10] = 200  # 20 of 10000 pixels = 0.2% above threshold
    assert M.is_empty(t, threshold=100, empty_fraction=0.005)
    assert not M.is_empty(t, threshold=100, empty_fraction=0.001)
    df = pd.DataFrame({
        "image": ["a", "b", "c", "a", "b", "c"],
        "channel": ["n", "n", "n", "m", "m", "m"],
        "pcc": [0.9, 0.8, 0.1, 0.5, 0.5, 0.5],
        "psnr": [30.0, np.inf, 20.0, 10, 10, 10],
        "empty": [False, False, True, False, False, False],
    })
    s = M.summarize(df)
    assert s["n"]["pcc"]["all"]["mean"] == pytest.approx(0.6)
    assert s["n"]["pcc"]["all"]["std"] == pytest.approx(np.std([0.9, 0.8, 0.1]))
    assert s["n"]["pcc"]["all"]["median"] == pytest.approx(0.8)
    assert s["n"]["pcc"]["non_empty"]["mean"] == pytest.approx(0.85)
    assert s["n"]["pcc"]["empty"]["n"] == 1
    assert s["m"]["pcc"]["empty"] == {"mean": None, "std": None, "median": None, "n": 0, "n_finite": 0}
    assert s["n"]["psnr"]["all"]["n_finite"] == 2 and s["n"]["psnr"]["all"]["mean"] == pytest.approx(25.0)
    assert s["_overall"]["pcc"]["all"]["n"] == 6


def test_noise_ceiling_of_white_noise_and_of_a_smooth_image():
    """White noise n: PCC(G_sigma * n, n) = w0 / ||w||_2 = 1 / (sigma sqrt(pi)) for a 2-D Gaussian kernel
    (0.282 at sigma 2, 0.564 at sigma 1); a smooth image is its own smoothed copy (ceiling ~1); a constant
    target has no ceiling (NaN)."""
    from islkeras.evaluation.metrics import noise_ceiling

    noise = np.random.default_rng(0).standard_normal((512, 512))
    for sigma in (1.0, 2.0):
        assert noise_ceiling(noise, sigma) == pytest.approx(1 / (sigma * np.sqrt(np.pi)), abs=0.01)
    yy, xx = np.mgrid[:256, :256]
    smooth = np.sin(yy / 20.0) + np.cos(xx / 25.0)
    assert noise_ceiling(smooth, 2.0) > 0.999
    noisy = smooth + 0.5 * np.random.default_rng(1).standard_normal(smooth.shape)
    assert 0.5 < noise_ceiling(noisy, 2.0) < noise_ceiling(smooth, 2.0)
    assert np.isnan(noise_ceiling(np.full((64, 64), 3.0)))
