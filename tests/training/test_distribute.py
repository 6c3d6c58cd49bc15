"""Distribution and precision (islkeras.training.distribute, .cluster): strategies from the config, chief/worker
roles, dataset sharding, mixed precision -- on this CPU.

Two logical CPU devices and multi-worker clusters need a fresh TensorFlow runtime, so those tests run
``tests/training/distribute_driver.py`` in subprocesses; everything else runs in the test process.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from islkeras.errors import ConfigError
from islkeras.training import cluster as C
from islkeras.training import distribute as D

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "distribute_driver.py"


# ------------------------------------------------------------------------------------------ fixtures
def _config(base: Path) -> dict:
    return {
        "name": "dist",
        "data": {
            "root": str(base / "data"), "fields": "field_*",
            "channels": {"transmitted": {"file": "transmitted.tif"}, "nuclei": {"file": "nuclei.tif"},
                         "mask": {"file": "mask.tif"}},
            "inputs": ["transmitted"], "targets": ["nuclei"], "masks": ["mask"],
            "split": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0},
            "records": str(base / "records"), "shard_size": 2,
        },
        "pipeline": {"crop_size": 64, "crops_per_field": 2, "eval_mode": "grid", "shuffle_buffer": 8},
        "model": {"architecture": "unet", "unet_filters": 8, "unet_depth": 3},
        "loss": {"kind": "l1", "vgg_weights": None, "vgg_layers": ["block1_conv2"], "patchgan_filters": 8},
        "training": {"batch_size": 4, "epochs": 2, "steps_per_epoch": 2, "validation_steps": 2,
                     "runs_dir": str(base / "runs"), "early_stopping": {"patience": 100}},
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """8 synthetic 128x128 fields converted once (train: 2 shards, val: 1, test: 1); returns the config."""
    from islkeras.config import load_config
    from islkeras.data.records import convert
    from islkeras.data.synthetic import write_synthetic

    base = tmp_path_factory.mktemp("dist")
    write_synthetic(base / "data", n_fields=8, size=128, seed=1)
    path = base / "config.json"
    path.write_text(json.dumps(_config(base), indent=1))
    m = convert(load_config(path))
    shards = {}
    for s in m["shards"]:
        shards[s["split"]] = shards.get(s["split"], 0) + 1
    assert shards["train"] == 2 and shards["val"] == 1, shards
    return path


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", ISLKERAS_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


# -------------------------------------------------------------------------------- TF_CONFIG / chief
def test_tf_config_is_validated_with_clear_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="needs the TF_CONFIG environment variable"):
        C.parse_tf_config()
    assert C.parse_tf_config(required=False) is None
    bad = {
        "{not json": "not valid JSON",
        "[]": "JSON object",
        '{"task": {"type": "worker", "index": 0}}': 'no "cluster"',
        '{"cluster": {"worker": ["127.0.0.1:1"]}}': 'no "task"',
        '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}': "out of range",
        '{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}': "host:port",
        '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}': "parameter-server",
        '{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}': "not in the cluster",
    }
    for raw, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            C.parse_tf_config(raw)

    def chief(cluster, ttype, index):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": ttype, "index": index}}))
        return C.is_chief()

    w2 = {"worker": ["a:1", "b:2"]}
    assert chief(w2, "worker", 0) and not chief(w2, "worker", 1)
    cw = {"chief": ["c:0"], "worker": ["a:1", "b:2"]}
    assert chief(cw, "chief", 0) and not chief(cw, "worker", 0) and not chief(cw, "worker", 1)
    assert C.cluster_size(C.parse_tf_config()) == 3
    # a single-worker strategy always writes, whatever TF_CONFIG says
    assert C.is_chief(tf.distribute.get_strategy())
    from islkeras.training.run import is_chief

    assert not is_chief()  # run.is_chief is the same implementation


def test_strategy_config_errors(monkeypatch):
    from types import SimpleNamespace as NS

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        D.get_strategy(NS(strategy="multiworker", devices=None))
    with pytest.raises(ConfigError, match="only used with strategy"):
        D.get_strategy(NS(strategy="default", devices=["/cpu:0"]))
    with pytest.raises(ConfigError, match="no local device '/gpu:3'"):
        D.get_strategy(NS(strategy="mirrored", devices=["/gpu:3"]))
    assert D.resolve_kind(NS(strategy="auto", devices=None)) == "default"  # no GPU, no cluster here
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert D.resolve_kind(NS(strategy="auto", devices=None)) == "multiworker"
    s = D.get_strategy(NS(strategy="default", devices=None))
    assert D.describe(s).startswith("default") and C.num_workers(s) == 1
    # XLA cannot compile a step over mirrored variables: turned off (on a copy) with several replicas
    cfg = NS(training=NS(jit_compile=True))
    warned = []
    assert D.for_strategy(cfg, s, warned.append) is cfg and not warned
    two = NS(num_replicas_in_sync=2)
    out = D.for_strategy(cfg, two, warned.append)
    assert out.training.jit_compile is False and cfg.training.jit_compile is True and "jit_compile" in warned[0]
    with pytest.raises(ConfigError, match="multiple of the 2 replicas"):
        D.check_batch_size(3, NS(num_replicas_in_sync=2, extended=NS(worker_devices=())))


def test_shard_policy_by_file_only_when_every_worker_gets_a_file():
    P = tf.data.experimental.AutoShardPolicy
    assert D.shard_policy(4, 2) == P.FILE and D.shard_policy(2, 2) == P.FILE
    assert D.shard_policy(1, 2) == P.DATA
    ds = D.distribute_dataset(tf.data.Dataset.range(4), tf.distribute.get_strategy(), 1)
    assert ds.options().experimental_distribute.auto_shard_policy == P.OFF  # one worker: nothing to shard


def _learned(run: Path, s: dict) -> None:
    """The fit learnt: validation PCC rose from epoch 1 to 2 and reached 0.3 (an untrained net is at ~0)."""
    import csv

    with open(run / "history.csv", newline="") as f:
        val = [float(r["val_pcc"]) for r in csv.DictReader(f)]
    assert len(val) == 2 and val[1] > val[0] and max(val) > 0.3, val
    assert s["best"] == pytest.approx(max(val), abs=1e-5) and s["best_epoch"] == 2


# -------------------------------------------------------------------------------- mixed precision
def test_mixed_float16_scales_both_pix2pix_losses():
    from islkeras.models.patchgan import build_patchgan
    from islkeras.models.unet import plain_unet
    from islkeras.training.pix2pix import Pix2Pix

    LSO = tf.keras.mixed_precision.LossScaleOptimizer
    with D.precision("mixed_float16"):
        gen = plain_unet(tf, 1, 1, "linear", filters=4, depth=2)
        disc = build_patchgan(1, 1, filters=4, n_layers=2)
        model = Pix2Pix(gen, disc, global_batch_size=2)
        model.compile(g_optimizer=tf.keras.optimizers.Adam(1e-3), d_optimizer=tf.keras.optimizers.Adam(1e-3))
        assert isinstance(model.optimizer, LSO) and isinstance(model.d_optimizer, LSO)
        assert gen.layers[1].compute_dtype == "float16" and gen.output.dtype == tf.float32
        assert disc.output.dtype == tf.float32
        x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
        h = model.fit(tf.data.Dataset.from_tensors((x, x)).repeat(), steps_per_epoch=3, epochs=1, verbose=0)
    assert all(np.isfinite(v[-1]) for v in h.history.values()), h.history
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # restored
    assert D.maybe_loss_scale(tf.keras.optimizers.SGD(), "mixed_bfloat16").__class__.__name__ == "SGD"
    with pytest.raises(ConfigError, match="mixed_precision"):
        with D.precision("float8"):
            pass


def test_mixed_bfloat16_fit_exports_float32(synth, tmp_path):
    from islkeras.config import load_config
    from islkeras.models.savedmodel import load_exported
    from islkeras.training.fit import fit

    from distribute_driver import LEARNING  # beside this file (pytest puts the folder on sys.path)

    cfg = load_config(synth, overrides={"name": "bf16", "training.mixed_precision": "mixed_bfloat16",
                                        "training.runs_dir": str(tmp_path), **LEARNING})
    s = fit(cfg, verbose=0)
    _learned(Path(s["run_dir"]), s)
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    em = load_exported(s["savedmodel"])
    net = em.keras_model()
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in net.layers)  # trained in bfloat16
    img = (np.random.default_rng(0).random((1, 64, 96, 1)) * 4000).astype(np.dtype(em.meta["input_dtype"]))
    loaded = tf.saved_model.load(s["savedmodel"])
    out = loaded.signatures["serving_default"](image=tf.constant(img))["prediction"]
    assert out.dtype == tf.float32 and out.shape == (1, 64, 96, 1) and np.all(np.isfinite(out.numpy()))
    out2 = loaded.signatures["normalized"](x=tf.zeros([1, 64, 64, 1]))["prediction"]
    assert out2.dtype == tf.float32


# ------------------------------------------------------------------------ mirrored: 2 logical CPUs
@pytest.fixture(scope="module")
def mirrored(synth, tmp_path_factory):
    """The mirrored driver (subprocess): equivalence of 1 vs 2 replicas, fit and transfer on 2 logical CPUs."""
    out = tmp_path_factory.mktemp("mirrored") / "result.json"
    runs = out.parent / "runs"
    out.with_suffix(".sets.json").write_text(json.dumps({"training.runs_dir": str(runs)}))
    t0 = time.time()
    p = subprocess.run([sys.executable, str(DRIVER), "mirrored", str(synth), str(out)], env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert out.is_file(), f"driver died (exit {p.returncode}):\n{p.stderr[-4000:]}"
    res = json.loads(out.read_text())
    res["seconds"] = time.time() - t0
    assert res["ok"], res.get("error", "") + p.stderr[-2000:]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["l1", "pix2pix", "perceptual"])
def test_two_replicas_match_one_replica(mirrored, kind):
    """A few SGD steps with the global batch split over 2 replicas give the weights of 1 replica with the
    same global batch (BatchNorm-free networks: batch statistics are per replica by design)."""
    assert mirrored["replicas"] == 2
    e = mirrored["equivalence"][kind]
    assert list(e["nets"]) == (["generator", "discriminator"] if kind == "pix2pix" else ["generator"])
    for net, d in e["nets"].items():  # each network on its own: the discriminator must move too
        assert d["max_update"] > 1e-3, (net, d)  # the steps did move its trainable weights
        assert d["max_abs_diff"] <= 1e-5 + 1e-4 * d["max_update"], (net, d)
    assert e["loss_1"] == pytest.approx(e["loss_2"], rel=1e-4, abs=1e-6)
    if kind == "pix2pix":
        assert e["d_loss_1"] == pytest.approx(e["d_loss_2"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_fit_and_transfer_under_mirrored(mirrored):
    """The real path (records, plain U-Net with BatchNorm, callbacks, export) on 2 logical CPUs; then
    ``transfer`` from that run (validation: one image per replica)."""
    s = mirrored["fit"]
    run = Path(s["run_dir"])
    assert s["epochs"] == 2 and s["stopped"] == "epochs" and s["steps"] == 12
    _learned(run, s)
    assert (run / "savedmodel" / "saved_model.pb").is_file() and (run / "history.csv").is_file()
    rows = (run / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_pcc" in rows[0]
    assert json.loads((run / "config.json").read_text())["training"]["jit_compile"] is False  # what ran
    t = mirrored["transfer"]
    assert t["kind"] == "segmentation" and t["epochs"] == 2 and t["init"] != "scratch"
    assert (Path(t["savedmodel"]) / "saved_model.pb").is_file()
    assert "val_iou" in (Path(t["run_dir"]) / "history.csv").read_text().splitlines()[0]


# ----------------------------------------------------------------------- multi-worker on loopback
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _launch(synth, tmp, jobs, ports, tag, timeout=300):
    """Start the two workers of a loopback cluster with ``jobs``; wait; return their results."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    (tmp / f"{tag}.jobs.json").write_text(json.dumps(jobs))
    procs, outs = [], []
    for i in range(2):
        out = tmp / f"{tag}.w{i}.json"
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        env = _env(TF_CONFIG=tf_config, TMPDIR=str(tmp / "tmp"))
        log = open(tmp / f"{tag}.w{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), "worker", str(synth), str(out),
                                       str(tmp / f"{tag}.jobs.json")], env=env, stdout=log, stderr=log))
        outs.append(out)
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join((tmp / f"{tag}.w{i}.log").read_text()[-1500:] for i in range(2))
        pytest.fail(f"multi-worker {tag}: no result after {timeout} s\n{logs}")
    res = []
    for i, (p, out) in enumerate(zip(procs, outs)):
        log = (tmp / f"{tag}.w{i}.log").read_text()
        r = json.loads(out.read_text()) if out.is_file() else {}
        res.append((p.returncode, r, log))
    return res


@pytest.mark.slow
def test_multiworker_l1_resume_and_pix2pix_only_chief_writes(synth, tmp_path):
    """Two workers on loopback ports: l1 killed after epoch 1 on both and resumed, then pix2pix; the run
    folders are the chief's only, the workers' temporary folders are gone. (``transfer`` goes through the
    same machinery; it runs under ``mirrored`` above to keep this test short.)"""
    (tmp_path / "tmp").mkdir()
    runs = tmp_path / "runs"
    common = {"training.runs_dir": str(runs), "training.strategy": "multiworker"}
    l1 = dict(common, name="mw_l1")
    # cosine schedule with a time budget: the workers use the chief's learning rates (sync_callbacks)
    p2p = dict(common, name="mw_pix2pix", **{"loss.kind": "pix2pix", "training.lr_schedule": "cosine",
                                               "training.max_minutes": 600})
    ports = _free_ports(2)
    first = _launch(synth, tmp_path, [{"set": l1, "exit_after_epoch": 1}], ports, "crash")
    for code, r, log in first:
        assert code == 3 and r.get("exited_after_epoch") == 1, f"exit {code}: {r.get('error', '')}\n{log[-3000:]}"
    (crashed,) = list(runs.glob("mw_l1/*/history.csv"))
    row1 = crashed.read_text().splitlines()
    assert len(row1) == 2  # header + epoch 1
    for d in (tmp_path / "tmp").glob("islkeras-worker-*"):  # a crash skips the clean-up, like kill -9
        shutil.rmtree(d)
    ports = _free_ports(2)
    second = _launch(synth, tmp_path, [{"set": l1, "resume": True}, {"set": p2p}], ports, "resume", timeout=360)
    for code, r, log in second:
        assert code == 0 and r.get("ok"), f"exit {code}: {r.get('error', '')}\n{log[-3000:]}"
    # each worker resumed from the checkpoint of epoch 1: the weights and optimizer steps it had when it died
    for i in range(2):
        assert second[i][1]["weights_at_resume"] == first[i][1]["weights_at_exit"], i
    assert first[0][1]["weights_at_exit"][-1] == 2  # 2 optimizer steps (epoch 1), not a fresh optimizer
    assert crashed.read_text().splitlines()[:2] == row1  # epoch 1's row is kept as it was
    chief = second[0][1]["jobs"]
    # only the chief's run folders exist: one per job, with every file the run folder should have
    assert sorted(p.relative_to(runs).as_posix() for p in runs.glob("*/*")) == sorted(
        Path(s["run_dir"]).relative_to(runs).as_posix() for s in chief)
    for s, kind in zip(chief, ("l1", "pix2pix")):
        run = Path(s["run_dir"])
        rows = (run / "history.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"], rows
        assert s["epochs"] == 2 and s["savedmodel"] == str(run / "savedmodel")
        assert (run / "savedmodel" / "saved_model.pb").is_file() and (run / "summary.json").is_file()
        assert not list(run.rglob("workertemp*")) and not (run / "ckpt" / "backup").exists()
    p2p_rows = (Path(chief[1]["run_dir"]) / "history.csv").read_text().splitlines()
    assert "g_loss" in p2p_rows[0]
    lr = p2p_rows[0].split(",").index("lr")
    assert float(p2p_rows[2].split(",")[lr]) < float(p2p_rows[1].split(",")[lr])  # annealed
    # the worker saw the same run folders but wrote nothing there; its temporary folders are removed
    assert [s["run_dir"] for s in second[1][1]["jobs"]] == [s["run_dir"] for s in chief]
    assert "savedmodel" not in second[1][1]["jobs"][0]
    assert not list((tmp_path / "tmp").glob("islkeras-worker-*"))
