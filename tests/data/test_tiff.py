"""Reading a field's channels from TIFF files (islkeras.data.tiff)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from islkeras.config import ChannelSpec
from islkeras.data import tiff
from islkeras.errors import DataError


def _write(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, **kw)
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_2d_keeps_dtype_and_values(tmp_path, dtype):
    a = (np.random.default_rng(0).random((40, 56)) * 200).astype(dtype)
    _write(tmp_path / "f1" / "img.tif", a, compression="zlib")
    got = tiff.read_field(tmp_path, "f1", {"img": ChannelSpec(file="img.tif")})["img"]
    assert got.shape == (40, 56, 1) and got.dtype == dtype
    np.testing.assert_array_equal(got[..., 0], a)


def test_3d_planes_and_projections(tmp_path):
    a = np.random.default_rng(1).integers(0, 60000, (7, 20, 30)).astype(np.uint16)
    p = _write(tmp_path / "f" / "z.tif", a, metadata={"axes": "ZYX"})
    read = lambda **kw: tiff.read_channel(p, ChannelSpec(file="z.tif", **kw), "f", "z")  # noqa: E731
    np.testing.assert_array_equal(read(), np.moveaxis(a, 0, -1))
    np.testing.assert_array_equal(read(planes=[4, 1]), np.moveaxis(a[[4, 1]], 0, -1))
    mx = read(planes=[0, 2, 3], projection="max")
    assert mx.dtype == np.uint16
    np.testing.assert_array_equal(mx[..., 0], a[[0, 2, 3]].max(0))
    mean = read(projection="mean")
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean[..., 0], a.astype(np.float64).mean(0), rtol=1e-6)


def test_axes_from_tifffile_series(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (16, 24, 3)).astype(np.uint8)
    p = _write(tmp_path / "f" / "rgb.tif", rgb, photometric="rgb")
    assert tifffile.TiffFile(p).series[0].axes == "YXS"
    got = tiff.read_channel(p, ChannelSpec(file="rgb.tif"), "f", "rgb")
    np.testing.assert_array_equal(got, rgb)  # samples axis becomes the plane axis
    czyx = np.arange(2 * 3 * 8 * 9, dtype=np.uint16).reshape(2, 3, 8, 9)
    p = _write(tmp_path / "f" / "czyx.tif", czyx, metadata={"axes": "CZYX"})
    got = tiff.read_channel(p, ChannelSpec(file="czyx.tif"), "f", "c")
    assert got.shape == (8, 9, 6)
    np.testing.assert_array_equal(got[..., 4], czyx[1, 1])


def test_glob_and_field_pattern(tmp_path):
    a = np.zeros((8, 8), np.uint8)
    _write(tmp_path / "f1" / "img_w1_DAPI.tif", a)
    assert tiff.channel_path(tmp_path, "f1", "dapi", ChannelSpec(file="*DAPI*.tif")).name == "img_w1_DAPI.tif"
    _write(tmp_path / "f1" / "img_w2_DAPI2.tif", a)
    with pytest.raises(DataError, match=r"field f1.*2 files match"):
        tiff.channel_path(tmp_path, "f1", "dapi", ChannelSpec(file="*DAPI*.tif"))
    _write(tmp_path / "flat" / "A1.tif", a)
    _write(tmp_path / "flat" / "B2.tif", a)
    spec = {"img": ChannelSpec(file="flat/{field}.tif")}
    assert tiff.field_names(tmp_path, "[AB]*", spec) == ["A1", "B2"]
    assert tiff.channel_path(tmp_path, "B2", "img", spec["img"]) == tmp_path / "flat" / "B2.tif"


def test_errors_name_field_and_file(tmp_path):
    a = np.zeros((3, 10, 10), np.uint16)
    _write(tmp_path / "fA" / "z.tif", a, metadata={"axes": "ZYX"})
    _write(tmp_path / "fA" / "small.tif", np.zeros((10, 12), np.uint16))
    with pytest.raises(DataError, match=r"field fA.*'q'.*no file matching .*missing\.tif"):
        tiff.read_field(tmp_path, "fA", {"q": ChannelSpec(file="missing.tif")})
    with pytest.raises(DataError, match=r"field fA.*z\.tif.*z index 5 is beyond the stack.*3 plane"):
        tiff.check_field(tmp_path, "fA", {"z": ChannelSpec(file="z.tif", planes=[0, 5])})
    with pytest.raises(DataError, match=r"field fA: channels have different shapes.*10x10 \(z\.tif\).*10x12"):
        tiff.check_field(tmp_path, "fA", {"z": ChannelSpec(file="z.tif"), "s": ChannelSpec(file="small.tif")})
    # truncated (header intact, pixel data cut) and garbage files
    big = np.random.default_rng(0).integers(0, 60000, (64, 64)).astype(np.uint16)
    p = _write(tmp_path / "fB" / "t.tif", big, compression="zlib")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match=r"field fB.*t\.tif.*unreadable or truncated TIFF"):
        tiff.read_field(tmp_path, "fB", {"t": ChannelSpec(file="t.tif")})
    (tmp_path / "fB" / "junk.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match=r"field fB.*junk\.tif.*unreadable or truncated TIFF"):
        tiff.check_field(tmp_path, "fB", {"j": ChannelSpec(file="junk.tif")})
    # NaN in float data
    f = np.ones((6, 6), np.float32)
    f[2, 3] = np.nan
    _write(tmp_path / "fC" / "f.tif", f)
    with pytest.raises(DataError, match=r"field fC.*f\.tif.*NaN.*y=2, x=3"):
        tiff.read_field(tmp_path, "fC", {"f": ChannelSpec(file="f.tif")})


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match="no field folders matching 'fov_\\*'"):
        tiff.field_names(tmp_path, "fov_*")
    with pytest.raises(DataError, match="does not exist"):
        tiff.field_names(tmp_path / "nope", "*")


def test_real_neurons_stack(neurons_dir):
    ref = tifffile.imread(neurons_dir / "A4" / "phase.tif")
    got = tiff.read_field(neurons_dir, "A4", {"phase": ChannelSpec(file="phase.tif", planes=[4, 6, 8]),
                                              "h": ChannelSpec(file="hoechst.tif", projection="max")})
    assert got["phase"].shape == (1024, 1024, 3) and got["phase"].dtype == np.uint16
    np.testing.assert_array_equal(got["phase"], np.moveaxis(ref[[4, 6, 8]], 0, -1))
    np.testing.assert_array_equal(got["h"][..., 0], tifffile.imread(neurons_dir / "A4" / "hoechst.tif"))
