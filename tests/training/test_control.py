"""TrainingControl (islkeras.training.control): the plateau schedule, steps-only cosine, a missing monitor,
the safety cap and its report, best weights that match the best epoch after a kill, the finished state."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from islkeras.training.control import TrainingControl, finished_training


def _net(lr=1e-2):
    net = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    net.compile(optimizer=tf.keras.optimizers.Adam(lr), loss="mse")
    net.optimizer.build(net.trainable_variables)
    return net


def _control(net, tmp_path, **kw):
    kw = {"epochs": 20, "steps_per_epoch": 5, "monitor": "val_pcc", "patience": None, **kw}
    c = TrainingControl(net, tmp_path / "ckpt" / "state.json", tmp_path / "ckpt" / "best_weights.h5", **kw)
    c.set_model(net)
    c.on_train_begin()
    return c


def _epochs(c, net, values, first=0):
    """Run epochs first.. with the given monitor values; epoch e sets the kernel to e (so weights name it)."""
    for e, v in enumerate(values, start=first):
        c.on_epoch_begin(e)
        net.layers[0].kernel.assign(np.full((2, 1), float(e), np.float32))
        logs = {} if v is None else {"val_pcc": v}
        c.on_epoch_end(e, logs)
        if net.stop_training:
            break
    return e


def _lr(net):
    return float(net.optimizer.learning_rate.numpy())


def test_plateau_halves_every_optimizer_after_plateau_patience_epochs(tmp_path):
    """plateau: halve each optimizer's rate (relative to its own base) after 2 epochs without improvement,
    again after 2 more, never below base / 1000; an improvement resets the count."""
    net = _net(1e-2)
    net.d_optimizer = tf.keras.optimizers.Adam(4e-3)  # pix2pix's second optimizer
    c = _control(net, tmp_path, lr_schedule="plateau", plateau_patience=2)
    lrs = []
    for e, v in enumerate([0.1, 0.2, 0.2, 0.15, 0.1, 0.1, 0.3, 0.2, 0.25]):
        c.on_epoch_begin(e)
        c.on_epoch_end(e, {"val_pcc": v})
        lrs.append((_lr(net), float(net.d_optimizer.learning_rate.numpy())))
    g = [a for a, _ in lrs]
    np.testing.assert_allclose(g, [1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3, 2.5e-3, 1.25e-3], rtol=1e-6)
    np.testing.assert_allclose([b for _, b in lrs], np.array(g) * 0.4, rtol=1e-6)
    c2 = _control(_net(1e-2), tmp_path / "floor", lr_schedule="plateau", plateau_patience=1)
    _epochs(c2, c2.model, [0.5] + [0.1] * 12)
    assert _lr(c2.model) == pytest.approx(1e-5)  # 1e-2 / 1000


def test_cosine_follows_steps_not_the_clock(tmp_path):
    import time

    for cap in (None, 1.0):  # a used-up time cap no longer anneals the rate: the budget is steps
        net = _net(1e-2)
        c = _control(net, tmp_path / str(cap), epochs=4, steps_per_epoch=10, lr_schedule="cosine", max_minutes=cap,
                     start_time=time.time() - 600.0)
        c.on_epoch_begin(2)
        c.on_train_batch_begin(0)
        assert _lr(net) == pytest.approx(5e-3, rel=1e-4)  # halfway through the steps
        c.on_train_batch_begin(5)
        assert _lr(net) == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 25 / 40)), rel=1e-4)


def test_missing_monitor_does_not_stop_training_and_keeps_the_last_weights(tmp_path):
    net = _net()
    c = _control(net, tmp_path, epochs=6, patience=2)
    assert _epochs(c, net, [None] * 6) == 5 and not net.stop_training  # never counted as "no improvement"
    c.on_train_end()
    assert c.summary["stopped"] == "epochs" and c.summary["best_epoch"] is None and not c.summary["restored_best"]
    assert np.all(net.layers[0].kernel.numpy() == 5.0)  # the last epoch's weights, as the warning says


def test_safety_cap_stops_and_is_reported_with_the_steps_run(tmp_path):
    from islkeras.training.run import summary_line

    net = _net()
    c = _control(net, tmp_path / "a", epochs=3, steps_per_epoch=10, max_minutes=1e-6)
    assert _epochs(c, net, [0.1, 0.2, 0.3]) == 0 and net.stop_training
    c.on_train_end()
    s = dict(c.summary, name="r", savedmodel="sm")
    assert (s["stopped"], s["steps"], s["steps_budget"], s["max_minutes"]) == ("max_minutes", 10, 30, 1e-6)
    assert "1 epochs, 10 of 30 steps (stopped by the safety cap training.max_minutes=1e-06)" in summary_line(s)
    # crossed during the last epoch: every step ran, the budget was met
    net.stop_training = False
    c = _control(net, tmp_path / "b", epochs=1, steps_per_epoch=10, max_minutes=1e-6)
    _epochs(c, net, [0.1])
    c.on_train_end()
    assert c.summary["stopped"] == "epochs" and "1 epochs, 10 steps (epochs)" in summary_line(dict(c.summary))


def test_best_weights_match_the_best_epoch_after_a_kill_between_best_save_and_backup(tmp_path):
    """Epoch 2 improves and saves its weights, then the process dies before BackupAndRestore saved epoch 2:
    the resumed run re-runs epoch 2, which does not improve this time, so the best is epoch 1 -- and the
    weights restored (and exported) must be epoch 1's, not those the killed session saved."""
    net = _net()
    c = _control(net, tmp_path)
    _epochs(c, net, [0.1, 0.5, 0.9])  # kill here: the backup holds epochs 0 and 1
    c2 = _control(net, tmp_path)
    _epochs(c2, net, [0.2, 0.3], first=2)
    c2.on_train_end()
    assert c2.summary["best_epoch"] == 2 and c2.summary["best"] == pytest.approx(0.5)
    assert np.all(net.layers[0].kernel.numpy() == 1.0)  # epoch 1's kernel
    assert [p.name for p in (tmp_path / "ckpt").glob("best_weights*")] == ["best_weights-e002.h5"]


def test_finished_state_names_the_weights_to_export(tmp_path):
    net = _net()
    c = _control(net, tmp_path, epochs=2)
    _epochs(c, net, [0.4, 0.3])
    c.on_train_end()
    summary, weights = finished_training(tmp_path / "ckpt" / "state.json")
    assert weights.name == "best_weights-e001.h5" and summary["best_epoch"] == 1 and summary["steps"] == 10
    # without restoring the best epoch, the last weights are saved for the export
    c = _control(net, tmp_path / "last", epochs=2, restore_best=False)
    _epochs(c, net, [0.4, 0.3])
    c.on_train_end()
    summary, weights = finished_training(tmp_path / "last" / "ckpt" / "state.json")
    other = _net()
    other.load_weights(str(weights))
    assert weights.name == "final_weights.h5" and np.all(other.layers[0].kernel.numpy() == 1.0)
    state = json.loads((tmp_path / "last" / "ckpt" / "state.json").read_text())
    assert [state["epochs"][k]["steps"] for k in ("0", "1")] == [5, 5]
    assert finished_training(tmp_path / "nowhere" / "state.json") is None
