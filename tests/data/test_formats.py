"""Microscope formats (islkeras.data.formats): OME-TIFF, OME-Zarr and CZI written here, plain TIFF through
tifffile, the one-line error for a missing plugin, and `convert` of OME fields against the same data as TIFF."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tifffile

from islkeras.config import ChannelSpec, from_dict
from islkeras.data import formats, tiff
from islkeras.errors import DataError
from testkit import require_extra, write_ome_tiff, write_ome_zarr

NAMES = ["Brightfield", "DAPI", "GFP"]
#: (T, C, Z, Y, X): every plane different, so a wrong channel, plane or time point shows
DATA = np.random.default_rng(7).integers(0, 60000, (2, 3, 4, 24, 40)).astype(np.uint16)


def hwp(a):
    """(planes, Y, X) -> (Y, X, planes)"""
    return np.moveaxis(a, 0, -1)


@pytest.fixture(scope="module")
def bioio_plugins():
    require_extra("formats", "bioio", "bioio_czi", "bioio_ome_tiff", "bioio_ome_zarr")


# ------------------------------------------------------------------------------------------ the readers
@pytest.mark.formats
def test_ome_tiff_channel_by_name_planes_time_and_pixel_size(tmp_path, bioio_plugins):
    p = write_ome_tiff(tmp_path / "a.ome.tif", DATA, NAMES, (0.5, 0.65))
    img = formats.open_image(p)
    assert img.format == "OME-TIFF" and img.channel_names == NAMES and img.dims == (2, 3, 4, 24, 40)
    assert img.pixel_size_um == (0.5, 0.65) and img.dtype == np.uint16
    got = img.read("DAPI")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, hwp(DATA[0, 1]))
    np.testing.assert_array_equal(img.read("gfp", [3, 0], time=1), hwp(DATA[1, 2, [3, 0]]))  # any case
    np.testing.assert_array_equal(img.read(0, [2], time=1), hwp(DATA[1, 0, [2]]))
    # an OME-TIFF without the .ome suffix is still one; tifffile's header gives the same pixel size
    q = write_ome_tiff(tmp_path / "b.tif", DATA[:1, :2], NAMES[:2], (0.25, 0.25))
    assert formats.open_image(q).format == "OME-TIFF"
    assert tiff.read_header(q, "f", "bf").pixel_size_um == formats.open_image(q).pixel_size_um == (0.25, 0.25)


@pytest.mark.formats
def test_ome_zarr_folder_in_nanometres(tmp_path, bioio_plugins):
    p = write_ome_zarr(tmp_path / "a.ome.zarr", DATA, NAMES, pixel_size=(250.0, 325.0), unit="nanometer")
    assert formats.is_image_path(p) and not formats.is_image_path(tmp_path)
    img = formats.open_image(p)
    assert img.format == "OME-Zarr" and img.channel_names == NAMES and img.dims == (2, 3, 4, 24, 40)
    assert img.pixel_size_um == (0.25, 0.325)  # converted from nm
    np.testing.assert_array_equal(img.read("GFP", [1, 3], time=1), hwp(DATA[1, 2, [1, 3]]))


@pytest.mark.formats
def test_czi_written_with_pylibczirw(tmp_path, bioio_plugins):
    from pylibCZIrw import czi as pyczi  # ships with bioio-czi

    p = tmp_path / "a.czi"
    with pyczi.create_czi(str(p), exist_ok=True) as w:
        for c in range(2):
            for z in range(4):
                w.write(DATA[0, c, z][..., None], plane={"C": c, "Z": z, "T": 0})
        w.write_metadata(document_name="t", channel_names={0: "TL Brightfield", 1: "DAPI"},
                         scale_x=0.65e-6, scale_y=0.5e-6, scale_z=2e-6)  # metres
    img = formats.open_image(p)
    assert img.format == "CZI" and img.channel_names == ["TL Brightfield", "DAPI"] and img.dims == (1, 2, 4, 24, 40)
    assert img.pixel_size_um == (0.5, 0.65)
    np.testing.assert_array_equal(img.read("TL Brightfield", [2]), hwp(DATA[0, 0, [2]]))
    np.testing.assert_array_equal(img.read("DAPI"), hwp(DATA[0, 1]))


def test_plain_tiff_stays_on_tifffile(tmp_path):
    """An ImageJ hyperstack (Fiji): channel names from Labels, pixel size from unit + resolution."""
    tzcyx = DATA[:, :2].transpose(0, 2, 1, 3, 4)  # T, Z, C, Y, X: ImageJ's order
    p = tmp_path / "h.tif"
    tifffile.imwrite(p, tzcyx, imagej=True, resolution=(1 / 0.65, 1 / 0.5),
                     metadata={"axes": "TZCYX", "unit": "um", "Labels": ["BF", "DAPI"] * 8})
    img = formats.open_image(p)
    assert img.format == "TIFF" and img.channel_names == ["BF", "DAPI"] and img.dims == (2, 2, 4, 24, 40)
    assert img.pixel_size_um == (0.5, 0.65)
    np.testing.assert_array_equal(img.read("DAPI", [3, 1], time=1), hwp(DATA[1, 1, [3, 1]]))
    # no names, no resolution: generic names and no pixel size (72 dpi says nothing about a microscope)
    tifffile.imwrite(tmp_path / "z.tif", DATA[0, 0], metadata={"axes": "ZYX"}, resolution=(72, 72))
    img = formats.open_image(tmp_path / "z.tif")
    assert img.channel_names == ["channel_0"] and img.dims == (1, 1, 4, 24, 40) and img.pixel_size_um is None
    np.testing.assert_array_equal(img.read(None, [2]), hwp(DATA[0, 0, [2]]))
    # a spec without channel/time keeps today's reader: every non-YX axis flattened into planes
    spec = ChannelSpec(file="h.tif")
    assert not tiff.uses_formats(p, spec) and tiff.read_channel(p, spec, "f", "x").shape == (24, 40, 16)
    spec = ChannelSpec(file="h.tif", channel="BF", planes=[0], time=1)
    np.testing.assert_array_equal(tiff.read_channel(p, spec, "f", "x"), hwp(DATA[1, 0, [0]]))


@pytest.mark.formats
def test_errors_name_the_file_and_the_key(tmp_path, bioio_plugins):
    p = write_ome_tiff(tmp_path / "a.ome.tif", DATA, NAMES)
    img = formats.open_image(p)
    assert img.pixel_size_um is None
    with pytest.raises(DataError, match=r"a\.ome\.tif: no channel 'RFP' in the file \(its channels: "
                                        r"Brightfield, DAPI, GFP\)"):
        img.read("RFP")
    with pytest.raises(DataError, match=r"channel index 3 is beyond the file's 3 channel\(s\)"):
        img.read(3)
    with pytest.raises(DataError, match=r"time point 2 is beyond the file's 2 time point\(s\) \(valid 0\.\.1\)"):
        img.read("DAPI", time=2)
    with pytest.raises(DataError, match=r"z index 4 is beyond the stack, which has 4 plane\(s\)"):
        img.read("DAPI", [0, 4])
    # through a channel spec: the field, the channel and the config key (a TIFF without channel/time keys is
    # read as before, all planes flattened; other formats need the channel when there are several)
    z = write_ome_zarr(tmp_path / "a.ome.zarr", DATA[:1], NAMES)
    msg = (f"field f1: channel 'bf': {z}: the file holds 3 channels (Brightfield, DAPI, GFP); name the one to "
           f"read (data.channels.bf.channel; islkeras predict: --file-channel bf=NAME)")
    with pytest.raises(DataError) as e:
        tiff.read_header(z, "f1", "bf", ChannelSpec(file="a.ome.zarr"))
    assert e.value.format_message() == msg
    assert tiff.read_header(p, "f1", "bf", ChannelSpec(file="a.ome.tif")).shape == (24, 40, 2 * 3 * 4)
    with pytest.raises(DataError, match=r"field f1: channel 'bf': .*time point 5 .*data\.channels\.bf\.time"):
        tiff.read_channel(p, ChannelSpec(file="a.ome.tif", channel="DAPI", time=5), "f1", "bf")
    # a file the plugin cannot read, and a format no plugin reads
    (tmp_path / "bad.czi").write_bytes(b"not a czi" * 50)
    with pytest.raises(DataError, match=r"bad\.czi: unreadable CZI file"):
        formats.open_image(tmp_path / "bad.czi")
    (tmp_path / "x.abc").write_bytes(b"????")
    with pytest.raises(DataError, match=r"x\.abc: no installed bioio reader plugin reads \.abc files"):
        formats.open_image(tmp_path / "x.abc")
    with pytest.raises(DataError, match=r"nope\.nd2: no such file"):
        formats.open_image(tmp_path / "nope.nd2")


@pytest.mark.formats
@pytest.mark.parametrize("fmt,package", [("nd2", "bioio-nd2"), ("lif", "bioio-lif")])
def test_nd2_and_lif_go_through_their_plugin(tmp_path, bioio_plugins, fmt, package):
    """No package ships a small ND2/LIF sample and neither format has a writer: the path goes through the
    plugin, which rejects a file that is not one with its own reason, in one line."""
    pytest.importorskip(package.replace("-", "_"))
    p = tmp_path / f"x.{fmt}"
    p.write_bytes(b"\x00junk" * 200)
    with pytest.raises(DataError) as e:
        formats.open_image(p)
    msg = e.value.format_message()
    assert msg.startswith(f"{p}: unreadable {fmt.upper()} file ({package} does not support the image")
    assert "\n" not in msg


@pytest.mark.parametrize("name,fmt,package", [("x.czi", "CZI", "bioio-czi"), ("x.nd2", "ND2", "bioio-nd2"),
                                              ("x.lif", "LIF", "bioio-lif"), ("x.ome.zarr", "OME-Zarr", "bioio-ome-zarr"),
                                              ("x.ome.tif", "OME-TIFF", "bioio-ome-tiff")])
def test_missing_plugin_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, fmt, package):
    p = tmp_path / name
    if name.endswith(".ome.tif"):
        write_ome_tiff(p, DATA[:1, :1, :1], ["a"])
    elif name.endswith(".zarr"):
        p.mkdir()
    else:
        p.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # import raises ImportError
    if "bioio" not in sys.modules:
        monkeypatch.setitem(sys.modules, "bioio", type(sys)("bioio"))  # bioio itself present, the plugin not
    with pytest.raises(DataError) as e:
        formats.open_image(p)
    assert e.value.format_message() == (f"{p}: reading {fmt} files needs the bioio plugin {package}: "
                                        f"pip install 'islkeras[formats]' (or pip install {package})")
    monkeypatch.setitem(sys.modules, "bioio", None)
    with pytest.raises(DataError) as e:
        formats.open_image(p)
    assert e.value.format_message() == f"{p}: reading {fmt} files needs bioio: pip install 'islkeras[formats]'"


def test_missing_plugin_through_convert_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from islkeras.cli import cli

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f1.czi").write_bytes(b"x")
    cfg = {"name": "c", "data": {"root": "data", "channels": {"bf": {"file": "{field}.czi", "channel": "TL"}},
                                 "inputs": ["bf"], "targets": ["bf"], "split": {"fractions": {"train": 1.0}}}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(sys.modules, "bioio_czi", None)
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "c.json")])
    assert res.exit_code == 1
    want = (f"field f1: channel 'bf': {tmp_path / 'data' / 'f1.czi'}: reading CZI files needs ")
    assert want in res.output and "pip install 'islkeras[formats]'" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "records").exists()


# --------------------------------------------------------------------------------------------- convert
def _cfg(tmp_path, root, channels, name):
    return from_dict({"name": name, "data": {
        "root": str(root), "fields": "f*", "channels": channels, "inputs": ["bf"], "targets": ["dapi"],
        "split": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1},
        "records": str(tmp_path / f"rec_{name}"), "shard_size": 2}, "pipeline": {"crop_size": 32}},
        base_dir=tmp_path, source=f"{name}.json")


@pytest.mark.formats
def test_convert_ome_fields_gives_the_records_of_the_same_tiffs(tmp_path, bioio_plugins):
    """The same pixels as TIFF field folders, as one OME-TIFF per field and as one OME-Zarr per field
    (channels by name, z planes picked): identical records and statistics; the pixel size is recorded."""
    from islkeras.data import records
    from islkeras.data.reader import load_fields

    rng = np.random.default_rng(3)
    fields = {f"f{i}": rng.integers(0, 4000, (1, 2, 3, 40, 48)).astype(np.uint16) for i in range(4)}
    for n, a in fields.items():
        (tmp_path / "tif" / n).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "tif" / n / "bf.tif", a[0, 0], metadata={"axes": "ZYX"})
        tifffile.imwrite(tmp_path / "tif" / n / "dapi.tif", a[0, 1, 1])
        (tmp_path / "ome").mkdir(exist_ok=True)
        write_ome_tiff(tmp_path / "ome" / f"{n}.ome.tif", a, ["BF", "DAPI"], (0.5, 0.65))
        write_ome_zarr(tmp_path / "zarr" / f"{n}.ome.zarr", a, ["BF", "DAPI"], (0.3, 0.3))
    plain = _cfg(tmp_path, tmp_path / "tif", {"bf": {"file": "bf.tif", "planes": [0, 2]},
                                              "dapi": {"file": "dapi.tif"}}, "tif")
    per_file = {"bf": {"file": "{field}.ome.tif", "channel": "BF", "planes": [0, 2]},
                "dapi": {"file": "{field}.ome.tif", "channel": "DAPI", "planes": [1]}}
    ome = _cfg(tmp_path, tmp_path / "ome", per_file, "ome")
    zarr_spec = {k: dict(v, file="{field}.ome.zarr") for k, v in per_file.items()}
    zarr = _cfg(tmp_path, tmp_path / "zarr", zarr_spec, "zarr")
    ms = {c.name: records.convert(c, workers=1) for c in (plain, ome, zarr)}
    for m in ms.values():
        assert m["counts"] == {"train": 2, "val": 1, "test": 1}
        assert {c: (v["dtype"], v["planes"]) for c, v in m["channels"].items()} == {
            "bf": ("uint16", 2), "dapi": ("uint16", 1)}
    for split in ("train", "val", "test"):
        ref = load_fields(plain, split, ms["tif"])
        for cfg in (ome, zarr):
            got = load_fields(cfg, split, ms[cfg.name])
            assert [f.name for f in got] == [f.name for f in ref]
            for g, r in zip(got, ref):
                for c in ("bf", "dapi"):
                    np.testing.assert_array_equal(g.arrays[c], r.arrays[c])
                assert g.stats == r.stats
    one = load_fields(ome, "val", ms["ome"])[0]  # planes [0, 2] of channel BF, plane 1 of DAPI
    np.testing.assert_array_equal(one.arrays["bf"], hwp(fields[one.name][0, 0, [0, 2]]))
    np.testing.assert_array_equal(one.arrays["dapi"][..., 0], fields[one.name][0, 1, 1])
    strip = lambda f: {k: v for k, v in f.items() if k not in ("shard", "pixel_size_um")}  # noqa: E731
    for n in fields:
        assert "pixel_size_um" not in ms["tif"]["fields"][n]
        assert ms["ome"]["fields"][n]["pixel_size_um"] == [0.5, 0.65]
        assert ms["zarr"]["fields"][n]["pixel_size_um"] == [0.3, 0.3]
        assert strip(ms["ome"]["fields"][n]) == strip(ms["zarr"]["fields"][n]) == strip(ms["tif"]["fields"][n])
    # an OME-Zarr folder's signature follows the files inside it: a rewritten chunk makes the records stale
    assert records.stale_reason(zarr, ms["zarr"]) is None
    chunk = max((p for p in (tmp_path / "zarr" / "f2.ome.zarr").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.utime(chunk, ns=(chunk.stat().st_atime_ns, chunk.stat().st_mtime_ns + 10**9))
    assert "f2.ome.zarr changed" in records.stale_reason(zarr, ms["zarr"])

