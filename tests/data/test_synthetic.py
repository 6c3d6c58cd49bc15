"""Synthetic fields (islkeras.data.synthetic) and their trip through convert + the pipeline."""
from __future__ import annotations

import numpy as np
import tifffile

from islkeras.config import load_config
from islkeras.data import records
from islkeras.data.pipeline import make_dataset
from islkeras.data.synthetic import write_synthetic


def test_layout_dtypes_and_determinism(tmp_path):
    dirs = write_synthetic(tmp_path / "a", n_fields=3, size=96, seed=5)
    assert [d.name for d in dirs] == ["field_000", "field_001", "field_002"]
    for d in dirs:
        assert sorted(p.name for p in d.iterdir()) == ["mask.tif", "nuclei.tif", "transmitted.tif"]
        t, n, m = (tifffile.imread(d / f) for f in ("transmitted.tif", "nuclei.tif", "mask.tif"))
        assert t.shape == n.shape == m.shape == (96, 96)
        assert (t.dtype, n.dtype, m.dtype) == (np.uint16, np.uint16, np.uint8)
        assert set(np.unique(m)) == {0, 1}
    write_synthetic(tmp_path / "b", n_fields=3, size=96, seed=5)
    write_synthetic(tmp_path / "c", n_fields=3, size=96, seed=6)
    same = [np.array_equal(tifffile.imread(tmp_path / x / "field_001/nuclei.tif"),
                           tifffile.imread(tmp_path / "a/field_001/nuclei.tif")) for x in ("b", "c")]
    assert same == [True, False]


def test_nuclei_are_visible_in_transmitted_light(tmp_path):
    from scipy.ndimage import binary_dilation, binary_erosion

    d = write_synthetic(tmp_path, n_fields=1, size=256, seed=0)[0]
    t, n, m = (tifffile.imread(d / f).astype(np.float64) for f in ("transmitted.tif", "nuclei.tif", "mask.tif"))
    m = m.astype(bool)
    assert 0.03 < m.mean() < 0.4
    core = binary_erosion(m, iterations=2)
    ring = binary_dilation(m, iterations=6) & ~binary_dilation(m, iterations=2)  # cytoplasm around nuclei
    # fluorescence marks the nuclei ...
    assert n[core].mean() > 3 * n[~binary_dilation(m, iterations=3)].mean()
    # ... and the transmitted image shows them darker than the surrounding cytoplasm (learnable contrast)
    assert t[core].mean() < t[ring].mean() - 2 * t[ring].std() / np.sqrt(ring.sum()) - 0.03 * t.mean()
    # a smoothed, inverted transmitted image already correlates with the fluorescence
    from scipy.ndimage import gaussian_filter

    assert np.corrcoef(-gaussian_filter(t, 2).ravel(), n.ravel())[0, 1] > 0.3


def test_demo_config_converts_and_feeds_the_pipeline(tmp_path, experiments_dir):
    write_synthetic(tmp_path / "data", n_fields=10, size=160, seed=0)
    cfg = load_config(experiments_dir / "demo.json", data_root=str(tmp_path / "data"),
                      overrides={"data.records": str(tmp_path / "records")})
    m = records.convert(cfg)
    assert m["counts"] == {"train": 6, "val": 2, "test": 2}
    assert m["channels"]["mask"]["kind"] == "mask" and m["channels"]["transmitted"]["dtype"] == "uint16"
    x, y = next(iter(make_dataset(cfg, "train", True, m)))
    assert x.shape == (4, 128, 128, 1) and y.shape == (4, 128, 128, 1)
    xs = [x.shape for x, _ in make_dataset(cfg, "val", False, m)]
    assert xs == [(2, 160, 160, 1)]  # whole fields (160 is a multiple of 32)
