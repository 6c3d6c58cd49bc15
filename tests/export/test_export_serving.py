"""``islkeras export``: run folder -> ``MODEL_BASE/<name>/<version>/`` that TF Serving and ``islkeras serve`` load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from islkeras.cli import cli

META = {"kind": "isl", "inputs": ["transmitted"], "targets": ["nuclei"], "input_dtype": "uint8",
        "normalization": {"method": "zscore", "percentiles": [1, 99.8], "input_dataset": None},
        "target_scale": {"offset": [10.0], "scale": [5.0]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, experiments_dir):
    """A run folder as `islkeras fit` leaves it: config.json + savedmodel/ (a tiny plain U-Net)."""
    import tensorflow as tf

    from islkeras.config import ModelConfig, load_config
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator

    cfg = load_config(experiments_dir / "demo.json")
    run = tmp_path_factory.mktemp("runs") / cfg.name / "20250101-120000"
    run.mkdir(parents=True)
    cfg.save(run / "config.json")
    tf.keras.utils.set_random_seed(0)
    model = build_generator(ModelConfig(architecture="unet", unet_filters=8, unet_depth=3), 1, 1)
    export_savedmodel(model, run / "savedmodel", dict(META, config_hash=cfg.hash()))
    return run, cfg


def _export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)], catch_exceptions=False)


def test_export_versions_and_metadata(run, tmp_path):
    from islkeras.models.savedmodel import ExportedModel, read_meta

    run_dir, cfg = run
    base = tmp_path / "models"
    res = _export(run_dir, "--out", base)
    assert res.exit_code == 0, res.output
    v1 = base / cfg.name / "1"
    assert (v1 / "saved_model.pb").is_file() and (v1 / "variables").is_dir()
    for cmd in ("saved_model_cli show --all --dir", "tensorflow_model_server --rest_api_port=8501",
                f"--model_name={cfg.name}", "docker run", "tensorflow/serving", "islkeras serve"):
        assert cmd in res.output, (cmd, res.output)
    meta = read_meta(v1)
    assert meta["config_hash"] == cfg.hash() and meta["config_name"] == cfg.name
    assert meta["model_name"] == cfg.name and meta["model_version"] == 1
    assert meta["inputs"] == ["transmitted"] and meta["input_dtype"] == "uint8"

    # default version: highest + 1; explicit version; an existing one is refused unless --overwrite
    assert _export(run_dir, "--out", base).exit_code == 0
    assert (base / cfg.name / "2").is_dir()
    assert _export(run_dir, "--out", base, "--version", 7, "--name", "nuclei").exit_code == 0
    assert (base / "nuclei" / "7").is_dir()
    assert _export(run_dir, "--out", base, "--name", "nuclei").exit_code == 0
    assert (base / "nuclei" / "8").is_dir()
    res = _export(run_dir, "--out", base, "--version", 7, "--name", "nuclei")
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    assert _export(run_dir, "--out", base, "--version", 7, "--name", "nuclei", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (base / "nuclei").iterdir()) == ["7", "8"]  # no temporary folders left

    # the exported copy predicts exactly like the run's SavedModel
    x = np.random.default_rng(0).integers(0, 256, (1, 37, 50, 1), dtype=np.uint8)
    a, b = ExportedModel(run_dir), ExportedModel(base / "nuclei" / "7")
    np.testing.assert_array_equal(a.predict_raw(x), b.predict_raw(x))


def test_export_errors(run, tmp_path):
    run_dir, _ = run
    base = tmp_path / "models"
    res = _export(run_dir, "--out", base, "--name", "bad/name")
    assert res.exit_code == 1 and "model name" in res.output
    # a bare SavedModel (no run config beside it, no name in its metadata) needs --name
    from islkeras.models.savedmodel import copy_savedmodel

    bare = copy_savedmodel(run_dir / "savedmodel", tmp_path / "elsewhere" / "sm")
    res = _export(bare, "--out", base)
    assert res.exit_code == 1 and "--name" in res.output
    assert _export(bare, "--out", base, "--name", "bare").exit_code == 0
    assert json.loads((base / "bare" / "1" / "assets" / "islkeras.json").read_text())["model_name"] == "bare"
    res = _export(tmp_path, "--out", base, "--name", "x")
    assert res.exit_code == 1 and "not a run folder or SavedModel" in res.output


def test_saved_model_cli_lists_serving_signature(run, tmp_path):
    run_dir, cfg = run
    base = tmp_path / "models"
    assert _export(run_dir, "--out", base).exit_code == 0
    cli_bin = Path(sys.executable).with_name("saved_model_cli")
    if not cli_bin.exists():
        pytest.skip("saved_model_cli is not installed beside this Python")
    out = subprocess.run([str(cli_bin), "show", "--all", "--dir", str(base / cfg.name / "1")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    sig = text[text.index("signature_def['serving_default']"):]
    assert "inputs['image'] tensor_info:" in sig and "dtype: DT_UINT8" in sig
    assert "shape: (-1, -1, -1, 1)" in sig
    assert "outputs['prediction'] tensor_info:" in sig and "dtype: DT_FLOAT" in sig
    assert "Method name is: tensorflow/serving/predict" in sig
    assert "Traceback" not in out.stderr
