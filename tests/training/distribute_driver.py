"""Subprocess drivers for tests/training/test_distribute.py (each needs a fresh TensorFlow runtime).

``python tests/training/distribute_driver.py mirrored CONFIG OUT_JSON``
    Splits the CPU into two logical devices, then (1) one-replica vs two-replica equivalence of a few SGD
    steps for each training mode (l1 through compile/fit, pix2pix and perceptual through their custom
    train steps; BatchNorm-free toy networks, see ``equivalence``), (2) ``fit`` of the plain U-Net (with
    BatchNorm) under ``mirrored`` into a run folder, (3) ``run_transfer`` under ``mirrored`` from that run.
    Results go to OUT_JSON.

``python tests/training/distribute_driver.py worker CONFIG OUT_JSON JOBS_JSON``
    One worker of a multi-worker cluster (``TF_CONFIG`` set by the caller): runs the ``fit`` jobs of
    JOBS_JSON (``[{"set": {...}, "resume": bool, "exit_after_epoch": k}]``; ``{"transfer": true, "set": {...},
    "isl_from_job": i}`` runs ``run_transfer`` from the run of job i) in order. ``exit_after_epoch``
    ends the process (exit code 3) right after the checkpoint of that epoch, as a crash would.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
import islkeras  # noqa: E402,F401  (tf-keras before TensorFlow)


def _cfg(config, overrides):
    from islkeras.config import load_config

    return load_config(config, overrides=overrides)


# ------------------------------------------------------------------------------------- equivalence
def _toy_generator(tf, seed):
    """Conv-ReLU-Conv without BatchNorm (batch statistics would differ per replica by design)."""
    L = tf.keras.layers
    init = tf.keras.initializers.GlorotUniform(seed)
    inp = tf.keras.Input((None, None, 1))
    x = L.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=init)(inp)
    x = L.Conv2D(1, 3, padding="same", kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 1))(x)
    return tf.keras.Model(inp, L.Activation("linear", dtype="float32")(x))


def _toy_discriminator(tf, seed):
    L = tf.keras.layers
    a, b = tf.keras.Input((None, None, 1)), tf.keras.Input((None, None, 1))
    x = L.Concatenate()([a, b])
    x = L.Conv2D(4, 4, strides=2, padding="same", kernel_initializer=tf.keras.initializers.GlorotUniform(seed))(x)
    x = L.LeakyReLU(0.2)(x)
    x = L.Conv2D(1, 4, padding="same", kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 1))(x)
    return tf.keras.Model([a, b], L.Activation("linear", dtype="float32")(x))


def _train_toy(tf, strategy, kind, batches, global_batch, lr=0.05):
    from islkeras.training.losses import PerceptualLoss, pixel_loss
    from islkeras.models.vgg import VGGFeatures
    from islkeras.training.perceptual import PerceptualModel
    from islkeras.training.pix2pix import Pix2Pix

    with strategy.scope():
        gen = _toy_generator(tf, 1)
        if kind == "l1":
            model = gen
            model.compile(optimizer=tf.keras.optimizers.SGD(lr), loss=pixel_loss("l1"))
            nets = [gen]
        elif kind == "pix2pix":
            disc = _toy_discriminator(tf, 7)
            model = Pix2Pix(gen, disc, l1_lambda=10.0, global_batch_size=global_batch)
            model.compile(g_optimizer=tf.keras.optimizers.SGD(lr), d_optimizer=tf.keras.optimizers.SGD(lr))
            nets = [gen, disc]
        else:
            tf.keras.utils.set_random_seed(3)  # the same random VGG in both runs
            feats = VGGFeatures(["block1_conv2", "block2_conv1"], None, "zscore")
            model = PerceptualModel(gen, PerceptualLoss(feats), global_batch_size=global_batch)
            model.compile(optimizer=tf.keras.optimizers.SGD(lr))
            nets = [gen]
    x, y = (b.reshape((-1,) + b.shape[2:]) for b in batches)  # (steps, B, ...) -> batches of B in order
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).with_options(_no_shard(tf))
    hist = model.fit(ds, epochs=1, steps_per_epoch=len(batches[0]), verbose=0).history
    return [[w.numpy() for w in n.trainable_weights] for n in nets], hist


def _no_shard(tf):
    o = tf.data.Options()
    o.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return o


def equivalence(tf, np, mirrored, steps=3, global_batch=4):
    """Max |w2 - w1| and max|w1 - w0| over the trainable weights after ``steps`` SGD steps, per mode and
    per network (pix2pix: the generator and the discriminator apart, so a network that does not move
    cannot hide behind the other)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, global_batch, 32, 32, 1)).astype(np.float32)
    y = (0.5 * x + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    default = tf.distribute.get_strategy()
    out = {}
    for kind in ("l1", "pix2pix", "perceptual"):
        w1, h1 = _train_toy(tf, default, kind, (x, y), global_batch)
        w2, h2 = _train_toy(tf, mirrored, kind, (x, y), global_batch)
        # the initial weights (same seeds) to measure how far the steps moved them
        with default.scope():
            w0 = [[w.numpy() for w in _toy_generator(tf, 1).trainable_weights]]
            if kind == "pix2pix":
                w0.append([w.numpy() for w in _toy_discriminator(tf, 7).trainable_weights])
        nets = {}
        for name, a1, a2, a0 in zip(("generator", "discriminator"), w1, w2, w0):
            nets[name] = {"max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(a1, a2)),
                          "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(a1, a0))}
        out[kind] = {"nets": nets, "loss_1": h1["loss"][-1], "loss_2": h2["loss"][-1],
                     "d_loss_1": h1.get("d_loss", [None])[-1], "d_loss_2": h2.get("d_loss", [None])[-1]}
    return out


#: fit settings under which the tiny U-Net visibly learns the synthetic fields in 2 x 6 steps (measured:
#: val PCC 0.16-0.34 after epoch 1, 0.35-0.41 after epoch 2, 4 of 4 runs rising; default and bf16, 2 seeds)
LEARNING = {"training.steps_per_epoch": 6, "training.learning_rate": 5e-3}


# -------------------------------------------------------------------------------------------- modes
def mirrored_main(config, out_path):
    res = {"ok": False}
    try:
        t0 = time.time()
        from types import SimpleNamespace

        from islkeras.training import distribute as D

        devices = ["/cpu:0", "/cpu:1"]
        strategy = D.get_strategy(SimpleNamespace(strategy="mirrored", devices=devices))  # before any op
        import numpy as np
        import tensorflow as tf

        res["replicas"] = strategy.num_replicas_in_sync
        res["equivalence"] = equivalence(tf, np, strategy)
        res["t_equivalence"] = time.time() - t0

        from islkeras.training.fit import fit
        from islkeras.segmentation.transfer import run_transfer

        base = json.loads(Path(out_path).with_suffix(".sets.json").read_text())
        sets = dict(base, **{"training.strategy": "mirrored", "training.devices": devices,
                             "training.jit_compile": True})  # turned off (XLA cannot, with 2 replicas)
        t1 = time.time()
        s = fit(_cfg(config, dict(sets, name="mirrored_l1", **LEARNING)), verbose=0)
        res["fit"] = s
        res["t_fit"] = time.time() - t1
        t1 = time.time()
        tcfg = _cfg(config, dict(sets, name="mirrored_transfer", **{"transfer.isl_run": s["run_dir"]}))
        tdir = run_transfer(tcfg, evaluate=False, verbose=0)
        res["transfer"] = json.loads((Path(tdir) / "summary.json").read_text())
        res["t_transfer"] = time.time() - t1
        res["ok"] = True
    except BaseException:  # report everything to the test
        res["error"] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(res, indent=1, default=str))


def worker_main(config, out_path, jobs_path):
    res = {"ok": False, "jobs": []}
    try:
        import tensorflow as tf

        from islkeras.training.fit import LATEST, fit

        import numpy as np

        def fingerprint(model):
            """Sums of |w| of the trainable weights and the optimizer's iterations: what a checkpoint holds
            (trainable variables are mirrored: reading them is local, no collective)."""
            return [float(np.abs(w.numpy()).astype(np.float64).sum()) for w in model.trainable_weights] + \
                [int(model.optimizer.iterations.numpy())]

        B = tf.keras.callbacks.BackupAndRestore
        jobs = json.loads(Path(jobs_path).read_text())
        for job in jobs:
            k = job.get("exit_after_epoch")
            if k is not None:
                orig = B.on_epoch_end

                def on_epoch_end(self, epoch, logs=None, _orig=orig, _k=k):
                    _orig(self, epoch, logs)
                    if epoch + 1 >= _k:
                        Path(out_path).write_text(json.dumps(dict(res, exited_after_epoch=epoch + 1,
                                                                  weights_at_exit=fingerprint(self.model))))
                        os._exit(3)

                B.on_epoch_end = on_epoch_end
            if job.get("resume"):  # the state right after BackupAndRestore restored it
                orig_begin = B.on_train_begin

                def on_train_begin(self, logs=None, _orig=orig_begin):
                    _orig(self, logs)
                    res["weights_at_resume"] = fingerprint(self.model)
                    B.on_train_begin = _orig

                B.on_train_begin = on_train_begin
            if job.get("transfer"):  # from the ISL run of an earlier job
                from islkeras.segmentation.transfer import run_transfer

                sets = dict(job["set"], **{"transfer.isl_run": res["jobs"][job["isl_from_job"]]["run_dir"]})
                res["jobs"].append({"run_dir": str(run_transfer(_cfg(config, sets), verbose=0))})
                continue
            s = fit(_cfg(config, job["set"]), resume=LATEST if job.get("resume") else None, verbose=0)
            res["jobs"].append(s)
        res["ok"] = True
    except BaseException:
        res["error"] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mirrored":
        mirrored_main(sys.argv[2], sys.argv[3])
    elif mode == "worker":
        worker_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
