"""Tests for islkeras.segmentation.masks, .classical, .cellpose and .mask_io: classical segmentation, image
reading, output files, the `masks` command, and the optional cellpose path (training from scratch offline,
reloading, offline/missing messages)."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from islkeras.segmentation.cellpose import find_training_pairs
from testkit import require_extra
from islkeras.segmentation.classical import ClassicalParams, segment_classical
from islkeras.segmentation.mask_io import INSTALL_HINT, OFFLINE_HINT, MasksError, read_image_2d, write_masks
from islkeras.segmentation.masks import masks_command
from islkeras.segmentation.metrics import average_precision, iou_binary


# dsb2018 images of 256 x 256 with >= 20 nuclei (cheap to train on)
DSB_SMALL = [
    "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
    "003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1",
]


def _require_cellpose():
    require_extra("cellpose", "cellpose.models")


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("ISLKERAS_NO_PROGRESS", "1")


def _discs(shape=(64, 100), centers=((32, 35), (32, 62)), r=15, value=200, dtype=np.uint8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape, dtype)
    for cy, cx in centers:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = value
    return img


# ------------------------------------------------------------------------------------------ classical
@pytest.mark.data
def test_classical_recovers_stardist_nuclei(data_dir):
    d = data_dir / "stardist-nuclei"
    img = tifffile.imread(d / "img2d.tif")
    true = tifffile.imread(d / "mask2d.tif")
    pred = segment_classical(img)
    assert pred.shape == img.shape and pred.dtype == np.int32
    r = average_precision(true, pred)
    # measured with the defaults: AP@0.5 = 0.573 (86 of 125 matched), pixel Jaccard 0.729. The misses are
    # dim nuclei next to very bright mitotic ones (one global threshold).
    assert r.ap >= 0.5, r
    assert r.n_pred >= 90
    assert iou_binary(pred > 0, true > 0) >= 0.65
    # labels are consecutive 1..N
    assert set(np.unique(pred)) == set(range(pred.max() + 1))


@pytest.mark.data
def test_classical_on_dsb2018_subset(data_dir):
    import pandas as pd

    d = data_dir / "dsb2018-nuclei"
    ids = pd.read_csv(d / "fields.csv")["id"][:8]
    aps = [average_precision(tifffile.imread(d / i / "labels.tif"),
                             segment_classical(tifffile.imread(d / i / "image.tif"))).ap for i in ids]
    assert np.mean(aps) >= 0.65, aps  # measured 0.751 on these 8 (0.753 on all 60)


def test_classical_splits_touching_nuclei():
    img = _discs()
    assert segment_classical(img).max() == 2
    assert segment_classical(img, ClassicalParams(split=False)).max() == 1
    # a fixed threshold on the normalised scale and a given radius work too
    assert segment_classical(img, ClassicalParams(threshold=0.5, radius=15)).max() == 2


def test_classical_edge_cases():
    assert segment_classical(np.zeros((40, 40), np.uint16)).max() == 0  # constant image
    assert segment_classical(np.full((40, 40), np.nan, np.float32)).max() == 0
    tiny = _discs(centers=((20, 20),), r=2)  # 12 px object < min_size 16
    assert segment_classical(tiny).max() == 0
    assert segment_classical(tiny, ClassicalParams(min_size=5)).max() == 1
    with pytest.raises(ValueError, match="2-D"):
        segment_classical(np.zeros((2, 8, 8)))


def test_classical_params_validation():
    assert ClassicalParams(threshold="0.3").threshold == 0.3
    assert ClassicalParams(threshold="Li").threshold == "li"
    with pytest.raises(ValueError, match="threshold"):
        ClassicalParams(threshold="bogus")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ClassicalParams(threshold=3.0)
    with pytest.raises(ValueError, match="percentiles"):
        ClassicalParams(percentiles=(99, 1))
    assert ClassicalParams().to_dict()["percentiles"] == [1.0, 99.8]


# ------------------------------------------------------------------------------------------------ I/O
def test_read_image_2d_channels(tmp_path):
    a = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    tifffile.imwrite(tmp_path / "cyx.tif", a, metadata={"axes": "CYX"})
    assert np.array_equal(read_image_2d(tmp_path / "cyx.tif", 1), a[1])
    with pytest.raises(ValueError, match="pass --channel"):
        read_image_2d(tmp_path / "cyx.tif")
    with pytest.raises(ValueError, match="out of range"):
        read_image_2d(tmp_path / "cyx.tif", 5)
    yxc = np.moveaxis(a, 0, -1).copy()
    tifffile.imwrite(tmp_path / "yxc.tif", yxc)  # no axes metadata: the short last axis is the channel
    assert np.array_equal(read_image_2d(tmp_path / "yxc.tif", 2), a[2])
    grey = np.repeat(a[0][..., None], 3, axis=-1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey_rgb.tif", grey, photometric="rgb")
    assert np.array_equal(read_image_2d(tmp_path / "grey_rgb.tif"), grey[..., 0])
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((13, 20, 30), np.uint16), metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="not a 2-D image"):
        read_image_2d(tmp_path / "z.tif")
    tifffile.imwrite(tmp_path / "plain.tif", a[0][None])  # singleton axis dropped
    assert read_image_2d(tmp_path / "plain.tif").shape == (20, 30)
    with pytest.raises(ValueError, match="2-D"):
        read_image_2d(tmp_path / "plain.tif", 1)


def test_write_masks_dtypes_and_no_temp_files(tmp_path):
    lab = np.zeros((10, 12), np.int32)
    lab[1:3, 1:3] = 1
    lab[5:8, 5:8] = 7
    lp, mp = write_masks(lab, tmp_path / "o", "x y")
    assert lp.name == "x y_labels.tif" and mp.name == "x y_mask.tif"
    lr, mr = tifffile.imread(lp), tifffile.imread(mp)
    assert lr.dtype == np.uint16 and np.array_equal(lr, lab)
    assert mr.dtype == np.uint8 and set(np.unique(mr)) == {0, 1} and np.array_equal(mr, lab > 0)
    big = lab.copy()
    big[big == 7] = 70000
    lp, _ = write_masks(big, tmp_path / "o", "big")
    assert tifffile.imread(lp).dtype == np.uint32 and tifffile.imread(lp).max() == 70000
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "big_labels.tif", "big_mask.tif", "x y_labels.tif", "x y_mask.tif"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_help_has_examples():
    r = CliRunner().invoke(masks_command, ["--help"])
    assert r.exit_code == 0
    assert "Examples:" in r.output and "--train-cellpose" in r.output and "--cellpose-model" in r.output


def test_cli_bad_file_among_good_ones(tmp_path):
    src = tmp_path / "in put"
    src.mkdir()
    tifffile.imwrite(src / "a b.tif", _discs())
    tifffile.imwrite(src / "c.tiff", _discs(centers=((20, 20), (40, 80))).astype(np.uint16) * 50)
    (src / "corrupt.tif").write_bytes(b"this is not a tiff at all")
    out = tmp_path / "out dir"
    r = CliRunner().invoke(masks_command, [str(src), str(tmp_path / "missing.tif"), "--out", str(out)])
    assert r.exit_code != 0
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 2, r.stderr
    assert any("corrupt.tif" in ln and "TIFF" in ln for ln in err_lines)
    assert any("missing.tif" in ln and "no such file" in ln for ln in err_lines)
    assert "Traceback" not in r.output
    for stem in ("a b", "c"):
        lab = tifffile.imread(out / f"{stem}_labels.tif")
        mask = tifffile.imread(out / f"{stem}_mask.tif")
        assert lab.shape == (64, 100) and lab.dtype == np.uint16 and lab.max() == 2
        assert mask.dtype == np.uint8 and np.array_equal(mask, lab > 0)
    assert not (out / "corrupt_labels.tif").exists()
    assert "wrote masks of 2 image(s)" in r.stdout


def test_cli_all_good_exit_zero_and_rerun_skips_outputs(tmp_path):
    tifffile.imwrite(tmp_path / "n.tif", _discs())
    r = CliRunner().invoke(masks_command, [str(tmp_path), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    # running again on the same folder does not segment the *_labels/*_mask outputs
    r = CliRunner().invoke(masks_command, [str(tmp_path), "--out", str(tmp_path)])
    assert r.exit_code == 0 and "wrote masks of 1 image(s)" in r.stdout


def test_cli_channel_and_shared_stems(tmp_path):
    a = np.stack([np.zeros((64, 100), np.uint8), _discs()])
    for k in ("f1", "f2"):
        (tmp_path / k).mkdir()
        tifffile.imwrite(tmp_path / k / "image.tif", a, metadata={"axes": "CYX"})
    r = CliRunner().invoke(masks_command, [str(tmp_path / "f1" / "image.tif"), str(tmp_path / "f2" / "image.tif"),
                                           "--channel", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    for k in ("f1", "f2"):
        assert tifffile.imread(tmp_path / "o" / f"{k}_image_labels.tif").max() == 2
    # without --channel: a one-line error naming the file, per file
    r = CliRunner().invoke(masks_command, [str(tmp_path / "f1"), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "image.tif" in r.stderr and "--channel" in r.stderr


def test_cli_usage_errors(tmp_path):
    r = CliRunner().invoke(masks_command, ["--out", str(tmp_path)])
    assert r.exit_code == 2 and "INPUT" in r.output
    tifffile.imwrite(tmp_path / "n.tif", _discs())
    r = CliRunner().invoke(masks_command, [str(tmp_path / "n.tif"), "--threshold", "wat", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "threshold" in r.output


def test_cli_cellpose_missing_says_pip_install(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "cellpose" or m.startswith("cellpose.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "cellpose", None)  # import cellpose -> ImportError
    monkeypatch.setitem(sys.modules, "cellpose.models", None)
    tifffile.imwrite(tmp_path / "n.tif", _discs())
    r = CliRunner().invoke(masks_command, [str(tmp_path / "n.tif"), "--method", "cellpose", "--out", str(tmp_path)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'islkeras[cellpose]'" in lines[0], r.output
    assert INSTALL_HINT in lines[0]


# ------------------------------------------------------------------------------------------- cellpose
@pytest.mark.cellpose
def test_cli_cellpose_offline_nuclei_is_one_line(tmp_path, monkeypatch):
    """No network here or under CI: force the download to fail the way urlopen does offline."""
    _require_cellpose()
    import urllib.error

    import cellpose.models
    import cellpose.utils

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cellpose.models, "MODEL_DIR", tmp_path / "empty cache")  # no cached weights
    monkeypatch.setattr(cellpose.utils, "download_url_to_file", offline)
    tifffile.imwrite(tmp_path / "n.tif", _discs())
    r = CliRunner().invoke(masks_command, [str(tmp_path / "n.tif"), "--method", "cellpose", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {OFFLINE_HINT} [URLError"), r.output
    assert "Name or service not known" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.cellpose
def test_cli_cellpose_model_not_found(tmp_path):
    _require_cellpose()
    tifffile.imwrite(tmp_path / "n.tif", _discs())
    r = CliRunner().invoke(masks_command, [str(tmp_path / "n.tif"), "--cellpose-model", str(tmp_path / "nope.pt"),
                                           "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: cellpose model file not found: {tmp_path / 'nope.pt'}"


def test_find_training_pairs_layouts(tmp_path):
    for k in ("a", "b"):
        (tmp_path / "dsb" / k).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "dsb" / k / "img.tif", np.zeros((8, 8), np.uint8))
        tifffile.imwrite(tmp_path / "dsb" / k / "lab.tif", np.zeros((8, 8), np.uint16))
    pairs = find_training_pairs([tmp_path / "dsb"], "img.tif", "lab.tif")
    assert [(p[0].parent.name, p[1].name) for p in pairs] == [("a", "lab.tif"), ("b", "lab.tif")]
    with pytest.raises(MasksError, match="--image-name"):
        find_training_pairs([tmp_path / "dsb"])  # default names image.tif/labels.tif are absent
    (tmp_path / "flat").mkdir()
    tifffile.imwrite(tmp_path / "flat" / "x 1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "flat" / "x 1_labels.tif", np.zeros((8, 8), np.uint16))
    assert find_training_pairs([tmp_path / "flat"]) == [(tmp_path / "flat" / "x 1.tif", tmp_path / "flat" / "x 1_labels.tif")]
    (tmp_path / "pairs.csv").write_text("image,labels\nflat/x 1.tif,flat/x 1_labels.tif\n")
    assert find_training_pairs([tmp_path / "pairs.csv"])[0][1] == tmp_path / "flat" / "x 1_labels.tif"


@pytest.fixture(scope="session")
def trained_cellpose_model(tmp_path_factory, data_dir):
    """A cellpose model trained from scratch (2 epochs, 2 dsb2018 images) through the CLI, once per session."""
    _require_cellpose()
    data = data_dir / "dsb2018-nuclei"
    root = tmp_path_factory.mktemp("cellpose")
    src = root / "train set"
    for i in DSB_SMALL:
        shutil.copytree(data / i, src / i)
    model = root / "models dir" / "nuclei scratch.cpmodel"
    r = CliRunner(env={"ISLKERAS_NO_PROGRESS": "1"}).invoke(
        masks_command, ["--train-cellpose", str(src), "--epochs", "2", "--batch-size", "2", "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert "saved cellpose model" in r.stdout
    assert not list(src.rglob("*_flows.tif"))  # cellpose must not write flows into the training data
    assert [p.name for p in model.parent.iterdir()] == [model.name]  # no temp files left
    return model


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.cellpose
def test_cellpose_trained_from_scratch_reloads_through_cli(trained_cellpose_model, data_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = tifffile.imread(data_dir / "dsb2018-nuclei" / DSB_SMALL[0] / "image.tif")
    tifffile.imwrite(src / "field 1.tif", img)
    (src / "broken.tif").write_bytes(b"II*\x00garbage")
    r = CliRunner().invoke(masks_command, [str(src), "--cellpose-model", str(trained_cellpose_model),
                                           "--out", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output  # the broken file fails, the good one is written
    assert "broken.tif" in r.stderr and "Traceback" not in r.output
    lab = tifffile.imread(tmp_path / "out" / "field 1_labels.tif")
    mask = tifffile.imread(tmp_path / "out" / "field 1_mask.tif")
    assert lab.shape == img.shape == (256, 256) and lab.dtype == np.uint16
    assert mask.shape == img.shape and mask.dtype == np.uint8 and np.array_equal(mask, lab > 0)
    # after 2 epochs from scratch the model finds little or nothing; the file must still load with
    # cellpose itself and carry the training set's nucleus size
    from cellpose import models

    m = models.CellposeModel(pretrained_model=str(trained_cellpose_model))
    assert m.diam_mean == pytest.approx(17.0) and 8.0 < float(m.diam_labels) < 40.0
