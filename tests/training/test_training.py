"""Training modes (l1/l2, pix2pix, perceptual), callbacks, `islkeras fit` and its run folder."""
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
import tensorflow as tf
from click.testing import CliRunner

from islkeras.config import load_config
from islkeras.errors import ConfigError, DataError, UserError

from testkit import AISEG_CFG, PROJECT, small_cfg, small_overrides  # noqa: F401  (tests/testkit.py)
@pytest.fixture(scope="session")
def small_base(aiseg_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("isl_small")
    from islkeras.data.records import ensure_records

    ensure_records(small_cfg(base))
    return base


@pytest.fixture(scope="session")
def fixed_batch(aiseg_dir):
    """Four real 64x64 bright-field/nuclei crop pairs (z-scored per field)."""
    import tifffile

    def z(a):
        a = a.astype(np.float32)
        return (a - a.mean()) / a.std()

    bf = z(tifffile.imread(aiseg_dir / "fov_001" / "brightfield.tif"))
    nu = z(tifffile.imread(aiseg_dir / "fov_001" / "nuclei.tif"))
    # crops around nuclei (the brightest pixels), so the target is not flat
    ys, xs = np.unravel_index(np.argsort(nu.ravel())[-4000::1000], nu.shape)
    pos = [(min(max(y - 32, 0), 1024 - 64), min(max(x - 32, 0), 1024 - 64)) for y, x in zip(ys, xs)]
    x = np.stack([bf[y:y + 64, xx:xx + 64] for y, xx in pos])[..., None]
    y = np.stack([nu[y:y + 64, xx:xx + 64] for y, xx in pos])[..., None]
    return x, y


@pytest.fixture(scope="session")
def fitted_run(small_base):
    """One real `fit` (l1, plain U-Net) on the small records: the run folder."""
    from islkeras.training.fit import fit

    cfg = small_cfg(small_base, name="small_l1", **{"training.epochs": 3, "training.lr_schedule": "cosine"})
    summary = fit(cfg, verbose=0)
    return Path(summary["run_dir"]), summary


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _changed(before, model):
    return any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# ------------------------------------------------------------------------------------- training modes
@pytest.mark.parametrize("kind", ["l1", "l2", "pix2pix", "perceptual"])
def test_mode_loss_falls_on_real_crops(kind, small_base, fixed_batch):
    from islkeras.training.fit import build_training_model

    tf.keras.utils.set_random_seed(0)
    cfg = small_cfg(small_base, **{"loss.kind": kind, "training.learning_rate": 2e-3})
    model, generator = build_training_model(cfg, 1, 1)
    x, y = fixed_batch
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    g0 = _weights(generator)
    d0 = _weights(model.discriminator) if kind == "pix2pix" else None
    hist = model.fit(ds, steps_per_epoch=1, epochs=25, verbose=0).history
    first, last = np.mean(hist["loss"][:3]), np.mean(hist["loss"][-3:])
    assert last < 0.8 * first, (kind, hist["loss"])
    assert {"loss", "pcc", "pcc_std"} <= set(hist)
    assert _changed(g0, generator)
    if kind == "pix2pix":
        assert {"g_loss", "g_gan", "g_l1", "d_loss"} <= set(hist)
        assert _changed(d0, model.discriminator)  # both networks are updated
        assert hist["g_l1"][-1] < hist["g_l1"][0]
    if kind == "perceptual":
        assert {"content", "pixel", "tv"} <= set(hist)
        assert hist["content"][-1] < hist["content"][0]
    # validation runs the generator in inference mode: repeated evaluation gives identical numbers
    r1 = model.evaluate(tf.data.Dataset.from_tensors((x, y)), verbose=0, return_dict=True)
    r2 = model.evaluate(tf.data.Dataset.from_tensors((x, y)), verbose=0, return_dict=True)
    assert r1 == r2 and r1["pcc"] > -1


def test_custom_steps_scale_losses_by_global_batch(small_base, fixed_batch):
    """compute_average_loss(global_batch_size): a step's loss does not depend on how a batch is split."""
    from islkeras.training.fit import build_training_model

    cfg = small_cfg(small_base, **{"loss.kind": "perceptual"})
    model, _ = build_training_model(cfg, 1, 1)
    x, y = fixed_batch
    per = model._terms(tf.constant(y), model.generator(x, training=False))["loss"]
    whole = model._average(per, training=True)  # global batch 4 = the batch
    halves = model._average(per[:2], training=True) + model._average(per[2:], training=True)
    assert float(whole) == pytest.approx(float(halves), rel=1e-5)


# ------------------------------------------------------------------------------------------ callbacks
def test_training_control_early_stopping_budget_and_resume(tmp_path):
    from islkeras.training.callbacks import TrainingControl, monitor_mode

    assert monitor_mode("val_pcc") == "max" and monitor_mode("val_loss") == "min"
    net = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mse")
    net.optimizer.build(net.trainable_variables)

    def control(**kw):
        c = TrainingControl(net, tmp_path / "state.json", tmp_path / "best.h5", epochs=20, steps_per_epoch=1,
                            monitor="val_pcc", patience=2, **kw)
        c.set_model(net)
        c.on_train_begin()
        return c

    c = control()
    values = [0.1, 0.3, 0.2, 0.25, 0.5]
    for e, v in enumerate(values):
        c.on_epoch_begin(e)
        net.layers[0].kernel.assign(np.full((2, 1), float(e), np.float32))
        c.on_epoch_end(e, {"val_pcc": v})
        if net.stop_training:
            break
    assert e == 3 and c.summary["stopped"] == "early_stopping"  # no improvement in epochs 3 and 4
    c.on_train_end()
    assert c.summary["best_epoch"] == 2 and c.summary["best"] == pytest.approx(0.3)
    assert np.all(net.layers[0].kernel.numpy() == 1.0)  # best weights restored

    # resumed at epoch 3 (epoch 3 is re-run): the state of epochs 0..2 carries on
    net.stop_training = False
    c2 = control()
    c2.on_epoch_begin(3)
    assert sorted(c2.entries) == [0, 1, 2]
    c2.on_epoch_end(3, {"val_pcc": 0.9})
    assert not net.stop_training and c2._recount()[1] == 3

    net.stop_training = False
    (tmp_path / "state.json").unlink()
    c3 = control(max_minutes=1e-6)
    c3.on_epoch_begin(0)
    c3.on_epoch_end(0, {"val_pcc": 0.1})
    assert net.stop_training and c3.summary["stopped"] == "max_minutes"


def test_cosine_schedule_anneals_with_steps_or_time(tmp_path):
    from islkeras.training.callbacks import TrainingControl

    net = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
    c = TrainingControl(net, tmp_path / "s.json", tmp_path / "b.h5", epochs=4, steps_per_epoch=10,
                        lr_schedule="cosine")
    c.set_model(net)
    c.on_train_begin()
    c.on_epoch_begin(2)
    c.on_train_batch_begin(0)
    assert float(net.optimizer.learning_rate.numpy()) == pytest.approx(5e-3, rel=1e-4)  # halfway
    c2 = TrainingControl(net, tmp_path / "s2.json", tmp_path / "b2.h5", epochs=4, steps_per_epoch=10,
                         lr_schedule="cosine", max_minutes=1.0, start_time=time.time() - 60.0)
    c2.set_model(net)
    c2.on_train_begin()
    c2.on_epoch_begin(0)
    assert float(net.optimizer.learning_rate.numpy()) < 1e-6  # the budget is used up: fully annealed


def test_batchnorm_recalibration_matches_data_statistics():
    from islkeras.training.callbacks import BatchNormRecalibration

    inp = tf.keras.Input((None, None, 1))
    bn = tf.keras.layers.BatchNormalization(momentum=0.99)
    net = tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 1)(bn(inp)))
    rng = np.random.default_rng(0)
    data = (5.0 + 2.0 * rng.normal(size=(40, 8, 8, 1))).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((data, data)).batch(4).repeat()
    cb = BatchNormRecalibration(net, ds, steps=10, momentum=0.5)
    assert cb.bns == [bn]
    cb.recalibrate()
    assert float(bn.moving_mean.numpy()[0]) == pytest.approx(5.0, abs=0.3)  # was 0 (momentum 0.99: ~0.5)
    assert float(bn.moving_variance.numpy()[0]) == pytest.approx(4.0, rel=0.25)
    assert bn.momentum == 0.99 and net.get_config()  # restored, still serialisable


# ---------------------------------------------------------------------------------------- fit + run dir
def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fit_writes_run_folder(fitted_run):
    from islkeras.models.savedmodel import load_exported
    from islkeras.training.run import load_run_config

    run_dir, summary = fitted_run
    assert run_dir.parent.name == "small_l1"
    for name in ("config.json", "history.csv", "summary.json", "savedmodel/saved_model.pb", "tb/train",
                 "tb/validation"):
        assert (run_dir / name).exists(), name
    rows = _history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0])[:2] == ["epoch", "loss"] and list(rows[0])[-1] == "lr"
    assert {"val_pcc", "val_pcc_std", "val_loss", "pcc"} <= set(rows[0])
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine schedule
    assert summary["epochs"] == 3 and summary["monitor"] == "val_pcc"
    assert summary["best"] == pytest.approx(max(float(r["val_pcc"]) for r in rows), abs=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["savedmodel"] == str(run_dir / "savedmodel")
    cfg = load_run_config(run_dir)
    assert cfg.name == "small_l1" and cfg.training.epochs == 3
    meta = load_exported(run_dir).meta
    assert meta["kind"] == "isl" and meta["loss"] == "l1" and meta["architecture"] == "unet"
    assert meta["config_hash"] == cfg.hash() and meta["input_dtype"] == "uint8"
    assert not (run_dir / "ckpt" / "backup").exists()  # finished: the backup is gone
    # TensorBoard scalars (scalar plugin metadata), one per epoch
    from tensorflow.core.util import event_pb2

    events = tf.data.TFRecordDataset([str(p) for p in (run_dir / "tb" / "validation").glob("events.out.*")])
    tags = {}
    for raw in events:
        ev = event_pb2.Event.FromString(raw.numpy())
        for v in ev.summary.value:
            assert v.metadata.plugin_data.plugin_name == "scalars"
            tags.setdefault(v.tag, []).append((ev.step, float(tf.make_ndarray(v.tensor))))
    assert [s for s, _ in tags["epoch_pcc"]] == [0, 1, 2]
    assert tags["epoch_pcc"][-1][1] == pytest.approx(float(rows[-1]["val_pcc"]), abs=1e-5)


def test_fit_again_into_finished_run_is_a_no_op(fitted_run):
    from islkeras.training.fit import fit
    from islkeras.training.run import load_run_config

    run_dir, summary = fitted_run
    before = (run_dir / "history.csv").read_text()
    again = fit(load_run_config(run_dir), resume=str(run_dir), verbose=0)
    assert again == summary and (run_dir / "history.csv").read_text() == before


def _env():
    env = dict(os.environ, ISLKERAS_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    return env


@pytest.mark.slow
def test_killed_fit_resumes_without_losing_or_repeating_epochs(small_base, tmp_path):
    """kill -9 after epoch k, then `fit --resume`: same epochs and history rows as an uninterrupted run."""
    sets = small_overrides(small_base, **{"name": "small_resume", "training.epochs": 5, "training.steps_per_epoch": 6,
                                          "training.lr_schedule": "cosine", "training.early_stopping.patience": 100})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "islkeras.cli", "fit", str(AISEG_CFG), "--run-dir", str(run_dir), *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "history.csv").is_file() and len(_history(run_dir)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    k = len(_history(run_dir))
    assert 2 <= k < 5 and not (run_dir / "summary.json").exists()
    res = subprocess.run([*cmd[:5], "--resume", str(run_dir), *args], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["epochs"] == 5 and s["stopped"] == "epochs" and "5 epochs" in res.stdout
    state = json.loads((run_dir / "ckpt" / "state.json").read_text())
    assert sorted(map(int, state["epochs"])) == [0, 1, 2, 3, 4]
    elapsed = [state["epochs"][str(e)]["elapsed_s"] for e in range(5)]
    assert elapsed == sorted(elapsed)  # wall time carries on across the resume
    # the uninterrupted run has the same number of epochs and rows
    from islkeras.training.fit import fit

    full = fit(load_config(AISEG_CFG, overrides=sets), run_dir=tmp_path / "full", verbose=0)
    assert full["epochs"] == 5 and len(_history(tmp_path / "full")) == 5
    assert list(_history(tmp_path / "full")[0]) == list(rows[0])


# ------------------------------------------------------------------------------------------ bad configs
def test_bad_configs_fail_before_training(small_base, tmp_path, monkeypatch):
    from islkeras.training.fit import fit

    with pytest.raises(ConfigError, match="loss.kind"):
        small_cfg(small_base, **{"loss.kind": "l3"})
    with pytest.raises(ConfigError, match="model.encoder_weights: no weights file"):
        small_cfg(small_base, **{"model.encoder_weights": str(tmp_path / "missing.h5")})
    with pytest.raises(ConfigError, match="loss.vgg_weights: no weights file"):
        small_cfg(small_base, **{"loss.kind": "perceptual", "loss.vgg_weights": str(tmp_path / "missing.h5")})

    runs = tmp_path / "runs"

    def fails(exc, match, **ov):
        cfg = small_cfg(small_base, **{"training.runs_dir": str(runs), **ov})
        with pytest.raises(exc, match=match):
            fit(cfg, verbose=0)
        assert not list(runs.rglob("history.csv"))  # nothing was trained

    # a target channel the records do not hold (records are not rebuilt for a channel that is not there)
    from islkeras.data.records import ensure_records

    real = ensure_records(small_cfg(small_base))
    monkeypatch.setattr("islkeras.data.records.ensure_records", lambda cfg, workers=None: real)
    fails(DataError, "target channel 'dapi' is not in the records",
          **{"data.channels": {"brightfield": {"file": "brightfield.tif"}, "nuclei": {"file": "nuclei.tif"},
                               "mask": {"file": "mask.tif"}, "dapi": {"file": "dapi.tif"}},
             "data.targets": ["dapi"]})
    monkeypatch.undo()
    fails(UserError, "loss.vgg_layers", **{"loss.kind": "perceptual", "loss.vgg_layers": ["block9_conv1"]})
    fails(DataError, "data.root: no such folder", **{"data.root": str(tmp_path / "nowhere"),
                                                     "data.records": str(tmp_path / "no_records")})


def test_cli_offline_imagenet_is_one_line(small_base, monkeypatch):
    from islkeras.cli import cli

    def fail(*a, **k):
        raise Exception("URL fetch failure on https://example/weights.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(tf.keras.utils, "get_file", fail)
    ov = small_overrides(small_base, **{"model.architecture": "unet_sm", "model.backbone": "resnet18",
                                        "model.encoder_weights": "imagenet"})
    args = [a for k, v in ov.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    res = CliRunner().invoke(cli, ["fit", str(AISEG_CFG), *args])
    assert res.exit_code == 1
    lines = [l for l in res.output.splitlines() if l.startswith("Error")]
    assert lines == ["Error: ImageNet weights for resnet18 could not be downloaded; use encoder_weights: null or a "
                     "local file"], res.output
    assert "Traceback" not in res.output


THESIS = ["hoechst_perceptual", "hoechst_l1", "hoechst_pix2pix", "dapi_l1", "dapi_pix2pix", "dapi_perceptual",
          "cy5_perceptual", "cellcycle_l1", "cellcycle_pix2pix", "cellcycle_perceptual", "unet_dapi_l1"]


@pytest.mark.parametrize("name", THESIS)
def test_thesis_configs_load_and_missing_data_is_clear(name, tmp_path, monkeypatch):
    from islkeras.training.fit import fit

    monkeypatch.setenv("ISLKERAS_THESIS_DATA", str(tmp_path / "not_here"))
    cfg = load_config(PROJECT / "experiments" / f"{name}.json")
    assert cfg.name == name and cfg.training.batch_size == 8 and cfg.pipeline.crop_size == 512
    assert cfg.model.architecture == ("unet" if name.startswith("unet_") else "unet_sm")
    if cfg.model.architecture == "unet_sm":
        assert cfg.model.backbone == "densenet121" and cfg.model.encoder_weights == "imagenet"
    if name.startswith("cellcycle"):
        assert cfg.data.targets == ["cy3", "gfp"]
    with pytest.raises(DataError, match="data.root: no such folder .*not_here"):
        fit(cfg, verbose=0)


@pytest.mark.parametrize("kind", ["l1", "pix2pix", "perceptual"])
def test_aiseg_configs_are_cpu_sized(kind):
    cfg = load_config(PROJECT / "experiments" / f"aiseg_nuclei_{kind}.json")
    assert cfg.loss.kind == kind and cfg.model.encoder_weights is None and cfg.pipeline.crop_size == 256
    assert cfg.training.max_minutes == 15 and cfg.training.early_stopping.monitor == "val_pcc"
