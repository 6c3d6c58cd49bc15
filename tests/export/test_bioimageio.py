"""islkeras export --format bioimageio: the package's content, `bioimageio test` on it in a separate process
(no TF_USE_LEGACY_KERAS, no network), the spec's preprocessing against islkeras's normalisation, bad input.

The runs are run folders as `islkeras fit` (demo config, synthetic data) and `islkeras transfer` leave them --
config.json, records, savedmodel/ with the real export metadata, summary.json -- around tiny untrained U-Nets:
training would add a minute and change nothing the export reads.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from islkeras.errors import UserError
from testkit import require_extra

pytestmark = pytest.mark.bioimageio
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _bioimageio_installed():
    require_extra("bioimageio", "bioimageio.core")


# ------------------------------------------------------------------------------------------- runs
def _run_folder(cfg, run_dir: Path, meta: dict, activation: str, summary: dict, seed: int, depth=3) -> Path:
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator
    from islkeras.training.run import save_run_config

    tf.keras.utils.set_random_seed(seed)
    mcfg = ModelConfig(architecture="unet", unet_filters=8, unet_depth=depth)
    model = build_generator(mcfg, 1, 1, activation)
    run_dir.mkdir(parents=True)
    save_run_config(cfg, run_dir)
    export_savedmodel(model, run_dir / "savedmodel", meta)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"demo": ISL run of experiments/demo.json on 5 synthetic 128 px fields, "seg": its transfer run}."""
    import pandas as pd

    from islkeras.config import from_dict
    from islkeras.data.records import ensure_records
    from islkeras.data.synthetic import write_synthetic
    from islkeras.evaluation.metrics import summarize
    from islkeras.training.fit import export_meta

    base = tmp_path_factory.mktemp("bmz")
    d = json.loads((PROJECT / "experiments" / "demo.json").read_text())
    d["data"].update(root=str(base / "data"), records=str(base / "records"))
    d["training"]["runs_dir"] = str(base / "runs")
    d["model"]["unet_filters"] = 8
    write_synthetic(base / "data", n_fields=5, size=128, seed=0)
    cfg = from_dict(d, base_dir=base)
    manifest = ensure_records(cfg)
    demo = _run_folder(cfg, base / "runs" / "demo" / "20250101-000000", export_meta(cfg, manifest), "linear",
                       {"name": "demo", "epochs": 4, "stopped": "epochs", "monitor": "val_pcc",
                        "best": 0.6543, "best_epoch": 3}, seed=0)
    # what `islkeras evaluate RUN --split test` writes, with known numbers
    df = pd.DataFrame({"field": ["field_001", "field_001"], "image": ["a", "b"], "channel": ["nuclei"] * 2,
                       "pcc": [0.75, 0.85], "ssim": [0.5, 0.7], "empty": [False, False]})
    (demo / "evaluate" / "test").mkdir(parents=True)
    (demo / "evaluate" / "test" / "summary.json").write_text(json.dumps(
        {"split": "test", "n_images": 2, "mode": "whole fields", "metrics": summarize(df)}))
    seg_cfg = copy.deepcopy(cfg)
    seg_cfg.name, seg_cfg.data.targets = "demo_seg", ["mask"]
    meta = export_meta(seg_cfg, manifest)  # as islkeras.segmentation.transfer stores it
    meta.update(kind="segmentation", targets=["mask"], threshold=0.5, isl_run=str(demo),
                init="all_calibrated", train_fields=["field_002"])
    seg = _run_folder(seg_cfg, base / "runs" / "demo_seg" / "20250101-000000", meta, "sigmoid",
                      {"name": "demo_seg", "kind": "segmentation", "epochs": 1, "stopped": "epochs",
                       "monitor": "val_iou", "best": 0.31, "best_epoch": 1, "test_iou": 0.4321,
                       "test_iou_std": 0.0123, "test_pixel_accuracy": 0.9012}, seed=1, depth=2)
    return {"demo": demo, "seg": seg, "base": base, "cfg": cfg}


@pytest.fixture(scope="module")
def packages(runs):
    """The demo run exported through the CLI, the transfer run through export(); (zip, CLI output)."""
    from islkeras.cli import cli
    from islkeras.export.bioimageio import export

    out = runs["base"] / "packages"
    r = CliRunner().invoke(cli, ["export", str(runs["demo"]), "--format", "bioimageio",
                                 "--out", str(out / "demo.zip")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    seg_zip, seg_msg = export(runs["seg"], out / "seg.zip")
    return {"demo": (out / "demo.zip", r.output), "seg": (seg_zip, seg_msg)}


def _rdf(zip_path: Path) -> dict:
    import yaml

    with zipfile.ZipFile(zip_path) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


def _npy(zip_path: Path, name: str) -> np.ndarray:
    with zipfile.ZipFile(zip_path) as z:
        return np.load(io.BytesIO(z.read(name)))


# ------------------------------------------------------------------------------------------- content
def test_demo_package_content(packages, runs, tmp_path, bioimageio_test):
    """(``bioimageio_test`` only starts the `bioimageio test` processes: they run while these tests do.)"""
    import tensorflow as tf
    import tifffile
    from PIL import Image

    from islkeras.models.savedmodel import ExportedModel

    zpath, output = packages["demo"]
    assert f"-> {zpath.resolve()}" in output and f"bioimageio test {zpath.resolve()}" in output
    rdf = _rdf(zpath)
    assert rdf["format_version"] == "0.5.12" and rdf["type"] == "model"
    assert rdf["name"] == "demo (transmitted to nuclei)" and rdf["version"] == "1.0.0"
    assert rdf["documentation"]["source"] == "README.md" and rdf["covers"][0]["source"] == "cover.png"
    assert {"in-silico-labeling", "nuclei", "tensorflow", "deepimagej", "2d"} <= set(rdf["tags"])
    assert rdf["cite"][0]["doi"] == "10.1016/j.cell.2018.03.040"
    ipt, opt = rdf["inputs"][0], rdf["outputs"][0]
    assert [a["type"] for a in ipt["axes"]] == ["batch", "space", "space", "channel"]
    assert ipt["axes"][1] == {"type": "space", "id": "y", "size": {"min": 32, "step": 32}}
    assert ipt["axes"][3]["channel_names"] == ["transmitted"]
    assert opt["axes"][3]["channel_names"] == ["nuclei"]
    assert opt["axes"][2]["size"] == {"tensor_id": "image", "axis_id": "x"}
    assert ipt["data"]["type"] == "float32" and opt["data"]["type"] == "float32"
    assert [p["id"] for p in ipt["preprocessing"]] == ["ensure_dtype", "zero_mean_unit_variance",
                                                       "ensure_dtype"]
    assert ipt["preprocessing"][1]["kwargs"]["axes"] == ["y", "x"]
    meta = json.loads((runs["demo"] / "savedmodel" / "assets" / "islkeras.json").read_text())
    k = opt["postprocessing"][0]["kwargs"]
    assert opt["postprocessing"][0]["id"] == "scale_linear" and k["axis"] == "channel"
    np.testing.assert_allclose(k["gain"], meta["target_scale"]["scale"], rtol=1e-6)
    np.testing.assert_allclose(k["offset"], meta["target_scale"]["offset"], rtol=1e-6)
    w = rdf["weights"]["tensorflow_saved_model_bundle"]
    assert w["tensorflow_version"] == tf.__version__ and w["source"].endswith(".zip")

    # test input: the raw pixels of a crop of the first test field; test output: the run's SavedModel on it
    s = rdf["config"]["islkeras"]["sample"]
    src = tifffile.imread(runs["base"] / "data" / s["field"] / "transmitted.tif")
    x = _npy(zpath, "test_input.npy")
    assert s["split"] == "test" and x.dtype == np.uint16 and x.shape == (1, s["size"], s["size"], 1)
    np.testing.assert_array_equal(x[0, ..., 0], src[s["y"]:s["y"] + s["size"], s["x"]:s["x"] + s["size"]])
    run_model = ExportedModel(runs["demo"] / "savedmodel")
    y = _npy(zpath, "test_output.npy")
    assert y.shape == (1, s["size"], s["size"], 1) and y.dtype == np.float32
    assert np.abs(y - run_model.predict_raw(x)).max() < 1e-3
    # the packaged SavedModel is the bare network: the run's `normalized` signature on normalised input
    with zipfile.ZipFile(zpath) as z:
        z.extract(w["source"], tmp_path)
    with zipfile.ZipFile(tmp_path / w["source"]) as z:
        assert "saved_model.pb" in z.namelist()
        z.extractall(tmp_path / "sm")
    packaged = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    xn = run_model.normalize(x[0])[None]
    diff = packaged(image=tf.constant(xn))["prediction"].numpy() - run_model.predict_normalized(xn)
    assert np.abs(diff).max() < 1e-6
    # sample TIFFs, cover (2:1), README with the run's metrics
    with zipfile.ZipFile(zpath) as z:
        np.testing.assert_array_equal(tifffile.imread(io.BytesIO(z.read("sample_input.tif"))), x[0, ..., 0])
        np.testing.assert_array_equal(tifffile.imread(io.BytesIO(z.read("sample_output.tif"))), y[0, ..., 0])
        assert Image.open(io.BytesIO(z.read("cover.png"))).size == (800, 400)
        readme = z.read("README.md").decode()
    assert "\n# Validation\n" in readme
    assert "| nuclei | pcc | 0.800 ± 0.050 (n=2) |" in readme
    assert "| nuclei | ssim | 0.600 ± 0.100 (n=2) |" in readme
    assert "best val_pcc 0.6543 at epoch 3" in readme and "`zero_mean_unit_variance` over `y, x`" in readme


def test_segmentation_package_content(packages, runs):
    zpath, message = packages["seg"]
    rdf = _rdf(zpath)
    opt = rdf["outputs"][0]
    assert opt["axes"][3]["channel_names"] == ["mask"]
    assert opt["data"] == {"type": "float32", "range": [0.0, 1.0]}
    assert [p["id"] for p in opt["postprocessing"]] == ["ensure_dtype"]  # probabilities: nothing to map back
    assert "semantic-segmentation" in rdf["tags"] and "in-silico-labeling" not in rdf["tags"]
    y = _npy(zpath, "test_output.npy")
    assert 0.0 <= y.min() and y.max() <= 1.0
    with zipfile.ZipFile(zpath) as z:
        readme = z.read("README.md").decode()
    assert "Test IoU of the thresholded probability" in readme and "0.432 ± 0.012" in readme
    assert "thresholds it at 0.5" in readme and f"bioimageio test {zpath.resolve()}" in message


def test_sample_field_from_tiffs_without_records_and_from_records_without_tiffs(runs):
    """The test tensors come from the first test field: read from its TIFF files, from the TIFF folder alone
    (records deleted) or from the records alone (TIFF folder moved) -- the same pixels each time."""
    from islkeras.export.bioimageio_files import sample_field

    cfg = runs["cfg"]
    name, split, arrays = sample_field(cfg, ["transmitted", "nuclei"])
    no_records, no_tiffs = copy.deepcopy(cfg), copy.deepcopy(cfg)
    no_records.data.records = str(runs["base"] / "no_records")
    no_tiffs.data.root = str(runs["base"] / "moved")
    for c in (no_records, no_tiffs):
        n, sp, a = sample_field(c, ["transmitted", "nuclei"])
        assert (n, sp) == (name, split) == ("field_001", "test")
        for ch in ("transmitted", "nuclei"):
            np.testing.assert_array_equal(a[ch], arrays[ch])
    both = copy.deepcopy(no_records)
    both.data.root = no_tiffs.data.root
    with pytest.raises(UserError, match="no field of the run's data to take the test tensors from"):
        sample_field(both, ["transmitted"])


def _core_processing(rdf: dict, root: Path):
    """bioimageio.core's own pre/postprocessing callables for ``rdf`` (files under ``root``)."""
    from bioimageio.core.proc_setup import get_pre_and_postprocessing
    from bioimageio.spec import InvalidDescr, ValidationContext, build_description

    descr = build_description(rdf, context=ValidationContext(root=root, perform_io_checks=False))
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.errors
    return get_pre_and_postprocessing(descr, dataset_for_initial_statistics=[])


@pytest.mark.parametrize("method", ["zscore", "percentile", "minmax", "dataset"])
def test_spec_preprocessing_is_islkeras_normalisation(packages, tmp_path, method):
    """Each islkeras method, written as the spec's operation, is what bioimageio.core computes."""
    from bioimageio.core import Sample, Tensor

    from islkeras.data import normalize as N
    from islkeras.export.bioimageio import postprocessing, preprocessing

    zpath, _ = packages["demo"]
    with zipfile.ZipFile(zpath) as z:
        z.extractall(tmp_path)
    rdf = _rdf(zpath)
    x = _npy(zpath, "test_input.npy")
    norm = {"method": method, "percentiles": [2.0, 99.5],
            "input_dataset": {"offset": [1234.5], "scale": [321.0]}}
    meta = {"kind": "isl", "normalization": norm, "target_scale": {"offset": [7.0], "scale": [3.0]}}
    rdf["inputs"][0]["preprocessing"] = preprocessing(meta)
    rdf["outputs"][0]["postprocessing"] = postprocessing(meta)
    proc = _core_processing(rdf, tmp_path)
    dims = ("batch", "y", "x", "channel")
    sample = Sample(members={"image": Tensor.from_numpy(x, dims=dims)}, stat={}, id="t")
    proc.pre(sample)
    got = sample.members["image"].data.values
    off, sc = N.offset_scale_of_image(x[0], method, norm["percentiles"], norm["input_dataset"])
    np.testing.assert_allclose(got[0], N.normalize_np(x[0], off, sc), atol=2e-5, rtol=1e-5)
    y = np.linspace(-2, 2, 64, dtype=np.float32).reshape(1, 8, 8, 1)
    out = Sample(members={"prediction": Tensor.from_numpy(y, dims=dims)}, stat={}, id="t")
    proc.post(out)
    np.testing.assert_allclose(out.members["prediction"].data.values, y * 3.0 + 7.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------- bioimageio test
def _with_altered_output(src: Path, dst: Path, delta: float) -> Path:
    """A copy of the package whose test output is shifted by ``delta`` (its sha256 in rdf.yaml updated, so the
    format is still valid and only the reproduction can fail)."""
    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO()
    np.save(buf, np.load(io.BytesIO(files["test_output.npy"])) + np.float32(delta))
    old, new = (hashlib.sha256(b).hexdigest() for b in (files["test_output.npy"], buf.getvalue()))
    assert files["rdf.yaml"].count(old.encode()) == 1
    files["test_output.npy"] = buf.getvalue()
    files["rdf.yaml"] = files["rdf.yaml"].replace(old.encode(), new.encode())
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    return dst


class _Processes:
    """Processes started at once, waited for on first use: ``result(name) -> (returncode, output)``."""

    def __init__(self, procs: dict):
        self.procs, self.done = procs, {}

    def result(self, name: str) -> tuple[int, str]:
        if name not in self.done:
            out = self.procs[name].communicate(timeout=900)[0]
            self.done[name] = (self.procs[name].returncode, out)
        return self.done[name]


@pytest.fixture(scope="module")
def bioimageio_test(packages, tmp_path_factory):
    """`bioimageio test PACKAGE` as a user runs it, one process per package, all three started at once (the
    demo package, the transfer package, the demo package with its test output + 0.1) so they run beside the
    in-process tests: Keras 3 (no TF_USE_LEGACY_KERAS), no network (HTTP requests go to a closed port)."""
    base = tmp_path_factory.mktemp("bioimageio_test")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="", COLUMNS="200")
    exe = Path(sys.executable).with_name("bioimageio")
    zips = {"demo": packages["demo"][0], "seg": packages["seg"][0],
            "altered": _with_altered_output(packages["demo"][0], base / "altered.zip", 0.1)}
    procs = {}
    for name, z in zips.items():
        (base / name).mkdir()  # the cwd: it unpacks the weights into ./bioimageio_unzipped_tf_weights
        procs[name] = subprocess.Popen([str(exe), "test", str(z)], cwd=base / name, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield _Processes(procs)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


# ------------------------------------------------------------------------------------------- bad input
def _cli(*args):
    from islkeras.cli import cli

    return CliRunner().invoke(cli, ["export", *map(str, args)])


def _one_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    return lines[0]


def test_bad_input_one_line_and_nothing_written(runs, tmp_path):
    from testkit import make_run

    out = tmp_path / "out"
    no_sm = make_run(tmp_path / "runs" / "x" / "20250101-000000", runs["base"] / "data")
    line = _one_line(_cli(no_sm, "--format", "bioimageio", "--out", out / "m.zip"))
    assert f"{no_sm}: not a run folder or SavedModel (no saved_model.pb" in line
    (tmp_path / "empty").mkdir()
    assert "not a run folder or SavedModel" in _one_line(_cli(tmp_path / "empty", "--format", "bioimageio",
                                                              "--out", out / "m.zip"))
    r = _cli(runs["demo"], "--format", "bmz", "--out", out / "m.zip")
    assert r.exit_code == 2 and "Invalid value for '--format': 'bmz' is not one of" in r.output
    assert "a BioImage Model Zoo package is a .zip file" in _one_line(
        _cli(runs["demo"], "--format", "bioimageio", "--out", out / "m.bmz"))
    assert "--name 'a/b': 5 to 128 letters" in _one_line(
        _cli(runs["demo"], "--format", "bioimageio", "--out", out / "m.zip", "--name", "a/b"))
    assert not out.exists() or not any(out.iterdir())
    out.mkdir(exist_ok=True)
    (out / "m.zip").write_bytes(b"old")
    assert "m.zip already exists; pass --overwrite" in _one_line(
        _cli(runs["demo"], "--format", "bioimageio", "--out", out / "m.zip"))
    assert (out / "m.zip").read_bytes() == b"old"


class _ModelStub:
    """Stands in for the run's ExportedModel where only the packaging is under test (no 3 s model load)."""

    n_inputs = n_outputs = 1
    _obj = None

    def __init__(self, path):
        pass

    def predict_raw(self, batch):
        return np.zeros(batch.shape, np.float32)


def test_failure_while_packaging_leaves_no_partial_zip(runs, tmp_path, monkeypatch):
    from islkeras.export import bioimageio as B
    from islkeras.export import bioimageio_files as F
    from islkeras.models import savedmodel

    def disk_full(loaded, dst, *a):
        dst.write_bytes(b"half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(savedmodel, "ExportedModel", _ModelStub)
    monkeypatch.setattr(F, "write_weights", disk_full)
    (tmp_path / "m.zip").write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        B.export(runs["demo"], tmp_path / "m.zip", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zip"]  # no temporary folder or zip left
    assert (tmp_path / "m.zip").read_bytes() == b"old"


def test_missing_extra_names_it(runs, tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "bioimageio" or m.startswith("bioimageio.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "bioimageio", None)  # import bioimageio.spec -> ImportError
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    line = _one_line(_cli(runs["demo"], "--format", "bioimageio", "--out", tmp_path / "m.zip"))
    assert "--format bioimageio needs the 'bioimageio' extra" in line
    assert "pip install 'islkeras[bioimageio]'" in line
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------- results of bioimageio test
@pytest.mark.parametrize("name", ["demo", "seg"])
def test_bioimageio_test_passes(bioimageio_test, name):
    rc, out = bioimageio_test.result(name)
    assert rc == 0, out[-4000:]
    assert "status           passed" in out and "❌" not in out, out[-4000:]
    assert "✔️  weights.tensorflow_saved_model_bundle  Reproduce test outputs from test inputs" in out


def test_bioimageio_test_fails_when_the_test_output_is_off_by_0_1(bioimageio_test):
    rc, out = bioimageio_test.result("altered")
    assert rc == 1, out[-4000:]
    # the format is valid; what fails is the reproduction of the test output
    assert "status           valid-format" in out, out[-4000:]
    assert "❌  weights.tensorflow_saved_model_bundle  Reproduce test outputs from test inputs" in out
    assert "Output 'prediction': 16384 of 16384 elements disagree with expected values" in out
