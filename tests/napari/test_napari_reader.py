"""The napari reader of islkeras.napari.reader, through the plugin's manifest (``viewer.open(...,
plugin="islkeras")``): prediction TIFFs as `islkeras predict` writes them, an OME-TIFF through
islkeras.data.formats, and the files it leaves to napari."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.napari


@pytest.fixture(scope="module")
def pred():
    return np.random.default_rng(0).normal(20.0, 5.0, (40, 50, 2)).astype(np.float32)


def test_prediction_tiffs_open_one_layer_per_channel(make_napari_viewer, tmp_path, pred):
    from islkeras.inference.fields import to_uint16, write_prediction

    two, one = tmp_path / "field 1_prediction.tif", tmp_path / "field_2_prediction.tiff"
    write_prediction(two, pred, ["nuclei", "tubulin"])  # CYX, float32
    write_prediction(one, pred[..., :1], ["dapi"], dtype="uint16")  # YX, uint16
    viewer = make_napari_viewer()
    layers = viewer.open(two, plugin="islkeras")
    assert [lay.name for lay in layers] == ["nuclei", "tubulin"]
    for i, (lay, cmap) in enumerate(zip(layers, ["blue", "green"])):
        np.testing.assert_array_equal(lay.data, pred[..., i])
        assert lay.colormap.name == cmap and tuple(lay.scale) == (1.0, 1.0)
        assert lay.contrast_limits == pytest.approx(list(np.percentile(pred[..., i], (0.5, 99.9))), rel=1e-5)
    (lay,) = viewer.open(one, plugin="islkeras")
    assert lay.name == "dapi" and lay.data.dtype == np.uint16
    np.testing.assert_array_equal(lay.data, to_uint16(pred[..., :1])[0][..., 0])


def test_pixel_size_from_a_micron_resolution(make_napari_viewer, tmp_path, pred):
    import tifffile

    path = tmp_path / "scaled_prediction.tif"
    tifffile.imwrite(path, pred[..., 0], imagej=True, resolution=(1 / 0.5, 1 / 0.25),  # (x, y) px per µm
                     metadata={"axes": "YX", "Labels": ["nuclei"], "unit": "um"})
    viewer = make_napari_viewer()
    (lay,) = viewer.open(path, plugin="islkeras")
    assert tuple(lay.scale) == (0.25, 0.5) and lay.name == "nuclei"
    assert [str(u) for u in lay.units] == ["micrometer", "micrometer"]


def test_reader_leaves_other_files_and_reports_bad_ones(tmp_path, pred):
    import tifffile

    from islkeras.errors import DataError
    from islkeras.napari.reader import get_reader

    tifffile.imwrite(tmp_path / "plain.tif", pred[..., 0])
    assert get_reader(str(tmp_path / "plain.tif")) is None  # napari's own TIFF reader takes it
    assert get_reader([str(tmp_path / "plain.tif"), str(tmp_path / "x_prediction.tif")]) is None
    stack = tmp_path / "stack_prediction.tif"
    tifffile.imwrite(stack, np.zeros((3, 8, 8), np.float32), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(DataError) as e:
        get_reader(str(stack))(str(stack))
    assert e.value.format_message() == (f"{stack}: not an islkeras prediction TIFF (axes ZYX, expected YX "
                                        "or CYX)")
    broken = tmp_path / "broken_prediction.tif"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError) as e:
        get_reader(str(broken))(str(broken))
    msg = e.value.format_message()
    assert msg.startswith(f"{broken}: unreadable TIFF (") and "\n" not in msg


def test_ome_tiff_opens_one_layer_per_channel_with_its_pixel_size(make_napari_viewer, tmp_path):
    """Through islkeras.data.formats (bioio-ome-tiff): channel names, z-stacks, pixel size, time point 0."""
    from testkit import write_ome_tiff  # tests/testkit.py

    data = np.random.default_rng(1).integers(0, 4000, (2, 2, 3, 24, 32), dtype=np.uint16)  # T, C, Z, Y, X
    path = write_ome_tiff(tmp_path / "plate 1.ome.tif", data, ["Brightfield", "DAPI"],
                          pixel_size_um=(0.325, 0.5))
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin="islkeras")
    assert [lay.name for lay in layers] == ["Brightfield", "DAPI"]
    for c, (lay, cmap) in enumerate(zip(layers, ["gray", "blue"])):
        np.testing.assert_array_equal(lay.data, data[0, c])  # (planes, y, x) of the first time point
        assert tuple(lay.scale) == (1.0, 0.325, 0.5) and lay.colormap.name == cmap
        assert lay.metadata["islkeras"]["time_points"] == 2
