"""Robustness augmentation of training crops (islkeras.data.augment through make_dataset)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.draw import disk
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from islkeras.config import from_dict
from islkeras.data import records
from islkeras.data.pipeline import make_dataset
from islkeras.errors import ConfigError, DataError

JITTER = {"blur": {"p": 1.0, "range": [1.0, 2.0]}, "contrast": {"p": 1.0}, "brightness": {"p": 1.0},
          "gamma": {"p": 1.0}, "noise": {"p": 1.0, "range": [0.1, 0.2], "poisson": 0.5}}


def disks_cfg(tmp_path, augment, crop=64, seed=3):
    root = tmp_path / "data"
    if not root.exists():
        rng = np.random.default_rng(0)
        for i in range(2):
            img = np.zeros((256, 256), np.uint16)
            for cy in range(16, 256, 32):
                for cx in range(16, 256, 32):
                    img[disk((cy, cx), 6, shape=img.shape)] = 1000
            noisy = (img + rng.integers(0, 50, img.shape)).astype(np.uint16)
            (root / f"f{i}").mkdir(parents=True)
            tifffile.imwrite(root / f"f{i}" / "bf.tif", noisy)
            tifffile.imwrite(root / f"f{i}" / "nuc.tif", img)
    d = {"name": "disks",
         "data": {"root": str(root), "fields": "f*", "channels": {"bf": {"file": "bf.tif"}, "nuc": {"file": "nuc.tif"}},
                  "inputs": ["bf"], "targets": ["nuc"], "split": {"fractions": {"train": 0.5, "val": 0.5}},
                  "records": str(tmp_path / "rec")},
         "pipeline": {"crop_size": crop, "crops_per_field": 2, "shuffle_buffer": 1, "seed": seed, "augment": augment,
                      "normalization": "minmax"},
         "training": {"batch_size": 4}}
    cfg = from_dict(d, base_dir=tmp_path, source="test")
    return cfg, records.convert(cfg)


def batches(cfg, m, n=3, training=True, split="train"):
    ds = make_dataset(cfg, split, training=training, manifest=m)
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def diameters(y):
    """Equivalent diameters of the Otsu objects of each crop that do not touch its border."""
    out = []
    for crop in y[..., 0]:
        lab = label(crop > threshold_otsu(crop))
        h, w = crop.shape
        out += [r.equivalent_diameter_area for r in regionprops(lab)
                if r.bbox[0] > 0 and r.bbox[1] > 0 and r.bbox[2] < h and r.bbox[3] < w]
    return np.array(out)


@pytest.mark.parametrize("factor", [1.6, 0.7])
def test_zoomed_crops_nuclei_larger_by_the_factor(tmp_path, factor):
    cfg, m = disks_cfg(tmp_path, {"zoom": {"p": 1.0, "range": [factor, factor]}})
    plain = diameters(np.concatenate([y for _, y in batches(disks_cfg(tmp_path / "p", False)[0],
                                                             disks_cfg(tmp_path / "p", False)[1])]))
    zoomed = np.concatenate([y for _, y in batches(cfg, m)])
    assert zoomed.shape[1:3] == (64, 64)  # crop size kept
    ratio = np.median(diameters(zoomed)) / np.median(plain)
    assert abs(ratio / factor - 1) < 0.10, (ratio, factor)


def test_input_jitter_changes_inputs_only_and_is_seeded(tmp_path):
    base = batches(*disks_cfg(tmp_path / "a", True))
    cfg, m = disks_cfg(tmp_path / "b", JITTER)
    jit = batches(cfg, m)
    again = batches(*disks_cfg(tmp_path / "c", JITTER))
    for (xb, yb), (xj, yj), (xa, ya) in zip(base, jit, again):
        np.testing.assert_array_equal(yb, yj)  # the target is bit-identical
        assert np.abs(xb - xj).mean() > 0.05  # the input changed
        np.testing.assert_array_equal(xj, xa)  # same seed, same crops
    other = batches(*disks_cfg(tmp_path / "d", JITTER, seed=4))
    assert not np.array_equal(other[0][0], jit[0][0])


@pytest.mark.parametrize("name,spec", [("blur", {"p": 1.0, "range": [2.0, 2.0]}),
                                       ("gamma", {"p": 1.0, "range": [2.0, 2.0]}),
                                       ("noise", {"p": 1.0, "range": [0.3, 0.3]})])
def test_each_transform_does_what_it_says(tmp_path, name, spec):
    (xb, yb), = batches(*disks_cfg(tmp_path / "a", True), n=1)
    (xj, yj), = batches(*disks_cfg(tmp_path / "b", {name: spec}), n=1)
    np.testing.assert_array_equal(yb, yj)
    grad = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    if name == "blur":  # defocus removes edges
        assert grad(xj) < 0.6 * grad(xb)
    elif name == "gamma":  # gamma 2 on [0, 1] darkens the mid-tones: mean below, same range
        assert xj.mean() < xb.mean() - 0.01
        np.testing.assert_allclose(xj.max(axis=(1, 2, 3)), xb.max(axis=(1, 2, 3)), rtol=1e-4)
    else:  # 0.3 std of noise added
        ratio = (xj - xb).std(axis=(1, 2, 3)) / xb.std(axis=(1, 2, 3))
        np.testing.assert_allclose(ratio, 0.3, rtol=0.15)


def test_no_augmentation_at_evaluation(tmp_path):
    aug = dict(JITTER, zoom={"p": 1.0, "range": [1.5, 1.5]})
    plain = batches(*disks_cfg(tmp_path / "a", True), training=False, split="val")
    jit = batches(*disks_cfg(tmp_path / "b", aug), training=False, split="val")
    assert len(plain) == len(jit) > 0
    for (xp, yp), (xj, yj) in zip(plain, jit):
        np.testing.assert_array_equal(xp, xj)
        np.testing.assert_array_equal(yp, yj)


def test_bad_augment_settings_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline\.augment\.gamma.*p must be in \[0, 1\]"):
        disks_cfg(tmp_path, {"gamma": {"p": 1.5}})
    with pytest.raises(ConfigError, match=r"pipeline\.augment\.zoom"):
        disks_cfg(tmp_path / "z", {"zoom": {"p": 0.5, "range": [1.5, 0.8]}})
    with pytest.raises(ConfigError, match=r"unknown key 'pipeline\.augment\.gama'"):
        disks_cfg(tmp_path / "k", {"gama": {"p": 0.5}})
    cfg, m = disks_cfg(tmp_path / "u", {"zoom": {"p": 0.5}})
    cfg.pipeline.cache = False
    with pytest.raises(DataError, match="pipeline.augment.zoom needs pipeline.cache"):
        make_dataset(cfg, "train", training=True, manifest=m)
