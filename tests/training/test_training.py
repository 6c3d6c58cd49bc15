"""Training modes (l1/l2, pix2pix, perceptual), callbacks, `islkeras fit` and its run folder."""
from __future__ import annotations

import contextlib
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
from islkeras.training.fit import training_callbacks as _TRAINING_CALLBACKS  # the unpatched one

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
    """Trainable weights only: BatchNorm moving statistics change on every training-mode forward pass."""
    return [w.numpy().copy() for w in model.trainable_weights]


def _changed(before, model):
    return any(not np.array_equal(a, b) for a, b in zip(before, _weights(model)))


def _inference_mode_check(kind, model, generator, x, y):
    """``evaluate`` runs the generator in inference mode: with BatchNorm moving statistics far from any
    batch's, its numbers are those of ``generator(x, training=False)``, not of training mode."""
    for bn in (m for m in generator.submodules if isinstance(m, tf.keras.layers.BatchNormalization)):
        bn.moving_mean.assign(bn.moving_mean + 2.0)
        bn.moving_variance.assign(bn.moving_variance * 9.0)
    r = model.evaluate(tf.data.Dataset.from_tensors((x, y)), verbose=0, return_dict=True)
    err = {True: None, False: None}
    for training in (False, True):  # training mode last: it moves the moving statistics
        d = y - generator(x, training=training).numpy()
        err[training] = float(np.mean(d ** 2)) if kind == "l2" else float(np.mean(np.abs(d)))
    key = {"l1": "loss", "l2": "loss", "pix2pix": "g_l1", "perceptual": "pixel"}[kind]
    assert r[key] == pytest.approx(err[False], rel=1e-4), (kind, r, err)
    assert abs(err[True] - err[False]) > 0.01 * err[False], err  # the two modes really differ here (>= 7 %)


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
        assert _changed(d0, model.discriminator)  # both networks are updated (trainable weights)
        assert abs(hist["d_loss"][-1] - hist["d_loss"][0]) > 1e-3, hist["d_loss"]
        assert hist["g_l1"][-1] < hist["g_l1"][0]
    if kind == "perceptual":
        assert {"content", "pixel", "tv"} <= set(hist)
        assert hist["content"][-1] < hist["content"][0]
    _inference_mode_check(kind, model, generator, x, y)


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


class Crash(Exception):
    """A stand-in for kill -9 at a known point (nothing after it runs, as after a kill)."""


class Probe(tf.keras.callbacks.Callback):
    """Last in the callback list: sees the state BackupAndRestore restored (``begin``), each epoch's state
    once its backup is written (``epoch_end``) and the state after the best weights were restored (``end``);
    ``crash_after=k`` raises ``Crash`` right after the backup of epoch k."""

    def __init__(self, crash_after=None):
        super().__init__()
        self.crash_after, self.first_epoch, self.begin, self.end, self.epoch_end = crash_after, None, None, None, {}

    def state(self):
        m = self.model
        nets = {"g": getattr(m, "generator", m), "d": getattr(m, "discriminator", None)}
        opts = {"g_opt": m.optimizer, "d_opt": getattr(m, "d_optimizer", None)}
        out = {k: [w.copy() for w in n.get_weights()] for k, n in nets.items() if n is not None}
        out.update({k: [v.numpy().copy() for v in o.variables] for k, o in opts.items() if o is not None})
        return out

    def on_train_begin(self, logs=None):
        self.begin = self.state()

    def on_epoch_begin(self, epoch, logs=None):
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end[epoch] = self.state()
        if self.crash_after == epoch + 1:
            raise Crash(f"after epoch {epoch + 1}")

    def on_train_end(self, logs=None):
        self.end = self.state()


def _same(a: dict, b: dict, keys):
    for k in keys:
        assert len(a[k]) == len(b[k]) > 0, k
        for u, v in zip(a[k], b[k]):
            np.testing.assert_array_equal(u, v, err_msg=k)


def _probed(monkeypatch, probes: list, crash_after=None):
    """``islkeras.training.fit.training_callbacks`` with a Probe appended (recorded in ``probes``)."""
    import islkeras.training.fit as F

    def patched(*a, **k):
        control, callbacks = _TRAINING_CALLBACKS(*a, **k)
        probes.append(Probe(crash_after))
        return control, callbacks + [probes[-1]]

    monkeypatch.setattr(F, "training_callbacks", patched)


def test_perceptual_fit_resumes_after_a_crash_and_exports_after_a_kill_during_export(small_base, tmp_path,
                                                                                      monkeypatch):
    """`fit` with loss.kind perceptual (random VGG) end to end: a crash after epoch 1, a resume that
    restores the checkpoint's weights and optimizer state and keeps epoch 1's history row, a kill during
    the export (training done), and a resume that exports without training again."""
    import islkeras.models.savedmodel as SM
    from islkeras.training.control import finished_training
    from islkeras.training.fit import fit

    cfg = small_cfg(small_base, name="small_perc", **{  # 32-pixel crops, one VGG layer: seconds, not minutes
        "loss.kind": "perceptual", "loss.vgg_layers": ["block1_conv2"], "pipeline.crop_size": 32,
        "training.steps_per_epoch": 2, "training.early_stopping.patience": 100})
    run = tmp_path / "run"
    probes: list = []
    _probed(monkeypatch, probes, crash_after=1)
    with pytest.raises(Crash):
        fit(cfg, run_dir=run, verbose=0)
    row1 = _history(run)
    assert [r["epoch"] for r in row1] == ["1"] and {"content", "pixel", "tv", "val_content"} <= set(row1[0])

    _probed(monkeypatch, probes)
    export = SM.export_savedmodel
    monkeypatch.setattr(SM, "export_savedmodel", lambda *a, **k: (_ for _ in ()).throw(Crash("in the export")))
    with pytest.raises(Crash, match="in the export"):
        fit(cfg, run_dir=run, verbose=0)
    first, second = probes
    assert second.first_epoch == 1  # resumed at epoch 2, from epoch 1's checkpoint
    _same(first.epoch_end[0], second.begin, ["g", "g_opt"])  # weights, BatchNorm statistics, Adam state
    assert int(second.begin["g_opt"][0]) == 2  # optimizer iterations: the 2 steps of epoch 1
    rows = _history(run)
    assert rows[0] == row1[0] and [r["epoch"] for r in rows] == ["1", "2"]
    assert not (run / "summary.json").exists() and finished_training(run / "ckpt" / "state.json")  # training done

    monkeypatch.setattr(SM, "export_savedmodel", export)
    s = fit(cfg, run_dir=run, verbose=0)
    assert len(probes) == 2  # no training: no callbacks built
    assert _history(run) == rows
    best = max(range(2), key=lambda e: float(rows[e]["val_pcc"]))
    assert (s["epochs"], s["steps"], s["steps_budget"], s["stopped"]) == (2, 4, 4, "epochs")
    assert s["best_epoch"] == best + 1 and s["best"] == pytest.approx(float(rows[best]["val_pcc"]), abs=1e-5)
    exported = tf.keras.models.load_model(str(run / "savedmodel"), compile=False)
    _same({"g": exported.get_weights()}, second.end, ["g"])  # the best epoch's weights, as reported
    assert s["loss"] == "perceptual" and json.loads((run / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["state.json"]  # cleaned up after the export


def test_pix2pix_resume_restores_discriminator_and_both_optimizers(small_base, fixed_batch, tmp_path):
    from islkeras.training.fit import build_training_model, training_callbacks

    cfg = small_cfg(small_base, **{"loss.kind": "pix2pix", "training.steps_per_epoch": 2,
                                   "training.early_stopping": None})
    ds = tf.data.Dataset.from_tensors(tuple(a[:, :32, :32] for a in fixed_batch)).repeat()

    def session(seed, crash_after=None):
        tf.keras.utils.set_random_seed(seed)  # another seed per session: only the checkpoint can agree
        model, generator = build_training_model(cfg, 1, 1)
        _, callbacks = training_callbacks(cfg.training, generator, tmp_path, tmp_path, "pcc", time.time(),
                                          tf.distribute.get_strategy(), True, ds)
        probe = Probe(crash_after)
        with contextlib.suppress(Crash):
            model.fit(ds, epochs=2, steps_per_epoch=2, callbacks=[*callbacks, probe], verbose=0)
        return probe

    first = session(0, crash_after=1)
    rows = _history(tmp_path)
    second = session(1)
    assert second.first_epoch == 1
    _same(first.epoch_end[0], second.begin, ["g", "d", "g_opt", "d_opt"])
    assert len(second.begin["d_opt"]) > 1 and int(second.begin["d_opt"][0]) == 2  # slots and iterations
    assert any(not np.array_equal(a, b) for a, b in zip(first.begin["d"], first.epoch_end[0]["d"]))
    assert _history(tmp_path)[0] == rows[0] and len(_history(tmp_path)) == 2


@pytest.mark.slow
def test_killed_fit_resumes_without_losing_or_repeating_epochs(small_base, tmp_path, monkeypatch, capsys):
    """kill -9 after epoch k, then `fit --resume`: the resumed run starts from the checkpoint's weights and
    optimizer state, keeps the finished epochs' history rows as they were, and ends with every epoch once."""
    from islkeras.training.fit import build_training_model, fit

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
    before = _history(run_dir)
    assert 2 <= len(before) < 5 and not (run_dir / "summary.json").exists()
    # the checkpoint, read back into a fresh model the way BackupAndRestore restores it
    cfg = load_config(AISEG_CFG, overrides=sets)
    tf.keras.utils.set_random_seed(7)
    model, _ = build_training_model(cfg, 1, 1)
    backup = tf.keras.callbacks.BackupAndRestore(str(run_dir / "ckpt" / "backup"))
    backup.set_model(model)
    backup.on_train_begin()
    ckpt = Probe()
    ckpt.set_model(model)
    ckpt = ckpt.state()

    probes: list = []
    _probed(monkeypatch, probes)
    s = fit(cfg, resume=str(run_dir), verbose=0)
    (probe,) = probes
    k = probe.first_epoch  # epochs the checkpoint holds (the kill may come after the row, before the backup)
    assert k >= 1 and k in (len(before), len(before) - 1)
    _same(ckpt, probe.begin, ["g", "g_opt"])
    rows = _history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"] and rows[:k] == before[:k]
    assert s["epochs"] == 5 and s["stopped"] == "epochs" and s["steps"] == 30
    assert "5 epochs, 30 steps (epochs)" in capsys.readouterr().out
    state = json.loads((run_dir / "ckpt" / "state.json").read_text())
    elapsed = [state["epochs"][str(e)]["elapsed_s"] for e in range(5)]
    assert elapsed == sorted(elapsed) and elapsed[k] > elapsed[k - 1]  # wall time carries on across the resume


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
    # records without val fields: the best epoch would silently be chosen on the training data
    import copy

    from islkeras.training.fit import check_monitor, logged_metrics, require_validation

    no_val = copy.deepcopy(real)
    for f in no_val["fields"].values():
        f["split"] = "test" if f["split"] == "val" else f["split"]
    no_val["counts"].pop("val")
    monkeypatch.setattr("islkeras.data.records.ensure_records", lambda cfg, workers=None: no_val)
    fails(DataError, r"have no val fields .*set training.validation: false to train without validation")
    unvalidated = small_cfg(small_base, **{"training.validation": False})
    assert require_validation(unvalidated, no_val) is False and require_validation(unvalidated, real) is False
    assert require_validation(small_cfg(small_base), real) is True
    assert check_monitor(unvalidated, "val_pcc", logged_metrics(unvalidated), False) == "pcc"
    monkeypatch.undo()
    # a misspelt early-stopping monitor would never improve: it fails before any data is read
    fails(ConfigError, r"training.early_stopping.monitor 'val_pc' is not logged by this run \(loss.kind 'l1'\); "
                       r"use one of val_loss, val_pcc, val_pcc_std, loss, pcc, pcc_std \(did you mean 'val_pcc'\?\)",
          **{"training.early_stopping.monitor": "val_pc"})
    fails(ConfigError, r"monitor 'val_g_l1' is not logged .*'l1'", **{"training.early_stopping.monitor": "val_g_l1"})
    p2p = small_cfg(small_base, **{"loss.kind": "pix2pix", "training.early_stopping.monitor": "val_g_l1"})
    assert check_monitor(p2p, "val_g_l1", logged_metrics(p2p), True) == "val_g_l1"  # what pix2pix logs
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


def _tiny_fields(cfg, root: Path) -> None:
    """Tiny random fields in the layout of ``cfg.data``: z-stacks where planes are picked or projected, a
    split CSV with a stratum column when the split is a CSV, one tall field for a spatial split."""
    import tifffile

    d, rng = cfg.data, np.random.default_rng(0)
    n = 1 if d.split.spatial else (4 if d.split.csv else 10)
    names = [d.fields.replace("*", f"{i:03d}") for i in range(n)]
    h = 352 if d.split.spatial else 64
    for name in names:
        for ch, spec in d.channels.items():
            planes = max(spec.planes) + 1 if isinstance(spec.planes, list) else (3 if spec.projection != "none" else 0)
            shape = (planes, h, 64) if planes else (h, 64)
            arr = (rng.random(shape) > 0.5).astype(np.uint8) if ch in d.masks else \
                rng.integers(0, 4000, shape).astype(np.uint16)
            (root / name).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / name / spec.file.replace("*", ""), arr)
    if d.split.csv:
        rel, col = d.split.csv.rsplit(":", 1)
        rows = [f"{n},{s},{g}" for n, s, g in zip(names, ["train", "train", "val", "test"], "ABAB")]
        (root / rel).write_text(f"{d.split.id_column or 'id'},{col},stratum\n" + "\n".join(rows) + "\n")


@pytest.fixture
def one_build_per_network(monkeypatch):
    """segmentation-models' U-Net built once per (backbone, channels, classes, ...) for the whole test (a
    DenseNet121 U-Net takes seconds to build), ImageNet weights replaced by random ones (offline here):
    every islkeras layer around it (the input adapter, discriminator, VGG, heads) is built for each config."""
    import segmentation_models as sm

    built, real = {}, sm.Unet

    def unet(backbone, encoder_weights=None, input_shape=None, classes=1, activation="linear", **kw):
        key = (backbone, input_shape, classes, activation, repr(sorted(kw.items())))
        if key not in built:
            built[key] = real(backbone, encoder_weights=None, input_shape=input_shape, classes=classes,
                              activation=activation, **kw)
        return built[key]

    monkeypatch.setattr(sm, "Unet", unet)
    import islkeras.models.vgg as V

    vggs, real_vgg = {}, V._vgg19  # VGG19 itself once too (each config still takes its own layers from it)
    monkeypatch.setattr(V, "_vgg19", lambda weights: vggs.setdefault(weights, real_vgg(weights)))
    return built


SHIPPED = sorted(p.stem for p in (PROJECT / "experiments").glob("*.json"))


def test_every_shipped_config_builds_its_model_and_pipeline_on_tiny_data(tmp_path, one_build_per_network):
    """Each config in experiments/: tiny fields in its channel layout -> records -> its training and
    validation pipelines -> its training model (generator, discriminator / VGG) -> one batch through it:
    shapes match the records' planes, losses are finite, its early-stopping monitor is one it logs."""
    from islkeras.config import to_dict
    from islkeras.data.pipeline import make_dataset
    from islkeras.data.records import ensure_records
    from islkeras.segmentation.isl_source import build_segmentation_model
    from islkeras.segmentation.transfer import SEG_METRICS
    from islkeras.training.fit import _channels, build_training_model, check_monitor, logged_metrics
    from islkeras.training.losses import pixel_loss

    def tiny(path, **extra):
        cfg = load_config(path, overrides=extra)
        root = tmp_path / cfg.name / "data"
        _tiny_fields(cfg, root)
        ov = {**extra, "data.root": str(root), "data.records": str(tmp_path / cfg.name / "records"),
              "pipeline.crop_size": 32, "training.runs_dir": str(tmp_path / "runs")}
        if cfg.loss.vgg_weights == "imagenet":
            ov["loss.vgg_weights"] = None  # offline: the same VGG19 layers, random weights
        return load_config(path, overrides=ov)

    checked, models = [], {}
    for name in SHIPPED:
        cfg = tiny(PROJECT / "experiments" / f"{name}.json")
        if cfg.transfer is not None:  # the few-image experiment: its ISL pretraining is checked below
            m = ensure_records(cfg)
            x, y = next(iter(make_dataset(cfg, "train", True, m, targets=[cfg.transfer.mask_channel])))
            isl = tiny(Path(cfg.transfer.pretrain), **cfg.transfer.pretrain_set)
            cfg.model = isl.model  # the experiment gives both arms the ISL run's architecture
            p = build_segmentation_model(cfg, None, n_inputs=x.shape[-1], n_outputs=1)(x).numpy()
            assert p.shape == y.shape and 0 <= p.min() <= p.max() <= 1 and set(np.unique(y)) <= {0.0, 1.0}
            check_monitor(cfg, cfg.training.early_stopping.monitor, SEG_METRICS, True)
            cfg, name = isl, f"{name}: pretrain"
        m = ensure_records(cfg)
        n_in, n_out = _channels(m, cfg.data.inputs, "input"), _channels(m, cfg.data.targets, "target")
        x, y = next(iter(make_dataset(cfg, "train", True, m)))
        xv, yv = next(iter(make_dataset(cfg, "val", False, m)))
        assert x.shape[1:] == (32, 32, n_in) and y.shape[1:] == (32, 32, n_out), name
        assert xv.shape[-1] == n_in and yv.shape[-1] == n_out, name
        es = cfg.training.early_stopping
        check_monitor(cfg, es.monitor if es else "val_pcc", logged_metrics(cfg), True)
        key = json.dumps([to_dict(cfg.model), to_dict(cfg.loss), cfg.pipeline.normalization, n_in, n_out])
        checked.append(name)
        if key in models:  # configs that differ only in data and schedule share one training model
            assert models[key].output_shape[-1] == n_out, name
            continue
        model, generator = build_training_model(cfg, n_in, n_out)
        models[key] = generator
        x, y = x[:2], y[:2]  # two crops are enough to run it
        out = generator(x, training=False)
        assert out.shape == y.shape, name
        kind = cfg.loss.kind
        terms = {"l1": lambda: {"loss": pixel_loss("l1")(y, out)}, "l2": lambda: {"loss": pixel_loss("l2")(y, out)},
                 "pix2pix": lambda: model._terms(x, y, out, training=False),
                 "perceptual": lambda: model._terms(y, out)}[kind]()
        assert all(np.isfinite(v.numpy()).all() for v in terms.values()), (name, terms)
    assert len(checked) == len(SHIPPED) == 18 and len(models) == 13
    # DenseNet121 1->1, 3->1 and 3->2 (ImageNet: 3 channels); ResNet18 (the pretraining; sigmoid for segmentation)
    assert len(one_build_per_network) == 5


@pytest.mark.parametrize("kind", ["l1", "pix2pix", "perceptual"])
def test_aiseg_configs_are_step_budgeted(kind):
    """The shipped CPU configs: the budget is epochs x steps (what a 2-core machine runs within the cap);
    max_minutes is a safety cap above the time that takes (README, 'Measured results')."""
    cfg = load_config(PROJECT / "experiments" / f"aiseg_nuclei_{kind}.json")
    assert cfg.loss.kind == kind and cfg.model.encoder_weights is None and cfg.pipeline.crop_size == 256
    t = cfg.training
    # (steps, minutes those steps took on the 2-core machine); perceptual ~ pix2pix per step (benchmarks/train_step.py)
    budget, minutes = {"l1": (1680, 12.1), "pix2pix": (1125, 16.7), "perceptual": (1125, 16.7)}[kind]
    assert t.epochs * t.steps_per_epoch == budget and t.lr_schedule == "cosine"
    assert t.max_minutes > minutes
    assert t.early_stopping.monitor == "val_pcc"
