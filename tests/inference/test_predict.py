"""Tiled whole-field prediction (islkeras.inference.tiling) against one-pass prediction of the same SavedModel, the
field readers/writers (islkeras.inference.fields) and `islkeras predict`."""
from __future__ import annotations

import numpy as np
import pytest

from islkeras.errors import DataError, UserError
from testkit import META, export_tiny, make_run  # noqa: F401  (tests/testkit.py)

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from islkeras.models.savedmodel import ExportedModel

    return ExportedModel(export_tiny(tmp_path_factory.mktemp("tiny") / "savedmodel"))


@pytest.fixture(scope="session")
def aiseg_field(aiseg_dir):
    import tifffile

    return tifffile.imread(aiseg_dir / "fov_002" / "brightfield.tif")  # (1024, 1024) uint8


# ------------------------------------------------------------------------------------------ tiling
def test_blend_window_never_zero_and_partition_of_unity():
    from islkeras.inference.tiling import blend_window, tile_plan

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
    from islkeras.inference.tiling import predict_field

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
    from islkeras.inference.tiling import predict_field

    img = aiseg_field[:1000, :777]
    tiled = predict_field(tiny_model, img, tile=256, overlap=64, batch=3)
    assert tiled.shape == (1000, 777, 1)
    one = tiny_model.predict_raw(img[None, ..., None])[0]
    assert np.abs(tiled - one).max() <= 0.05 * float(one.std())
    small = predict_field(tiny_model, aiseg_field[:40, :33], tile=256, overlap=64)
    assert small.shape == (40, 33, 1) and np.isfinite(small).all()


def test_tta_is_the_mean_of_the_eight_symmetries(tiny_model, aiseg_field):
    """tta=True equals predicting each rot90/flip of the field in one pass, mapping it back and averaging;
    it differs from the plain prediction (the random net is not symmetric) and keeps odd sizes."""
    from islkeras.inference.tiling import dihedral_np, predict_field

    img = aiseg_field[100:356, 300:492]  # 256 x 192: one tile, so each symmetry is a one-pass prediction
    want = np.mean([dihedral_np(tiny_model.predict_raw(np.ascontiguousarray(dihedral_np(img, k))[None, ..., None])[0],
                                k, inverse=True) for k in range(8)], axis=0)
    got = predict_field(tiny_model, img, tile=256, overlap=0, tta=True)
    sd = float(want.std())
    assert got.shape == (256, 192, 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * sd)
    plain = predict_field(tiny_model, img, tile=256, overlap=0)
    assert np.abs(plain - got).mean() > 0.01 * sd
    for k in range(8):  # the symmetry and its inverse, on a non-square array
        a = np.arange(12).reshape(3, 4)
        assert np.array_equal(dihedral_np(dihedral_np(a, k), k, inverse=True), a)
    odd = predict_field(tiny_model, aiseg_field[:300, :250], tile=256, overlap=64, tta=True)
    assert odd.shape == (300, 250, 1) and np.isfinite(odd).all()


def test_predict_field_errors(tiny_model):
    from islkeras.inference.tiling import predict_field

    for bad in (np.nan, np.inf):  # arrays handed over directly (evaluate, transfer, napari) are checked too
        img = np.ones((64, 64), np.float32)
        img[3, 4] = bad
        with pytest.raises(DataError, match="contains NaN or infinite pixel values"):
            predict_field(tiny_model, img)

    with pytest.raises(DataError, match="too small"):
        predict_field(tiny_model, np.zeros((100, 1), np.uint8))
    with pytest.raises(DataError, match="1 input plane"):
        predict_field(tiny_model, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="multiple of 32"):
        predict_field(tiny_model, np.zeros((64, 64), np.uint8), tile=100)
    with pytest.raises(UserError, match="overlap"):
        predict_field(tiny_model, np.zeros((64, 64), np.uint8), tile=64, overlap=64)


# --------------------------------------------------------------------------------------- CLI / files
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model, aiseg_dir):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny_aiseg" / "20250101-000000", aiseg_dir, tiny_model.path)


def test_predict_cli_mixed_inputs(tiny_run, tiny_model, aiseg_dir, aiseg_field, tmp_path):
    import shutil

    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli

    src = tmp_path / "my fields"  # paths with spaces
    shutil.copytree(aiseg_dir / "fov_002", src / "fov 002")
    tifffile.imwrite(src / "odd size.tif", aiseg_field[:1000, :777])
    tifffile.imwrite(src / "thin.tif", aiseg_field[:, :1])  # 1 pixel wide
    tifffile.imwrite(src / "rgb.tif", np.stack([aiseg_field[:256, :256]] * 3, -1), photometric="rgb")
    (src / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out dir"
    res = CliRunner().invoke(cli, ["predict", str(tiny_run), str(src / "fov 002"), str(src / "odd size.tif"),
                                   str(src / "thin.tif"), str(src / "rgb.tif"), str(src / "broken.tif"),
                                   str(src / "missing.tif"), "--out", str(out), "--tile", "256"])
    assert res.exit_code == 1, res.output
    text = res.output
    assert "4 of 6 input(s) failed" in text and "predicted 2 of 6" in text
    assert "too small" in text and "thin.tif" in text
    assert "1 input plane(s)" in text and "--planes" in text  # the RGB stack
    assert "broken.tif" in text and "no such file" in text
    assert sorted(p.name for p in out.iterdir()) == ["fov 002_prediction.tif", "odd size_prediction.tif"]
    with tifffile.TiffFile(out / "odd size_prediction.tif") as t:
        arr = t.asarray()
        assert arr.shape == (1000, 777) and arr.dtype == np.float32
        assert t.is_imagej and t.series[0].axes == "YX" and t.imagej_metadata["Labels"] == "nuclei"
    # the CLI writes exactly what predict_field returns (same code path)
    from islkeras.inference.tiling import predict_field

    ref = predict_field(tiny_model, aiseg_field[:1000, :777], tile=256)[..., 0]
    np.testing.assert_array_equal(arr, ref)
    # RGB stack works once a plane is picked
    res = CliRunner().invoke(cli, ["predict", str(tiny_run / "savedmodel"), str(src / "rgb.tif"),
                                   "--out", str(out), "--planes", "1"])
    assert res.exit_code == 0, res.output
    assert tifffile.imread(out / "rgb_prediction.tif").shape == (256, 256)


def test_predict_rejects_nan_and_inf_inputs_and_predicts_the_rest(tiny_run, aiseg_field, tmp_path):
    """A float image with a NaN or infinite pixel is reported by name and skipped (no output written);
    the finite one next to it is predicted."""
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli

    good = aiseg_field[:64, :96].astype(np.float32)
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        img = good.copy()
        img[5, 7] = bad
        tifffile.imwrite(tmp_path / f"{name}.tif", img)
    tifffile.imwrite(tmp_path / "good.tif", good)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["predict", str(tiny_run), str(tmp_path / "nan.tif"), str(tmp_path / "inf.tif"),
                                   str(tmp_path / "good.tif"), "--out", str(out)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and all("NaN" in ln and "infinite" in ln for ln in lines), res.output
    assert str(tmp_path / "nan.tif") in lines[0] and str(tmp_path / "inf.tif") in lines[1]
    assert "predicted 1 of 3" in res.output and "2 of 3 input(s) failed" in res.output
    assert [p.name for p in out.iterdir()] == ["good_prediction.tif"]


def test_uint16_maps_back_to_target_scale(tiny_model, aiseg_field, tmp_path):
    import tifffile

    from islkeras.inference.fields import to_uint16, write_prediction
    from islkeras.inference.tiling import predict_field

    pred = predict_field(tiny_model, aiseg_field[:256, :320], tile=256)
    write_prediction(tmp_path / "p.tif", pred, ["nuclei"], dtype="uint16")
    with tifffile.TiffFile(tmp_path / "p.tif") as t:
        u = t.asarray()
        assert u.dtype == np.uint16 and u.shape == (256, 320) and t.is_imagej
    p = pred[..., 0]
    inside = (p >= 0) & (p <= 65535)
    assert inside.mean() > 0.5
    assert np.abs(u[inside].astype(np.float64) - p[inside]).max() <= 0.5 + 1e-6  # within rounding
    assert (u[p < -0.5] == 0).all()
    u2, clipped = to_uint16(np.array([[-3.2, 0.4, 254.6, 70000.0]], np.float32))
    assert u2.tolist() == [[0, 0, 255, 65535]] and clipped == 2
    u3, _ = to_uint16(np.array([[0.0, 0.5, 1.0]], np.float32), kind="segmentation")
    assert u3.tolist() == [[0, 32768, 65535]]
    # several output channels -> CYX with labels
    write_prediction(tmp_path / "c.tif", np.zeros((40, 50, 2), np.float32), ["nuclei", "map2"])
    with tifffile.TiffFile(tmp_path / "c.tif") as t:
        assert t.series[0].axes == "CYX" and t.imagej_metadata["Labels"] == ["nuclei", "map2"]


def test_input_layout_from_run_and_overrides(tiny_run, tiny_model, aiseg_dir, tmp_path):
    from islkeras.inference.fields import find_inputs, input_specs, read_input

    specs = input_specs(tiny_model)  # bare SavedModel: <channel>.tif*
    assert specs["brightfield"].file == "brightfield.tif*"
    from islkeras.models.savedmodel import ExportedModel

    em = ExportedModel(tiny_run)
    specs = input_specs(em, planes=["brightfield=0"], projections=["max"])
    assert specs["brightfield"].file == "brightfield.tif" and specs["brightfield"].planes == [0]
    assert specs["brightfield"].projection == "max"
    with pytest.raises(UserError, match="not an input channel"):
        input_specs(em, channel_files=["dapi=x.tif"])
    with pytest.raises(UserError, match="--planes"):
        input_specs(em, planes=["zero"])
    # a folder of field folders -> one item per field; a field lacking the input file is reported
    root = tmp_path / "root"
    for f in ("fov_001", "fov_004"):
        (root / f).mkdir(parents=True)
        (root / f / "brightfield.tif").symlink_to(aiseg_dir / f / "brightfield.tif")
    (root / "other").mkdir()
    (root / "other" / "x.tif").write_bytes(b"")
    items = find_inputs([root], input_specs(em))
    assert [(i.name, i.kind, i.error is None) for i in items] == [
        ("fov_001", "field", True), ("fov_004", "field", True), ("other", "field", False)]
    img = read_input(items[0], input_specs(em), 1)
    assert img.shape == (1024, 1024, 1) and img.dtype == np.uint8
    specs = input_specs(em, channel_files=["brightfield=x.tif"])
    assert [i.name for i in find_inputs([root / "other"], specs)] == ["other"]


def test_normalize_padded_matches_numpy(tiny_model, aiseg_field):
    from islkeras.inference.tiling import normalize_padded

    img = aiseg_field[:1000, :777, None]
    got = normalize_padded(tiny_model, img, 1024, 800)
    ref = np.pad(tiny_model.normalize(img), ((0, 24), (0, 23), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(got, ref)
