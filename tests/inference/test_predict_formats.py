"""`islkeras predict` on microscope formats (islkeras.data.formats): an OME-TIFF and an OME-Zarr written here,
each input channel picked by its name in the file (the run's data.channels.<name>.channel, or --file-channel)."""
from __future__ import annotations


import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from islkeras.errors import DataError
from islkeras.inference.fields import find_inputs, input_specs, read_input
from testkit import META, export_tiny, require_extra, write_ome_tiff, write_ome_zarr

pytestmark = pytest.mark.formats


@pytest.fixture(scope="module", autouse=True)
def bioio_plugins():
    require_extra("formats", "bioio_ome_tiff", "bioio_ome_zarr")


@pytest.fixture(scope="module")
def crop(aiseg_dir):
    """A real bright-field crop (uint8) and a second channel, different from it."""
    bf = tifffile.imread(aiseg_dir / "fov_002" / "brightfield.tif")[100:356, 300:492]
    other = np.random.default_rng(0).integers(0, 255, bf.shape).astype(np.uint8)
    return bf, other


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-input run (bf, dapi) trained, as its config says, on OME-TIFF channels named in the file."""
    from islkeras.config import from_dict

    base = tmp_path_factory.mktemp("fmt_runs")
    run = base / "runs" / "two" / "20250101-000000"
    export_tiny(run / "savedmodel", n_in=2, meta=dict(META, inputs=["bf", "dapi"]))
    chans = {"bf": {"file": "{field}.ome.tif", "channel": "Brightfield"},
             "dapi": {"file": "{field}.ome.tif", "channel": "DAPI"}, "nuclei": {"file": "nuclei.tif"}}
    from_dict({"name": "two", "data": {"root": str(base), "channels": chans, "inputs": ["bf", "dapi"],
                                       "targets": ["nuclei"]}}, base_dir=base).save(run / "config.json")
    return run


def _predict(args):
    from islkeras.cli import cli

    res = CliRunner().invoke(cli, ["predict", *map(str, args)])
    return res.exit_code, res.output


def test_predict_ome_tiff_and_ome_zarr_by_channel_name(run, crop, tmp_path):
    from islkeras.inference.tiling import predict_field
    from islkeras.models.savedmodel import ExportedModel

    bf, other = crop
    tczyx = np.stack([other, bf])[None, :, None]  # the file's order is DAPI, Brightfield; the model's bf, dapi
    src = tmp_path / "in"
    src.mkdir()
    write_ome_tiff(src / "a.ome.tif", tczyx, ["DAPI", "Brightfield"], (0.65, 0.65))
    write_ome_zarr(src / "b.ome.zarr", tczyx, ["DAPI", "Brightfield"])
    out = tmp_path / "out"
    code, text = _predict([run, src / "a.ome.tif", src / "b.ome.zarr", "--out", out, "--tile", "256"])
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["a_prediction.tif", "b_prediction.tif"]
    em = ExportedModel(run)
    ref = predict_field(em, np.stack([bf, other], -1), tile=256)[..., 0]
    for name in ("a", "b"):
        np.testing.assert_array_equal(tifffile.imread(out / f"{name}_prediction.tif"), ref)
    swapped = predict_field(em, np.stack([other, bf], -1), tile=256)[..., 0]
    assert np.abs(ref - swapped).max() > 1e-3  # the channel order matters, so a swap would show
    # a name the files do not have: one line per input, the others still tried, exit code 1
    code, text = _predict([run, src / "a.ome.tif", src / "b.ome.zarr", "--out", out, "--file-channel", "bf=GFP"])
    assert code == 1 and "2 of 2 input(s) failed" in text
    assert text.count("no channel 'GFP' in the file (its channels: DAPI, Brightfield)") == 2


def test_file_channel_overrides_by_name_and_index(run, crop, tmp_path):
    from islkeras.models.savedmodel import ExportedModel

    bf, other = crop
    z = write_ome_zarr(tmp_path / "b.ome.zarr", np.stack([other, bf])[None, :, None], ["DAPI", "Brightfield"])
    (tmp_path / "notes.txt").write_text("not an image")
    em = ExportedModel(run)
    for opts in (["bf=DAPI", "dapi=Brightfield"], ["bf=0", "dapi=1"]):
        specs = input_specs(em, channel_files=["bf=x.czi", "dapi=x.czi"], file_channels=opts)
        items = find_inputs([tmp_path], specs)  # a folder of files: the OME-Zarr folder is one, not a field
        assert [(i.name, i.kind, i.error) for i in items] == [("b", "file", None)]
        np.testing.assert_array_equal(read_input(items[0], specs, 2), np.stack([other, bf], -1))
    specs = input_specs(em)
    for s in specs.values():
        s.channel = None
    with pytest.raises(DataError) as e:
        read_input(find_inputs([z], specs)[0], specs, 2)
    assert e.value.format_message() == (f"{z}: which of its channels (DAPI, Brightfield) is each input of the "
                                        f"model (bf, dapi)? say it with --file-channel bf=CHANNEL "
                                        f"--file-channel dapi=CHANNEL")
    specs = input_specs(em, file_channels=["bf=DAPI", "dapi=Brightfield"], times=["1"])
    with pytest.raises(DataError, match=r"time point 1 is beyond the file's 1 time point\(s\).*data.channels.bf.time"):
        read_input(find_inputs([z], specs)[0], specs, 2)
