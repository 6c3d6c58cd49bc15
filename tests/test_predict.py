"""Tiled whole-field prediction (islkeras.predict) against one-pass prediction of the same SavedModel."""
from __future__ import annotations

import numpy as np
import pytest

from islkeras.errors import DataError, UserError

META = {
    "kind": "isl", "inputs": ["brightfield"], "targets": ["nuclei"], "input_dtype": "uint8",
    "normalization": {"method": "zscore", "percentiles": [1.0, 99.8]},
    "target_scale": {"offset": [20.0], "scale": [30.0]},
}


def export_tiny(out_dir, n_in=1, n_out=1, meta=None, seed=0):
    """A plain U-Net (8 filters, depth 3, random init) exported as an islkeras SavedModel."""
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.export.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(seed)
    model = build_generator(ModelConfig(architecture="unet", unet_filters=8, unet_depth=3), n_in, n_out)
    return export_savedmodel(model, out_dir, meta or META)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from islkeras.export.savedmodel import ExportedModel

    return ExportedModel(export_tiny(tmp_path_factory.mktemp("tiny") / "savedmodel"))


@pytest.fixture(scope="session")
def aiseg_field(aiseg_dir):
    import tifffile

    return tifffile.imread(aiseg_dir / "fov_002" / "brightfield.tif")  # (1024, 1024) uint8


# ------------------------------------------------------------------------------------------ tiling
def test_blend_window_never_zero_and_partition_of_unity():
    from islkeras.predict import blend_window, tile_plan

    w = blend_window(256, 64, True, True)
    assert w.min() > 0 and w.max() == 1.0 and w[64:192].min() == 1.0
    # two neighbours overlapping by exactly the ramp sum to one
    assert np.allclose(w[-64:] + w[:64], 1.0, atol=1e-6)
    rows, cols = tile_plan(1000, 777, 256, 64)
    assert rows.size == 1024 and cols.size == 800
    assert all(s % 32 == 0 for s in rows.starts + cols.starts)
    assert rows.starts[-1] + rows.tile == rows.size and cols.starts[-1] + cols.tile == cols.size
    assert rows.wsum.min() > 0.5 and cols.wsum.min() > 0.5


def test_tiled_matches_one_pass_on_real_field(tiny_model, aiseg_field):
    """256-pixel tiles with 64 overlap vs the serving graph on the whole 1024^2 field.

    BatchNorm runs in inference mode, so tiles differ from one pass only through the missing context
    near tile borders, which the blending window down-weights. Tolerance (measured ~1.3% max, PCC
    0.9999999): max |diff| <= 5% of the prediction's std, mean |diff| <= 0.1%.
    """
    from islkeras.predict import predict_field

    one = tiny_model.predict_raw(aiseg_field[None, ..., None])[0]
    tiled = predict_field(tiny_model, aiseg_field, tile=256, overlap=64, batch=4)
    assert tiled.shape == one.shape == (1024, 1024, 1) and tiled.dtype == np.float32
    diff = np.abs(tiled - one)
    sd = float(one.std())
    assert diff.max() <= 0.05 * sd, (diff.max(), sd)
    assert diff.mean() <= 0.001 * sd, (diff.mean(), sd)
    # a single tile covering the field is the one-pass prediction
    whole = predict_field(tiny_model, aiseg_field, tile=1024, overlap=0)
    np.testing.assert_allclose(whole, one, rtol=0, atol=1e-4 * sd)


def test_non_multiple_sizes_come_back_at_their_own_size(tiny_model, aiseg_field):
    from islkeras.predict import predict_field

    img = aiseg_field[:1000, :777]
    tiled = predict_field(tiny_model, img, tile=256, overlap=64, batch=3)
    assert tiled.shape == (1000, 777, 1)
    one = tiny_model.predict_raw(img[None, ..., None])[0]
    assert np.abs(tiled - one).max() <= 0.05 * float(one.std())
    small = predict_field(tiny_model, aiseg_field[:40, :33], tile=256, overlap=64)
    assert small.shape == (40, 33, 1) and np.isfinite(small).all()


def test_predict_field_errors(tiny_model):
    from islkeras.predict import predict_field

    with pytest.raises(DataError, match="too small"):
        predict_field(tiny_model, np.zeros((100, 1), np.uint8))
    with pytest.raises(DataError, match="1 input plane"):
        predict_field(tiny_model, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="multiple of 32"):
        predict_field(tiny_model, np.zeros((64, 64), np.uint8), tile=100)
    with pytest.raises(UserError, match="overlap"):
        predict_field(tiny_model, np.zeros((64, 64), np.uint8), tile=64, overlap=64)
