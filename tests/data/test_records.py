"""TIFF folders -> TFRecord shards + manifest (islkeras.data.records, `islkeras convert`)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from islkeras.config import from_dict, load_config
from islkeras.data import records
from islkeras.data.manifest import SHARD_RE, read_manifest
from islkeras.data.normalize import STAT_PERCENTILES
from islkeras.data.reader import load_fields
from islkeras.data.splits import assign_splits
from islkeras.data.synthetic import write_synthetic
from islkeras.errors import DataError

PROJECT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def aiseg(aiseg_dir, tmp_path_factory, experiments_dir):
    out = tmp_path_factory.mktemp("aiseg_records")
    cfg = load_config(experiments_dir / "aiseg_nuclei_l1.json",
                      overrides={"data.records": str(out), "data.root": str(aiseg_dir)})
    return cfg, records.convert(cfg, workers=2)


@pytest.fixture(scope="session")
def neurons(neurons_dir, tmp_path_factory, experiments_dir):
    out = tmp_path_factory.mktemp("neurons_records")
    cfg = load_config(experiments_dir / "isl_neurons_hoechst_l1.json",
                      overrides={"data.records": str(out), "data.root": str(neurons_dir)})
    return cfg, records.convert(cfg)


def synth_cfg(tmp_path, n_fields=6, size=64, shard_size=1, fractions=None, **data):
    root = tmp_path / "data"
    if not root.exists():
        write_synthetic(root, n_fields=n_fields, size=size, seed=3)
    d = {
        "root": str(root), "fields": "field_*",
        "channels": {"transmitted": {"file": "transmitted.tif"}, "nuclei": {"file": "nuclei.tif"},
                     "mask": {"file": "mask.tif"}},
        "inputs": ["transmitted"], "targets": ["nuclei"], "masks": ["mask"],
        "split": {"fractions": fractions or {"train": 1.0}},
        "records": str(tmp_path / "rec"), "shard_size": shard_size,
    }
    d.update(data)
    return from_dict({"name": "t", "data": d, "pipeline": {"crop_size": 32}}, base_dir=tmp_path, source="test")


def snapshot(folder: Path):
    if not folder.exists():
        return None
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def check_against_tiffs(cfg, manifest):
    """Every record read back equals the source TIFF pixels (region, planes, projection applied)."""
    for split in manifest["counts"]:
        for f in load_fields(cfg, split, manifest):
            meta = manifest["fields"][f.name]
            for ch, spec in cfg.data.channels.items():
                src = tifffile.imread(Path(cfg.data.root) / meta["field"] / spec.file)
                src = src[..., None] if src.ndim == 2 else np.moveaxis(src, 0, -1)
                if spec.planes != "all":
                    src = src[..., spec.planes]
                if spec.projection == "max":
                    src = src.max(-1, keepdims=True)
                if meta["region"]:
                    y0, y1, x0, x1 = meta["region"]
                    src = src[y0:y1, x0:x1]
                assert f.arrays[ch].dtype == src.dtype, (f.name, ch)
                np.testing.assert_array_equal(f.arrays[ch], src, err_msg=f"{f.name}/{ch}")


# ------------------------------------------------------------------------------------------- aiseg
def test_aiseg_counts_splits_and_channels(aiseg, aiseg_dir):
    cfg, m = aiseg
    assert m["counts"] == {"train": 18, "val": 4, "test": 4}
    with open(aiseg_dir / "fields.csv") as fh:
        want = {row["fov"]: row["split"] for row in csv.DictReader(fh)}
    assert {n: f["split"] for n, f in m["fields"].items()} == want
    assert m["channels"]["brightfield"] == {**m["channels"]["brightfield"], "dtype": "uint8", "planes": 1, "kind": "input"}
    assert m["channels"]["nuclei"]["kind"] == "target" and m["channels"]["mask"]["kind"] == "mask"
    # shards: shard_size 4 per split, names say which split and how many
    assert [s["file"].split("-of-")[0] for s in m["shards"]] == [
        "train-00000", "train-00001", "train-00002", "train-00003", "train-00004", "val-00000", "test-00000"]
    assert all(len(s["records"]) <= 4 for s in m["shards"])
    src = m["sources"]["fov_001/nuclei"]
    st = os.stat(aiseg_dir / "fov_001" / "nuclei.tif")
    assert (src["size"], src["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert json.loads((Path(cfg.data.records) / "manifest.json").read_text()) == m


def test_aiseg_records_pixel_exact(aiseg):
    check_against_tiffs(*aiseg)


def test_aiseg_manifest_stats_match_numpy(aiseg, aiseg_dir):
    from skimage.filters import threshold_otsu

    cfg, m = aiseg
    for name in ["fov_001", "fov_003", "fov_026"]:
        st = m["fields"][name]["stats"]
        for ch in ("brightfield", "nuclei", "mask"):
            a = tifffile.imread(aiseg_dir / name / f"{ch}.tif").astype(np.float64)
            s = st[ch]
            np.testing.assert_allclose(s["mean"], [a.mean()], rtol=1e-12)
            np.testing.assert_allclose(s["std"], [a.std()], rtol=1e-12)
            assert s["min"] == [a.min()] and s["max"] == [a.max()]
            np.testing.assert_allclose([s["percentiles"][f"{p:g}"][0] for p in STAT_PERCENTILES],
                                       np.percentile(a, STAT_PERCENTILES), rtol=1e-12)
            thr = 0.5 if ch == "mask" else threshold_otsu(a.astype(np.uint8))
            assert s["threshold"] == [pytest.approx(thr)]
            assert s["nonzero_fraction"] == [pytest.approx((a > thr).mean())]
    # pooled train statistics
    train = [n for n, f in m["fields"].items() if f["split"] == "train"]
    allpx = np.concatenate([tifffile.imread(aiseg_dir / n / "nuclei.tif").ravel() for n in train]).astype(np.float64)
    ds = m["dataset_stats"]["nuclei"]
    np.testing.assert_allclose(ds["mean"], [allpx.mean()], rtol=1e-9)
    np.testing.assert_allclose(ds["std"], [allpx.std()], rtol=1e-9)
    assert ds["n_fields"] == 18 and ds["n_pixels"] == allpx.size


def test_up_to_date_records_are_not_rewritten(aiseg):
    cfg, m = aiseg
    before = snapshot(Path(cfg.data.records))
    assert records.convert(cfg)["created"] == m["created"]
    assert records.ensure_records(cfg)["records_hash"] == m["records_hash"]
    assert snapshot(Path(cfg.data.records)) == before
    assert records.stale_reason(cfg, m) is None


# ------------------------------------------------------------------------------------------ neurons
def test_neurons_spatial_bands(neurons):
    cfg, m = neurons
    assert m["counts"] == {"train": 1, "val": 1, "test": 1}
    assert m["channels"]["phase"]["planes"] == 3 and m["channels"]["phase"]["dtype"] == "uint16"
    regions = [m["fields"][f"A4@{s}"]["region"] for s in ("train", "val", "test")]
    assert regions[0][0] == 0 and regions[-1][1] == 1024
    for a, b in zip(regions, regions[1:]):
        assert b[0] - a[1] == 32  # the margin separates neighbouring bands
    assert all(r[2:] == [0, 1024] for r in regions)
    check_against_tiffs(cfg, m)
    hoechst = tifffile.imread(Path(cfg.data.root) / "A4" / "hoechst.tif").astype(np.float64)
    y0, y1, _, _ = regions[1]
    np.testing.assert_allclose(m["fields"]["A4@val"]["stats"]["hoechst"]["mean"], [hoechst[y0:y1].mean()], rtol=1e-12)


# ----------------------------------------------------------------------------------- idempotency
def test_rerun_rewrites_only_changed_shards(tmp_path):
    cfg = synth_cfg(tmp_path, n_fields=4)
    m1 = records.convert(cfg)
    out = Path(cfg.data.records)
    s1 = snapshot(out)
    assert records.convert(cfg)["created"] == m1["created"] and snapshot(out) == s1
    # touch one source: only the shard holding that field is rewritten
    src = Path(cfg.data.root) / "field_002" / "nuclei.tif"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 5_000_000_000))
    assert records.stale_reason(cfg, m1).startswith("source")
    m2 = records.convert(cfg)
    s2 = snapshot(out)
    changed = {n for n in set(s1) | set(s2) if s1.get(n) != s2.get(n)}
    shard_of = {n: f["shard"] for n, f in m2["fields"].items()}
    old_shard = {n: f["shard"] for n, f in m1["fields"].items()}
    assert changed == {"manifest.json", old_shard["field_002"], shard_of["field_002"]}
    # --overwrite rewrites everything
    m3 = records.convert(cfg, overwrite=True)
    s3 = snapshot(out)
    assert all(s3[s["file"]][2] != s2[s["file"]][2] for s in m3["shards"])
    check_against_tiffs(cfg, m3)
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in m3["shards"]] + ["manifest.json"])


def test_fraction_split_is_seeded_and_covers_every_split(tmp_path):
    cfg = synth_cfg(tmp_path, n_fields=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    names = [f"field_{i:03d}" for i in range(10)]
    a = assign_splits(cfg, names)
    assert a == assign_splits(cfg, names)
    assert sorted(a.values()).count("train") == 6 and list(a.values()).count("val") == 2
    cfg.data.split.seed = 1
    assert assign_splits(cfg, names) != a
    small = assign_splits(cfg, names[:3])
    assert sorted(small.values()) == ["test", "train", "val"]


def test_csv_split_errors(tmp_path):
    cfg = synth_cfg(tmp_path, n_fields=3, split={"csv": "fields.csv:split"})
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\nfield_001,val\n")
    with pytest.raises(DataError, match=r"fields\.csv: no row for field\(s\) field_002"):
        records.convert(cfg)
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\nfield_001,val\nfield_002,test\nfield_009,test\n")
    with pytest.raises(DataError, match=r"lists field\(s\) field_009 .*no such folder"):
        records.convert(cfg)
    (tmp_path / "data" / "fields.csv").write_text("id,sp\nfield_000,train\n")
    with pytest.raises(DataError, match=r"no column 'split'"):
        records.convert(cfg)
    # a typo would make an unknown split (and no validation data), an empty cell would drop the field
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\nfield_001,valid\nfield_002,test\n")
    with pytest.raises(DataError, match=r"fields\.csv line 3 \(field field_001\): split 'valid' in column 'split'; "
                                        r"expected one of train, val, test"):
        records.convert(cfg)
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\nfield_001,val\nfield_002, \n")
    with pytest.raises(DataError, match=r"line 4 \(field field_002\): an empty split cell in column 'split'"):
        records.convert(cfg)
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\n,val\nfield_001,val\nfield_002,test\n,\n")
    with pytest.raises(DataError, match=r"fields\.csv line 3: no field name in column 'id'"):
        records.convert(cfg)
    assert not (tmp_path / "rec").exists()
    (tmp_path / "data" / "fields.csv").write_text("id,split\nfield_000,train\nfield_001,val\nfield_002,test\n,\n")
    assert assign_splits(cfg, ["field_000", "field_001", "field_002"]) == {  # a blank row is no row
        "field_000": "train", "field_001": "val", "field_002": "test"}


# ------------------------------------------------------------------------------------ bad inputs
def _missing(root):
    (root / "field_005" / "nuclei.tif").unlink()
    return r"field field_005: channel 'nuclei'.*no file matching .*field_005/nuclei\.tif"


def _shapes(root):
    tifffile.imwrite(root / "field_005" / "mask.tif", np.zeros((64, 60), np.uint8))
    return r"field field_005: channels have different shapes.*mask 64x60 \(mask\.tif\)"


def _truncated(root):
    p = root / "field_005" / "nuclei.tif"
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])
    return r"field field_005: channel 'nuclei': .*field_005/nuclei\.tif: unreadable or truncated TIFF"


def _nan(root):
    for i in range(6):
        p = root / f"field_{i:03d}" / "nuclei.tif"
        a = tifffile.imread(p).astype(np.float32)
        if i == 5:
            a[10, 20] = np.nan
        tifffile.imwrite(p, a)
    return r"field field_005: channel 'nuclei': .*field_005/nuclei\.tif: 1 NaN.*y=10, x=20"


def _zindex(root):
    return r"field field_000: channel 'nuclei': .*nuclei\.tif: z index 2 is beyond the stack, which has 1 plane"


def _empty(root):
    import shutil

    for p in root.iterdir():
        shutil.rmtree(p)
    return r"no field folders matching 'field_\*' in .*data"


BAD = {"missing": _missing, "shapes": _shapes, "truncated": _truncated, "nan": _nan, "zindex": _zindex,
       "empty": _empty}


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-good-records"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_clear_error_and_nothing_written(tmp_path, case, previous):
    from islkeras.data.records import convert_command

    cfg = synth_cfg(tmp_path)
    root, out = Path(cfg.data.root), Path(cfg.data.records)
    if previous:
        records.convert(cfg)
    before = snapshot(out)
    pattern = BAD[case](root)
    if case == "zindex":
        cfg.data.channels["nuclei"].planes = [2]
    with pytest.raises(DataError, match=pattern):
        records.convert(cfg)
    assert snapshot(out) == before
    # the command line: one-line error, exit 1, still nothing written
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    res = CliRunner().invoke(convert_command, [str(cfg_file)])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and "Traceback" not in res.output
    assert snapshot(out) == before


def test_interrupted_run_leaves_rollback_for_user_errors_midway(tmp_path):
    """A failure while writing (truncated last field) removes the shards this run already wrote."""
    cfg = synth_cfg(tmp_path)
    _truncated(Path(cfg.data.root))
    seen = []
    orig = records._publish

    def spy(tmp, final):
        orig(tmp, final)
        seen.append(final.name)

    records._publish = spy
    try:
        with pytest.raises(DataError):
            records.convert(cfg)
    finally:
        records._publish = orig
    assert len(seen) >= 3  # shards really were written before the error ...
    assert not Path(cfg.data.records).exists()  # ... and removed again


# ------------------------------------------------------------------------------------ kill -9
KILLER = r"""
import os, signal, sys
import islkeras.data.records as r
from islkeras.cli import main
mode, n = sys.argv[1], {"k": 0}
orig = r._publish
def publish(tmp, final):
    if mode == "before-rename" and n["k"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)   # the second shard is fully written under its temp name
    orig(tmp, final)
    n["k"] += 1
    if mode == "after-rename" and n["k"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
r._publish = publish
main(sys.argv[2:])
"""


def _env():
    return {**os.environ, "ISLKERAS_NO_PROGRESS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _count_records(path: Path) -> int:
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(str(path)))  # verifies every CRC


def _assert_incomplete_but_clean(cfg):
    out = Path(cfg.data.records)
    assert not (out / "manifest.json").exists()
    finals = [p for p in out.iterdir() if SHARD_RE.match(p.name)]
    for p in finals:  # anything under a final shard name is a complete shard
        assert _count_records(p) == cfg.data.shard_size
    return finals


@pytest.mark.parametrize("mode", ["after-rename", "before-rename"])
def test_killed_conversion_then_rerun_is_complete(tmp_path, mode):
    cfg = synth_cfg(tmp_path)
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    p = subprocess.run([sys.executable, "-c", KILLER, mode, "convert", str(cfg_file)], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    out = Path(cfg.data.records)
    finals = _assert_incomplete_but_clean(cfg)
    tmps = [q for q in out.iterdir() if q.name.endswith(".tmp")]
    if mode == "after-rename":
        assert len(finals) == 2
    else:
        assert len(finals) == 1 and len(tmps) == 1  # the written-but-unpublished shard kept its temp name
    assert records.stale_reason(cfg, None) == "no manifest"
    m = records.ensure_records(cfg)
    check_against_tiffs(cfg, m)
    assert sorted(q.name for q in out.iterdir()) == sorted([s["file"] for s in m["shards"]] + ["manifest.json"])


def test_kill9_from_outside_while_converting(tmp_path):
    """`islkeras convert` killed with SIGKILL at an arbitrary moment: never a complete-looking partial result."""
    cfg = synth_cfg(tmp_path, n_fields=24, size=256)
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    out = Path(cfg.data.records)
    proc = subprocess.Popen([sys.executable, "-m", "islkeras.cli", "convert", str(cfg_file)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and any(SHARD_RE.match(q.name) for q in out.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "manifest.json").exists():  # finished before the kill landed: then it must be complete
        m = read_manifest(out)
    else:
        _assert_incomplete_but_clean(cfg)
        m = records.convert(cfg)
    check_against_tiffs(cfg, m)


# ------------------------------------------------------------------------------------------- CLI
def test_convert_command_options(tmp_path):
    from islkeras.data.records import convert_command

    cfg = synth_cfg(tmp_path, n_fields=3)
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    alt = tmp_path / "alt"
    res = CliRunner().invoke(convert_command, [str(cfg_file), "--workers", "1", "--set", f"data.records={alt}",
                                               "--set", "data.shard_size=2"])
    assert res.exit_code == 0, res.output
    m = read_manifest(alt)
    assert m["shard_size"] == 2 and len(m["shards"]) == 2 and "3 records" in res.output
    res = CliRunner().invoke(convert_command, ["--help"])
    assert "Examples:" in res.output and "--overwrite" in res.output and "--data-root" in res.output
    res = CliRunner().invoke(convert_command, [str(cfg_file), "--data-root", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_ensure_records_converts_when_missing_or_stale(tmp_path):
    cfg = synth_cfg(tmp_path, n_fields=3)
    m1 = records.ensure_records(cfg)
    assert m1["counts"] == {"train": 3}
    cfg.data.channels["nuclei"].projection = "max"  # changes what the records hold
    assert "data section changed" in records.stale_reason(cfg, m1)
    m2 = records.ensure_records(cfg)
    assert m2["records_hash"] != m1["records_hash"]
    cfg.data.targets = ["mask"]  # inputs/targets do not: records are shared between configs
    assert records.stale_reason(cfg, m2) is None
    assert records.ensure_records(cfg)["channels"]["nuclei"]["kind"] == "other"
