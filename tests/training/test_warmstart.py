"""``training.init_from`` (islkeras.training.warmstart): fine-tuning starts from every weight of the source
model, mismatches fail before training naming both networks, and an interrupted fine-tune resumes from its
own checkpoint, not from the source again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from islkeras.errors import UserError

from testkit import small_cfg  # noqa: F401  (tests/testkit.py)

FAST = {"training.epochs": 1, "training.steps_per_epoch": 2, "training.early_stopping.patience": 100,
        "training.mixed_precision": None}  # float32: the outputs compare exactly


@pytest.fixture(scope="module")
def source_run(aiseg_dir, tmp_path_factory):
    """A trained tiny l1 run on fields 1-8 (its own records): the model fine-tunes start from."""
    from islkeras.training.fit import fit

    base = tmp_path_factory.mktemp("warm_src")
    s = fit(small_cfg(base, name="warm_src", **FAST), verbose=0)
    return Path(s["run_dir"])


@pytest.fixture(scope="module")
def fake_run(aiseg_dir, tmp_path_factory):
    """A run folder as fit leaves it (config.json: the same tiny U-Net; an untrained SavedModel): no training."""
    from testkit import export_tiny, make_run

    base = tmp_path_factory.mktemp("warm_fake")
    return make_run(base / "runs" / "fake", aiseg_dir, export_tiny(base / "sm"))


def _new_cfg(base, **extra):
    """The same network on other fields (11-18): other data, so other normalisation constants."""
    return small_cfg(base, name="warm_new", **{"data.fields": "fov_01[1-8]", **FAST, **extra})


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_fit_init_from_starts_at_the_source_model(source_run, tmp_path, monkeypatch):
    import islkeras.training.warmstart as W
    from islkeras.models.savedmodel import ExportedModel, read_meta
    from islkeras.training.fit import fit
    from islkeras.training.run import load_run_config

    x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype(np.float32)  # an already normalised batch
    seen = {}
    real = W.init_generator

    def spy(generator, source):
        seen["scratch"] = generator(x, training=False).numpy()
        info = real(generator, source)
        seen["init"] = generator(x, training=False).numpy()
        seen["info"] = info
        return info

    monkeypatch.setattr(W, "init_generator", spy)
    cfg = _new_cfg(tmp_path, **{"training.init_from": str(source_run)})
    s = fit(cfg, run_dir=tmp_path / "run", verbose=0)
    src = ExportedModel(source_run).predict_normalized(x)
    np.testing.assert_allclose(seen["init"], src, rtol=1e-4, atol=1e-4)  # the source's output, head included
    assert not np.allclose(seen["scratch"], src, atol=1e-3)  # (a fresh network is not)
    assert seen["info"]["skipped"] == [] and "final_conv" in seen["info"]["copied"]
    # the run records where it started; normalisation comes from the new data, not from the source
    assert load_run_config(tmp_path / "run").training.init_from == str(source_run)
    new_meta, src_meta = read_meta(Path(s["savedmodel"])), read_meta(source_run / "savedmodel")
    from islkeras.data.records import ensure_records
    from islkeras.training.fit import export_meta

    expected = export_meta(cfg, ensure_records(cfg))
    assert new_meta["target_scale"] == json.loads(json.dumps(expected["target_scale"]))
    assert new_meta["target_scale"] != src_meta["target_scale"]


def test_init_from_mismatch_fails_before_training_naming_both(fake_run, tmp_path):
    from islkeras.training.fit import fit

    source_run = fake_run

    cfg = _new_cfg(tmp_path, **{"training.init_from": str(source_run), "model.unet_filters": 16})
    with pytest.raises(UserError) as e:
        fit(cfg, run_dir=tmp_path / "a", verbose=0)
    msg = str(e.value)
    assert "training.init_from" in msg and str(source_run) in msg and "\n" not in msg
    assert "model unet (8 filters, depth 3) with 1 input(s) -> 1 output(s)" in msg
    assert "builds unet (16 filters, depth 3) with 1 input(s) -> 1 output(s)" in msg
    assert not (tmp_path / "a").exists()  # nothing trained, no run folder
    cfg = _new_cfg(tmp_path, **{"training.init_from": str(source_run), "data.targets": ["nuclei", "mask"]})
    with pytest.raises(UserError, match=r"-> 1 output\(s\), the config .* builds unet \(8 filters, depth 3\) "
                                        r"with 1 input\(s\) -> 2 output\(s\)"):
        fit(cfg, run_dir=tmp_path / "b", verbose=0)
    cfg = _new_cfg(tmp_path, **{"training.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="training.init_from: .*nowhere"):
        fit(cfg, run_dir=tmp_path / "c", verbose=0)


def test_cli_init_from_resolves_against_the_working_directory(fake_run, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import islkeras.training.fit as F
    from testkit import AISEG_CFG, small_overrides

    source_run = fake_run
    got = {}
    monkeypatch.setattr(F, "fit", lambda cfg, **k: got.setdefault("cfg", cfg))
    monkeypatch.chdir(source_run.parent)
    sets = small_overrides(tmp_path)
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = CliRunner().invoke(F.fit_command, [str(AISEG_CFG), "--init-from", source_run.name, *args])
    assert r.exit_code == 0, r.output
    assert got["cfg"].training.init_from == str(source_run)


@pytest.mark.slow
def test_interrupted_fine_tune_resumes_from_its_checkpoint(source_run, tmp_path, monkeypatch):
    """A crash after epoch 1 of a fine-tune: the resume continues from epoch 1's weights (BackupAndRestore),
    not from the source model's again."""
    import islkeras.training.fit as F
    import islkeras.training.warmstart as W

    real = F.training_callbacks
    states: list = []

    class Probe(tf.keras.callbacks.Callback):
        def __init__(self, crash):
            super().__init__()
            self.crash, self.rec = crash, {}
            states.append(self.rec)

        def on_train_begin(self, logs=None):
            self.rec["begin"] = [w.copy() for w in self.model.get_weights()]

        def on_epoch_end(self, epoch, logs=None):
            self.rec[epoch] = [w.copy() for w in self.model.get_weights()]
            if self.crash:
                raise _Stop()

    def patched(crash):
        def f(*a, **k):
            control, callbacks = real(*a, **k)
            return control, callbacks + [Probe(crash)]
        return f

    cfg = _new_cfg(tmp_path, **{"training.init_from": str(source_run), "training.epochs": 2,
                                "training.learning_rate": 0.01})
    run = tmp_path / "run"
    monkeypatch.setattr(F, "training_callbacks", patched(True))
    with pytest.raises(_Stop):
        F.fit(cfg, run_dir=run, verbose=0)
    monkeypatch.setattr(F, "training_callbacks", patched(False))
    s = F.fit(cfg, run_dir=run, verbose=0)
    first, second = states
    src = W.load_generator(source_run / "savedmodel").get_weights()
    for a, b in zip(first["begin"], src):  # the fine-tune started at the source
        np.testing.assert_array_equal(a, b)
    for a, b in zip(second["begin"], first[0]):  # the resume at epoch 1's checkpoint
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(second["begin"], src))
    assert 1 in second and 0 not in second and s["epochs"] == 2 and s["steps"] == 4
