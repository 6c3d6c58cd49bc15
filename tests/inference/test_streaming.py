"""Streamed prediction of fields larger than memory (OME-Zarr in, OME-Zarr out) and the tile grid."""
from __future__ import annotations

import numpy as np
import pytest

from testkit import export_tiny, require_extra

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from islkeras.models.savedmodel import ExportedModel

    return ExportedModel(export_tiny(tmp_path_factory.mktemp("tiny") / "savedmodel", seed=3))


@pytest.fixture(scope="module")
def field(aiseg_dir):
    import tifffile

    return tifffile.imread(aiseg_dir / "fov_002" / "brightfield.tif")[:700, :590]  # uint8, not a multiple of 32


def _zarr():
    require_extra("formats", "zarr")


# ------------------------------------------------------------------------------------------ tile grid
def _brute_force_cost(h, w, tile, overlap, batch):
    """Fewest computed pixels over every grid of tiles of ty x tx (multiples of 32, starts multiples of 32,
    neighbours overlapping >= overlap, last tile flush with the padded end) within the memory bound:
    counted from the tile size (the planner counts from the number of tiles)."""
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32

    def count(size, t):
        if t == size:
            return 1
        step = (t - overlap) // 32 * 32
        return None if step < 32 else 1 + -(-(size - t) // step)

    best = None
    for ty in range(32, hp + 1, 32):
        for tx in range(32, wp + 1, 32):
            ny, nx = count(hp, ty), count(wp, tx)
            if ny is None or nx is None or ty * tx > tile * tile * batch:
                continue
            cost = ny * ty * nx * tx
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("h,w,tile,overlap,batch", [(640, 480, 128, 32, 2), (1000, 777, 256, 64, 1),
                                                    (300, 250, 96, 32, 3), (2048, 2048, 512, 64, 4)])
def test_grid_plan_computes_the_fewest_pixels(h, w, tile, overlap, batch):
    from islkeras.inference.tiling import grid_plan

    g = grid_plan(h, w, tile, overlap, batch)
    assert g.computed_pixels() == _brute_force_cost(h, w, tile, overlap, batch)
    for ax, size in ((g.rows, -(-h // 32) * 32), (g.cols, -(-w // 32) * 32)):
        s = ax.starts
        assert all(v % 32 == 0 for v in s) and s[0] == 0 and s[-1] + ax.tile == ax.size == size
        assert all(b - a <= ax.tile - overlap for a, b in zip(s, s[1:]))  # overlap as asked, no gaps
        cover = np.zeros(size)
        for v, win in zip(s, ax.windows):
            cover[v:v + ax.tile] += win
        np.testing.assert_allclose(cover, ax.wsum)
    assert g.rows.tile * g.cols.tile * g.batch <= tile * tile * batch  # the memory bound


def test_default_grid_wastes_few_pixels():
    """Issue 16's target: <= 1.15x the field's pixels at 2048^2 and 4096^2 (square 512 tiles: 1.56x, 1.27x)."""
    from islkeras.inference.tiling import grid_plan

    for n in (2048, 4096):
        assert grid_plan(n, n).computed_pixels() / n ** 2 <= 1.15
    assert grid_plan(1024, 1024).n_tiles == 1  # a field within the bound is one pass


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.formats
def test_streamed_equals_in_memory(model, field, tmp_path):
    """OME-Zarr in -> tiles -> OME-Zarr out equals predict_field on the same field (< 1e-4), reflection
    padding at the right/bottom edges, several tiles with overlaps, and the image is only complete at the end."""
    _zarr()
    from islkeras.data.chunked import open_ome_zarr, write_ome_zarr
    from islkeras.inference.streaming import ZarrSource, predict_streamed
    from islkeras.inference.tiling import grid_plan, predict_field

    src = write_ome_zarr(tmp_path / "in.ome.zarr", field, ["brightfield"], pixel_size_um=(0.65, 0.65), chunk=128)
    assert grid_plan(*field.shape, 256, 64, 1).n_tiles > 4
    want = predict_field(model, field, tile=256, overlap=64, batch=1)
    lazy = open_ome_zarr(src)
    ticks = []
    out = predict_streamed(model, ZarrSource(lazy, [(0, [0], 0, "none")]), tmp_path / "out.ome.zarr", ["nuclei"],
                           tile=256, overlap=64, batch=1, callback=lambda d, t: ticks.append((d, t)), chunk=96)
    got = open_ome_zarr(out)
    assert got.channel_names == ["nuclei"] and got.pixel_size_um == pytest.approx((0.65, 0.65))
    pred = got.region(0, [0], 0, 0, field.shape[0], 0, field.shape[1])[..., 0]
    assert pred.shape == field.shape
    assert float(np.abs(pred - want[..., 0]).max()) < 1e-4, float(np.abs(pred - want[..., 0]).max())
    assert ticks[-1][0] == ticks[-1][1] > 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("method", ["percentile", "minmax", "zscore"])
def test_streamed_statistics_equal_whole_field(method, field):
    from islkeras.data import normalize as N

    a = np.stack([field, field[::-1] // 3 + 7], -1).astype(np.uint16)
    bands = (a[y:y + 77] for y in range(0, a.shape[0], 77))
    off, sc = N.offset_scale_of_blocks(bands, method, (1.0, 99.8))
    want_off, want_sc = N.offset_scale_of_image(a, method, (1.0, 99.8))
    np.testing.assert_allclose(off, want_off, rtol=1e-6)
    np.testing.assert_allclose(sc, want_sc, rtol=1e-6)


@pytest.mark.formats
def test_streamed_bad_inputs_are_one_line_and_leave_nothing(model, field, tmp_path):
    """A corrupt chunk, a missing image array, a folder that is no Zarr: one-line DataErrors naming the path;
    no output image (complete-looking or temporary) is left."""
    _zarr()
    import json
    import shutil

    from islkeras.data.chunked import open_ome_zarr, write_ome_zarr
    from islkeras.errors import DataError
    from islkeras.inference.streaming import ZarrSource, predict_streamed

    src = write_ome_zarr(tmp_path / "in.ome.zarr", field, ["bf"], chunk=128)
    chunk = next(p for p in sorted((src / "0").rglob("*")) if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 3])  # truncated
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError, match=r"in\.ome\.zarr: unreadable chunk") as e:
        predict_streamed(model, ZarrSource(open_ome_zarr(src), [(0, [0], 0, "none")]), out_dir / "p.ome.zarr", ["n"])
    assert "\n" not in str(e.value)
    assert list(out_dir.iterdir()) == []

    missing = write_ome_zarr(tmp_path / "m.ome.zarr", field[:64, :64], ["bf"])
    shutil.rmtree(missing / "0")
    with pytest.raises(DataError, match=r"m\.ome\.zarr: the image array '0' .* is missing"):
        open_ome_zarr(missing)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: not a Zarr store|plain: not an OME-Zarr"):
        open_ome_zarr(tmp_path / "plain")
    bad_axes = write_ome_zarr(tmp_path / "a.ome.zarr", field[:64, :64], ["bf"])
    attrs = json.loads((bad_axes / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"] = attrs["multiscales"][0]["axes"][:2]
    (bad_axes / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(DataError, match="expected axes"):
        open_ome_zarr(bad_axes)


@pytest.mark.formats
def test_predict_cli_ome_zarr_output_equals_tiff_output(model, field, tmp_path):
    """`islkeras predict --output-format ome-zarr` on an OME-Zarr input (read region by region) and on a
    TIFF (read whole, written tile by tile) gives the TIFF output's values; --tta is refused in one line."""
    _zarr()
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli
    from islkeras.data.chunked import open_ome_zarr, write_ome_zarr

    write_ome_zarr(tmp_path / "in" / "well.ome.zarr", field, ["brightfield"], chunk=128)
    tifffile.imwrite(tmp_path / "in" / "plain.tif", field)
    sm = str(model.path)
    args = ["--tile", "256", "--overlap", "64", "--batch", "1"]
    r = CliRunner().invoke(cli, ["predict", sm, str(tmp_path / "in" / "plain.tif"), "--out", str(tmp_path / "tif")]
                           + args)
    assert r.exit_code == 0, r.output
    want = tifffile.imread(tmp_path / "tif" / "plain_prediction.tif")
    r = CliRunner().invoke(cli, ["predict", sm, str(tmp_path / "in"), "--out", str(tmp_path / "zarr"),
                                 "--output-format", "ome-zarr"] + args)
    assert r.exit_code == 0, r.output
    assert "predicted 2 of 2" in r.output
    assert sorted(p.name for p in (tmp_path / "zarr").iterdir()) == ["plain_prediction.ome.zarr",
                                                                     "well_prediction.ome.zarr"]
    for name in ("plain", "well"):
        got = open_ome_zarr(tmp_path / "zarr" / f"{name}_prediction.ome.zarr")
        pred = got.region(0, [0], 0, 0, got.height, 0, got.width)[..., 0]
        assert float(np.abs(pred - want).max()) < 1e-4, name
    r = CliRunner().invoke(cli, ["predict", sm, str(tmp_path / "in"), "--out", str(tmp_path / "x"),
                                 "--output-format", "ome-zarr", "--tta"])
    assert r.exit_code != 0 and "needs the TIFF output" in r.output and len(r.output.strip().splitlines()) == 1
