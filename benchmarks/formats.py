"""Reading one channel of a field from each microscope format; prints one JSON object.

    .venv/bin/python benchmarks/formats.py [--size 1024] [--planes 5] [--reps 5] [--out FILE]

One field, 2 channels x ``--planes`` z planes of ``--size``^2 uint16, written in the same run as: one plain
TIFF per channel (tifffile, today's reader), an ImageJ hyperstack (tifffile, channel picked by label), an
OME-TIFF, an OME-Zarr folder and a CZI (bioio + plugin). For each: median seconds of
``islkeras.data.tiff.read_header`` (what convert checks first) and of ``read_channel`` (all planes of one
channel, as convert and predict read it), and the ratio to the plain TIFF. Needs the ``[formats]`` extra.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import islkeras  # noqa: F401  (before anything imports tensorflow)
import numpy as np
import tifffile

from _common import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def median_time(fn, reps):
    fn()  # warm-up (imports, first open)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_all(d: Path, data: np.ndarray) -> dict:
    """data (C, Z, Y, X) -> {format: (path, ChannelSpec kwargs for channel 1)}"""
    from pylibCZIrw import czi as pyczi

    from testkit import write_ome_tiff, write_ome_zarr

    (d / "f").mkdir()
    tifffile.imwrite(d / "f" / "dapi.tif", data[1], metadata={"axes": "ZYX"})
    tifffile.imwrite(d / "h.tif", data.transpose(1, 0, 2, 3), imagej=True,
                     metadata={"axes": "ZCYX", "Labels": ["BF", "DAPI"] * data.shape[1]})
    write_ome_tiff(d / "a.ome.tif", data[None], ["BF", "DAPI"], (0.65, 0.65))
    write_ome_zarr(d / "a.ome.zarr", data[None], ["BF", "DAPI"], (0.65, 0.65))
    with pyczi.create_czi(str(d / "a.czi"), exist_ok=True) as w:
        for c in range(data.shape[0]):
            for z in range(data.shape[1]):
                w.write(data[c, z][..., None], plane={"C": c, "Z": z, "T": 0})
        w.write_metadata(channel_names={0: "BF", 1: "DAPI"}, scale_x=0.65e-6, scale_y=0.65e-6)
    return {"tiff_per_channel": (d / "f" / "dapi.tif", {}), "imagej_hyperstack": (d / "h.tif", {"channel": "DAPI"}),
            "ome_tiff": (d / "a.ome.tif", {"channel": "DAPI"}), "ome_zarr": (d / "a.ome.zarr", {"channel": "DAPI"}),
            "czi": (d / "a.czi", {"channel": "DAPI"})}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--planes", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from islkeras.config import ChannelSpec
    from islkeras.data import tiff

    data = np.random.default_rng(0).integers(0, 4000, (2, args.planes, args.size, args.size)).astype(np.uint16)
    res = {"benchmark": "formats", "python": platform.python_version(), "field": list(data.shape), "dtype": "uint16",
           "reps": args.reps, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_all(Path(tmp), data)
        for name, (path, kw) in files.items():
            spec = ChannelSpec(file=path.name, **kw)
            got = tiff.read_channel(path, spec, "f", "dapi")
            assert np.array_equal(got, np.moveaxis(data[1], 0, -1)), name
            res["formats"][name] = {
                "header_s": median_time(lambda: tiff.read_header(path, "f", "dapi", spec), args.reps),
                "read_s": median_time(lambda: tiff.read_channel(path, spec, "f", "dapi"), args.reps)}
    ref = res["formats"]["tiff_per_channel"]
    for v in res["formats"].values():
        v["read_vs_tiff"] = round(v["read_s"] / ref["read_s"], 2)
        v["header_vs_tiff"] = round(v["header_s"] / ref["header_s"], 2)
        v["read_s"], v["header_s"] = round(v["read_s"], 4), round(v["header_s"], 4)
    emit(res, args.out)


if __name__ == "__main__":
    main()
