"""Predicting at the model's pixel size (islkeras.inference.rescale, islkeras.data.objects)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk

from islkeras.data.objects import nuclei_diameter
from islkeras.errors import UserError
from islkeras.inference.rescale import check_options, predict_rescaled, resample

META = {"pixel_size_um": 0.65, "nuclei_diameter_px": 20.0}


def disks(r=6, size=256, step=32):
    img = np.zeros((size, size), np.float32)
    for cy in range(step // 2, size, step):
        for cx in range(step // 2, size, step):
            img[disk((cy, cx), r, shape=img.shape)] = 1.0
    return img


def test_nuclei_diameter_is_scale_covariant():
    d1 = nuclei_diameter(disks())
    d2 = nuclei_diameter(resample(disks(), (512, 512)))
    assert abs(d1 - 12.0) < 1.5
    assert abs(d2 / d1 - 2.0) < 0.2
    assert math.isnan(nuclei_diameter(np.zeros((64, 64), np.float32)))


def test_factor_from_pixel_size_and_diameter():
    assert check_options(META, pixel_size=0.325) == pytest.approx(0.5)
    assert check_options(META, diameter=40) == pytest.approx(0.5)
    assert check_options(META, diameter="auto") is None
    assert check_options(META) is None


@pytest.mark.parametrize("kw,msg", [({"pixel_size": 0}, r"--pixel-size 0: expected a pixel size"),
                                    ({"pixel_size": float("nan")}, r"--pixel-size nan"),
                                    ({"pixel_size": 10.0}, r"outside \[0.2, 5"),
                                    ({"pixel_size": 1, "diameter": 3}, "give one of them"),
                                    ({"diameter": -2}, r"--diameter -2")])
def test_bad_options_are_one_line(kw, msg):
    with pytest.raises(UserError, match=msg):
        check_options(META, **kw)


def test_old_model_without_pixel_size_is_named():
    with pytest.raises(UserError, match="no pixel_size_um"):
        check_options({}, pixel_size=0.5)
    with pytest.raises(UserError, match="no nuclei_diameter_px"):
        check_options({}, diameter="auto")


def test_rescaled_prediction_has_the_input_shape(tmp_path):
    from islkeras.models.savedmodel import ExportedModel
    from testkit import export_tiny

    model = ExportedModel(export_tiny(tmp_path / "m"))
    x = (disks(size=128) * 1000 + 100).astype(np.uint16)
    native = predict_rescaled(model, x, None, tile=128, overlap=16, batch=1)
    half = predict_rescaled(model, x, 0.5, tile=128, overlap=16, batch=1)
    assert native.shape[:2] == half.shape[:2] == x.shape
    assert not np.allclose(native, half)  # it really predicted on another grid
