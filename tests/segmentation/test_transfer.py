"""islkeras transfer: ISL weights copied into the segmentation net, Jaccard loss, IoU rule, early errors,
a tiny end-to-end run on real aiseg fields and a tiny few-image sweep."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from islkeras.config import ModelConfig, from_dict
from islkeras.errors import UserError

TINY = {"architecture": "unet", "unet_filters": 8, "unet_depth": 3}


def tiny_config(root, tmp, name="tiny_seg", transfer=None, fields="fov_00[1-8]"):
    """aiseg fields fov_001..fov_008: train 001/004/005/006, val 003/008, test 002/007."""
    d = {
        "name": name,
        "data": {
            "root": str(root), "fields": fields,
            "channels": {"brightfield": {"file": "brightfield.tif"}, "nuclei": {"file": "nuclei.tif"},
                         "mask": {"file": "mask.tif"}},
            "inputs": ["brightfield"], "targets": ["nuclei"], "masks": ["mask"],
            "split": {"csv": "fields.csv:split", "id_column": "fov"},
            "records": str(Path(tmp) / "records"), "shard_size": 4,
        },
        "pipeline": {"crop_size": 64, "crops_per_field": 2, "normalization": "zscore", "eval_mode": "whole"},
        "model": dict(TINY),
        "loss": {"kind": "l1"},
        "training": {"batch_size": 2, "epochs": 1, "steps_per_epoch": 3, "learning_rate": 1e-3,
                     "runs_dir": str(Path(tmp) / "runs"), "early_stopping": None},
        "transfer": transfer if transfer is not None else {},
    }
    return from_dict(d, base_dir=tmp)


def export_isl(cfg, run_dir, kind="isl", seed=0):
    """A tiny ISL 'run' (config.json + savedmodel/) with the real export metadata, without training."""
    import tensorflow as tf

    from islkeras.data.records import ensure_records
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator
    from islkeras.training.fit import export_meta
    from islkeras.training.run import save_run_config

    tf.keras.utils.set_random_seed(seed)
    manifest = ensure_records(cfg)
    model = build_generator(cfg.model, 1, 1, activation="linear")
    # non-trivial BatchNorm statistics, so copying them is visible
    for lay in model.layers:
        if isinstance(lay, tf.keras.layers.BatchNormalization):
            lay.moving_mean.assign(tf.random.normal(lay.moving_mean.shape))
    meta = export_meta(cfg, manifest)
    meta["kind"] = kind
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, run_dir)
    export_savedmodel(model, run_dir / "savedmodel", meta)
    return run_dir, model


@pytest.fixture(scope="module")
def isl_run(aiseg_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    cfg = tiny_config(aiseg_dir, tmp, name="tiny_isl", transfer=None)
    cfg.transfer = None
    run_dir, model = export_isl(cfg, tmp / "isl_run")
    return tmp, run_dir, model


# ----------------------------------------------------------------------------------- loss and metrics
def test_jaccard_distance_identical_zero_disjoint_one():
    import tensorflow as tf

    from islkeras.training.losses import JaccardDistance, jaccard_distance

    y = np.zeros((2, 32, 32, 1), np.float32)
    y[0, 4:20, 4:20] = 1
    y[1, 10:30, 0:8] = 1
    disjoint = np.zeros_like(y)
    disjoint[0, 24:30, 24:30] = 1
    disjoint[1, 0:6, 20:30] = 1
    np.testing.assert_allclose(jaccard_distance(y, y).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(jaccard_distance(y, disjoint, smooth=0.0).numpy(), 1.0, atol=1e-6)
    # the default smoothing (1 pixel) keeps disjoint masks at ~1 and the Keras loss is the batch mean
    assert float(JaccardDistance()(y, disjoint)) > 0.99
    assert float(JaccardDistance()(tf.constant(y), tf.constant(y))) == pytest.approx(0.0, abs=1e-6)
    # empty vs empty is perfect (smoothing), empty vs something is bad
    e = np.zeros((1, 16, 16, 1), np.float32)
    assert float(jaccard_distance(e, e)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(jaccard_distance(e, np.ones_like(e))[0]) > 0.99


def test_iou_rule_for_empty_masks_numpy_and_keras_metric():
    from islkeras.segmentation.metrics import iou_binary, pixel_accuracy
    from islkeras.segmentation.transfer import segmentation_metrics

    empty = np.zeros((16, 16), np.uint8)
    some = empty.copy()
    some[2:6, 2:6] = 1
    half = empty.copy()
    half[2:6, 2:4] = 1
    assert iou_binary(empty, empty) == 1.0
    assert iou_binary(some, empty) == 0.0 and iou_binary(empty, some) == 0.0
    assert iou_binary(half, some) == pytest.approx(0.5)
    assert pixel_accuracy(half, some) == pytest.approx(1 - 8 / 256)

    iou, acc = segmentation_metrics(0.5)
    y_true = np.stack([empty, some, some, empty]).astype(np.float32)[..., None]
    prob = np.stack([empty * 0.0 + 0.2, half * 0.9, some * 0.7, some * 0.6]).astype(np.float32)[..., None]
    iou.update_state(y_true, prob)
    # per image: both empty -> 1, half -> 0.5, exact -> 1, predicted on an empty mask -> 0; mean 0.625
    assert float(iou.result()) == pytest.approx(0.625)
    expected = np.mean([iou_binary(p[..., 0] > 0.5, t[..., 0]) for p, t in zip(prob, y_true)])
    assert float(iou.result()) == pytest.approx(expected)


# ---------------------------------------------------------------------------------- initialisation
def test_transfer_copies_isl_weights_all_but_head_and_all(isl_run, aiseg_dir):
    from islkeras.segmentation.isl_source import build_segmentation_model, weight_layers

    tmp, run_dir, isl_model = isl_run
    cfg = tiny_config(aiseg_dir, tmp)
    seg = build_segmentation_model(cfg, run_dir, init="all_but_head")
    assert seg.layers[-1].get_config()["activation"] == "sigmoid"
    src, dst = weight_layers(isl_model), weight_layers(seg)
    assert [lay.name for lay in src] == [lay.name for lay in dst]
    for i in (0, 1, len(src) // 2, len(src) - 2):  # first conv, first BN (moving stats too), middle, last decoder
        for a, b in zip(src[i].get_weights(), dst[i].get_weights()):
            np.testing.assert_array_equal(a, b)
    head_isl, head_seg = src[-1].get_weights()[0], dst[-1].get_weights()[0]
    assert not np.array_equal(head_isl, head_seg)  # the head is fresh
    assert seg.transfer_info["skipped"] == [dst[-1].name]
    assert len(seg.transfer_info["copied"]) == len(dst) - 1

    seg_all = build_segmentation_model(cfg, run_dir, init="all")
    for a, b in zip(weight_layers(isl_model)[-1].get_weights(), weight_layers(seg_all)[-1].get_weights()):
        np.testing.assert_array_equal(a, b)
    # "all": sigmoid of the ISL prediction
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype(np.float32)
    np.testing.assert_allclose(seg_all(x).numpy(), 1 / (1 + np.exp(-isl_model(x).numpy())), atol=1e-5)

    scratch = build_segmentation_model(cfg, None)
    assert scratch.transfer_info["init"] == "scratch"
    assert not np.array_equal(weight_layers(scratch)[0].get_weights()[0], src[0].get_weights()[0])


def test_all_calibrated_head_is_thresholded_isl_prediction(isl_run, aiseg_dir):
    from islkeras.data.reader import load_fields
    from islkeras.segmentation.calibration import calibrate_head, isl_predictions
    from islkeras.segmentation.isl_source import build_segmentation_model, resolve_isl
    from islkeras.segmentation.metrics import iou_binary

    tmp, run_dir, isl_model = isl_run
    cfg = tiny_config(aiseg_dir, tmp)
    isl = resolve_isl(run_dir)
    seg = build_segmentation_model(cfg, isl, init="all_calibrated")
    fields = [f for f in load_fields(cfg, "train", channels=["brightfield", "mask"]) if f.name == "fov_001"]
    cal = calibrate_head(seg, isl, fields, ["brightfield"], "mask", slope=3.0)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype(np.float32)
    expected = 1 / (1 + np.exp(-3.0 * (isl_model(x).numpy() - cal["t"])))
    np.testing.assert_allclose(seg(x).numpy(), expected, atol=1e-5)
    z = isl_predictions(isl, fields, ["brightfield"])[0]
    assert cal["train_iou"] == pytest.approx(iou_binary(z > cal["t"], fields[0].arrays["mask"][..., 0]))


def test_fit_calibration_threshold_and_slope_do_not_depend_on_units():
    """Sparse nuclei (0.2 % of the field) on a flat background: t lands between background and nuclei, the
    background starts at p ~ 0.0025, whatever the scale of the ISL normalisation."""
    from islkeras.segmentation.calibration import BACKGROUND_LOGIT, fit_calibration

    rng = np.random.default_rng(0)
    mask = np.zeros((256, 256), np.uint8)
    for y, x in rng.integers(8, 248, size=(12, 2)):
        mask[y - 2:y + 2, x - 2:x + 2] = 1
    z = 0.013 + 0.004 * rng.standard_normal(mask.shape) + mask * (1.0 + 0.1 * rng.standard_normal(mask.shape))
    a = fit_calibration([z], [mask])
    b = fit_calibration([z * 100 - 5], [mask])  # other units
    assert 0.05 < a["t"] < 0.9 and a["train_iou"] > 0.95
    assert a["slope"] * (np.median(z) - a["t"]) == pytest.approx(BACKGROUND_LOGIT, rel=0.02)
    assert b["t"] == pytest.approx(a["t"] * 100 - 5, rel=0.05)
    assert b["slope"] == pytest.approx(a["slope"] / 100, rel=0.05)
    assert b["train_jaccard"] == pytest.approx(a["train_jaccard"], abs=0.02)
    assert fit_calibration([z], [mask], slope=2.0)["slope"] == 2.0  # a fixed slope is kept


def test_transfer_copies_weights_segmentation_models_unet(tmp_path, aiseg_dir):
    """The real architecture (segmentation-models U-Net, small backbone and decoder to stay quick); the
    SavedModel round trip is covered by the plain U-Net test above, here the layer pairing is checked."""
    import tensorflow as tf

    from islkeras.models.unet import build_generator
    from islkeras.segmentation.isl_source import build_segmentation_model, copy_isl_weights, weight_layers

    cfg = tiny_config(aiseg_dir, tmp_path)
    cfg.model = ModelConfig(architecture="unet_sm", backbone="resnet18", decoder_filters=[32, 16, 16, 8, 8])
    tf.keras.utils.set_random_seed(1)
    isl = build_generator(cfg.model, 1, 1, "linear")
    seg = build_segmentation_model(cfg, None)
    info = copy_isl_weights(seg, isl, "all_but_head")
    src, dst = weight_layers(isl), weight_layers(seg)
    assert len(src) == len(dst) and info["skipped"] == ["final_conv"] and len(info["copied"]) == len(dst) - 1
    for i in (0, 5, len(src) // 2, len(src) - 2):
        for a, b in zip(src[i].get_weights(), dst[i].get_weights()):
            np.testing.assert_array_equal(a, b)
    assert seg.output_shape[-1] == 1 and seg.layers[-1].name == "sigmoid"
    # a different architecture is refused with the first mismatching layer named
    other = build_generator(ModelConfig(architecture="unet_sm", backbone="resnet18"), 1, 1, "linear")
    with pytest.raises(UserError, match="differs"):
        copy_isl_weights(seg, other)


# ------------------------------------------------------------------------------------- early errors
def test_missing_or_non_isl_savedmodel_fails_before_training(isl_run, aiseg_dir, tmp_path):
    import tensorflow as tf

    from islkeras.segmentation.transfer import run_transfer

    tmp, run_dir, _ = isl_run
    # a segmentation model is not an ISL model
    cfg_isl = tiny_config(aiseg_dir, tmp, name="tiny_isl")
    seg_run, _ = export_isl(cfg_isl, tmp_path / "seg_run", kind="segmentation")
    # a SavedModel without islkeras metadata
    mod = tf.Module()
    mod.f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(mod, str(tmp_path / "plain_sm"))
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "nope", "does not exist"),
        (tmp_path / "empty", "no saved_model.pb"),
        (tmp_path / "plain_sm", "not an islkeras export"),
        (seg_run, "not an ISL model"),
    ]
    for path, msg in cases:
        cfg = tiny_config(aiseg_dir, tmp_path, transfer={"isl_run": str(path)})
        with pytest.raises(UserError, match=msg):
            run_transfer(cfg, run_dir=tmp_path / "should_not_exist")
        assert not (tmp_path / "should_not_exist").exists()

    # the CLI: one line, exit code 1, before any training
    from click.testing import CliRunner

    from islkeras.cli import cli

    cfg = tiny_config(aiseg_dir, tmp_path, transfer={})
    cfg.save(tmp_path / "t.json")
    res = CliRunner().invoke(cli, ["transfer", str(tmp_path / "t.json"), "--isl-run", str(tmp_path / "nope"),
                                   "--run-dir", str(tmp_path / "cli_run")])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "cli_run").exists()


def test_train_subset_is_first_n_sorted(aiseg_dir, tmp_path, isl_run):
    from islkeras.data.records import ensure_records
    from islkeras.segmentation.transfer import train_subset

    tmp, _, _ = isl_run
    cfg = tiny_config(aiseg_dir, tmp)
    m = ensure_records(cfg)
    assert train_subset(m, 1) == ["fov_001"]
    assert train_subset(m, 3) == ["fov_001", "fov_004", "fov_005"]
    assert train_subset(m, None) == ["fov_001", "fov_004", "fov_005", "fov_006"]
    with pytest.raises(UserError, match="only 4 train fields"):
        train_subset(m, 5)


# -------------------------------------------------------------------------------------- end to end
def test_run_transfer_end_to_end(isl_run, aiseg_dir):
    import tensorflow as tf

    from islkeras.models.savedmodel import read_meta
    from islkeras.segmentation.isl_source import weight_layers
    from islkeras.segmentation.transfer import run_transfer

    tmp, run_dir, isl_model = isl_run
    cfg = tiny_config(aiseg_dir, tmp, transfer={"isl_run": str(run_dir), "train_fields": 1,
                                                "init": "all_calibrated", "freeze_batchnorm": True,
                                                "keep_start": False})  # keeping the start: see below
    out = run_transfer(cfg, run_dir=tmp / "seg_run", verbose=0)
    for f in ("config.json", "history.csv", "metrics.csv", "summary.json", "transfer.json", "savedmodel"):
        assert (out / f).exists(), f
    meta = read_meta(out / "savedmodel")
    assert meta["kind"] == "segmentation" and meta["train_fields"] == ["fov_001"] and meta["targets"] == ["mask"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["field"] for r in rows] == ["fov_002", "fov_007"]
    # the IoU and pixel accuracy of fov_007, by hand from the exported model's whole-field probabilities
    import tifffile

    from islkeras.inference.tiling import predict_field
    from islkeras.models.savedmodel import ExportedModel

    prob = predict_field(ExportedModel(out / "savedmodel"), tifffile.imread(aiseg_dir / "fov_007" / "brightfield.tif"))
    pred, true = prob[..., 0] > 0.5, tifffile.imread(aiseg_dir / "fov_007" / "mask.tif") > 0
    iou = (pred & true).sum() / (pred | true).sum() if (pred | true).any() else 1.0
    assert float(rows[1]["iou"]) == pytest.approx(iou, abs=1e-5)
    assert float(rows[1]["pixel_accuracy"]) == pytest.approx((pred == true).mean(), abs=1e-5)
    assert float(rows[1]["mean_probability"]) == pytest.approx(float(prob.mean()), rel=1e-4)
    assert (int(rows[1]["true_pixels"]), int(rows[1]["pred_pixels"])) == (true.sum(), pred.sum())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_iou"] == pytest.approx(np.mean([float(r["iou"]) for r in rows]), abs=1e-5)
    assert (summary["steps"], summary["steps_budget"], summary["stopped"]) == (3, 3, "epochs")
    assert summary["monitor"] == "iou" or summary["monitor"] == "val_iou"
    with open(out / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == 1 and "val_iou" in hist[0] and float(hist[0]["loss"]) <= 1.0
    # it trained: the copied layers moved away from the ISL weights
    seg = tf.keras.models.load_model(str(out / "savedmodel"), compile=False)
    assert not np.allclose(weight_layers(seg)[0].get_weights()[0], weight_layers(isl_model)[0].get_weights()[0])
    # ... except the frozen BatchNorm statistics, which are still the ISL model's
    bn = [i for i, lay in enumerate(weight_layers(seg)) if isinstance(lay, tf.keras.layers.BatchNormalization)]
    for a, b in zip(weight_layers(seg)[bn[0]].get_weights(), weight_layers(isl_model)[bn[0]].get_weights()):
        np.testing.assert_array_equal(a, b)
    info = json.loads((out / "transfer.json").read_text())
    assert info["init"] == "all_calibrated" and "t" in info["calibration"] and info["frozen_batchnorm"] == len(bn)
    # serving returns probabilities
    from islkeras.models.savedmodel import ExportedModel

    p = ExportedModel(out / "savedmodel").predict_raw(np.zeros((1, 40, 40, 1), np.uint8))
    assert p.shape == (1, 40, 40, 1) and p.min() >= 0.0 and p.max() <= 1.0
    # a finished run is not trained again
    assert run_transfer(cfg, run_dir=out, verbose=0) == out


def test_sweep_experiment_tiny(isl_run, aiseg_dir):
    from islkeras.segmentation.experiment import run_experiment

    tmp, run_dir, _ = isl_run
    cfg = tiny_config(aiseg_dir, tmp, name="tiny_sweep", transfer={"isl_run": str(run_dir), "sweep_train_fields": [2]})
    cfg.training.steps_per_epoch = 2
    out = run_experiment(cfg, out_dir=tmp / "sweep")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train_fields"], r["init"]) for r in rows] == [("2", "isl:all_calibrated"), ("2", "scratch")]
    assert {r["run"] for r in rows} == {"n02_isl", "n02_scratch"}
    md = (out / "results.md").read_text()
    assert "| 2 |" in md and "Wall time" in md and "fov_002" in md
    assert (out / "curve.png").stat().st_size > 1000
    s = json.loads((out / "summary.json").read_text())
    assert s["wall_minutes"] > 0 and s["pretrain_minutes"] is None
    # the true stain thresholded at the level fitted on fov_001/fov_004, on test fov_002/fov_007: ~0.6/~0.47
    # at their own best levels (measured), so a fitted level lands between 0.3 and 0.6
    assert 0.3 < s["stain_threshold_test_iou"]["2"] < 0.6
    assert "true stain + threshold" in md and f"{s['stain_threshold_test_iou']['2']:.3f}" in md
    isl_row = next(r for r in rows if r["init"].startswith("isl"))
    run_summary = json.loads((out / "n02_isl" / "summary.json").read_text())
    assert float(isl_row["start_test_iou"]) == pytest.approx(run_summary["start_test_iou"], abs=1e-5)
    assert [int(r["steps"]) for r in rows] == [2, 2] and "| 2 / 2 |" in md  # steps run, scratch / ISL
    meta = json.loads((out / "n02_isl" / "savedmodel" / "assets" / "islkeras.json").read_text())
    assert meta["train_fields"] == ["fov_001", "fov_004"]


def test_results_table_and_curve(tmp_path):
    from islkeras.segmentation.experiment import markdown_table, plot_curve

    rows = [{"train_fields": n, "init": init, "test_iou": v, "test_pixel_accuracy": 0.99}
            for n, init, v in [(1, "isl:all_but_head", 0.5), (1, "scratch", 0.25), (18, "isl:all_but_head", 0.7),
                               (18, "scratch", 0.65), (3, "scratch", None)]]
    rows[0].update(steps=800, steps_budget=800, stopped="epochs")
    rows[1].update(steps=600, steps_budget=800, stopped="max_minutes")
    md = markdown_table(rows).splitlines()
    assert md[2].startswith("| 1 | 0.250 | 0.500 | +0.250 |") and md[2].endswith("| 600 of 800 (cap) / 800 |")
    assert md[4].endswith("| n/a / n/a |")
    assert md[3].startswith("| 3 | n/a | n/a | n/a |")
    assert md[4].startswith("| 18 | 0.650 | 0.700 | +0.050 |")
    per_field = [{"train_fields": 1, "init": "scratch", "field": "a", "iou": 0.1}]
    plot_curve(rows, per_field, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_sweep_config_errors(aiseg_dir, tmp_path):
    from islkeras.config import ConfigError

    with pytest.raises(ConfigError, match="sweep_train_fields"):
        tiny_config(aiseg_dir, tmp_path, transfer={"sweep_train_fields": [0, 3]})
    with pytest.raises(ConfigError, match="train_fields"):
        tiny_config(aiseg_dir, tmp_path, transfer={"train_fields": 0})
    from islkeras.segmentation.experiment import run_experiment

    cfg = tiny_config(aiseg_dir, tmp_path, transfer={"sweep_train_fields": [1]})
    with pytest.raises(ConfigError, match="transfer.pretrain"):
        run_experiment(cfg, out_dir=tmp_path / "x")
    cfg = tiny_config(aiseg_dir, tmp_path, transfer={"sweep_train_fields": [1, 9], "isl_run": str(tmp_path)})
    with pytest.raises(UserError, match="only 4 train fields"):
        run_experiment(cfg, out_dir=tmp_path / "y")


def test_shipped_experiment_config_loads(experiments_dir):
    from islkeras.config import load_config
    from islkeras.segmentation.experiment import pretrain_config

    cfg = load_config(experiments_dir / "aiseg_transfer.json")
    assert cfg.transfer.sweep_train_fields == [1, 3, 18]
    isl = pretrain_config(cfg)
    assert isl.data.inputs == cfg.data.inputs and isl.data.targets == ["nuclei"]


def test_keep_start_when_fine_tuning_does_worse(isl_run, aiseg_dir):
    """A learning rate that wrecks the network in one epoch: no epoch beats the calibrated start on the val
    fields, so the start (the thresholded ISL prediction) is what gets exported, and its test IoU is the
    one measured before training."""
    from islkeras.segmentation.transfer import run_transfer

    tmp, run_dir, _ = isl_run
    cfg = tiny_config(aiseg_dir, tmp, name="tiny_keep", transfer={
        "isl_run": str(run_dir), "train_fields": 1, "init": "all_calibrated", "isl_learning_rate": 50.0})
    out = run_transfer(cfg, run_dir=tmp / "keep_run", verbose=0)
    s = json.loads((out / "summary.json").read_text())
    # the start's val IoU by hand: the ISL model's normalised prediction of each val field thresholded at t
    import tifffile

    from islkeras.inference.tiling import predict_field
    from islkeras.models.savedmodel import ExportedModel

    t = json.loads((out / "transfer.json").read_text())["calibration"]["t"]
    ious = []
    for f in ("fov_003", "fov_008"):
        z = predict_field(ExportedModel(run_dir), tifffile.imread(aiseg_dir / f / "brightfield.tif"), output_scale=False)
        pred, true = z[..., 0] > t, tifffile.imread(aiseg_dir / f / "mask.tif") > 0
        ious.append((pred & true).sum() / (pred | true).sum())
    assert s["start_val_iou"] == pytest.approx(np.mean(ious), abs=1e-6) and min(ious) > 0
    assert s["kept_start"] is True and s["start_val_iou"] > (s["best"] or 0.0)
    assert s["test_iou"] == pytest.approx(s["start_test_iou"], abs=2e-3)
    # without keep_start the wrecked network is exported
    cfg.transfer.keep_start = False
    out = run_transfer(cfg, run_dir=tmp / "no_keep_run", verbose=0)
    s2 = json.loads((out / "summary.json").read_text())
    assert "kept_start" not in s2 and s2["test_iou"] != pytest.approx(s["start_test_iou"], abs=2e-3)


def test_transfer_from_isl_trained_in_mixed_bfloat16(aiseg_dir, tmp_path):
    """An ISL run trained with training.mixed_precision=mixed_bfloat16 (as aiseg_nuclei_l1 is) exports
    bfloat16-compute layers; transfer copies its float32 weights into a float32 segmentation net."""
    import tensorflow as tf

    from islkeras.segmentation.isl_source import weight_layers
    from islkeras.segmentation.transfer import run_transfer

    cfg = tiny_config(aiseg_dir, tmp_path, name="tiny_isl_bf16", transfer=None)
    cfg.transfer = None
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        run_dir, isl_model = export_isl(cfg, tmp_path / "isl_bf16")
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert weight_layers(isl_model)[0].compute_dtype == "bfloat16"
    seg_cfg = tiny_config(aiseg_dir, tmp_path, transfer={"isl_run": str(run_dir), "train_fields": 1,
                                                         "init": "all_but_head", "freeze_batchnorm": True})
    seg_cfg.training.steps_per_epoch = 1
    out = run_transfer(seg_cfg, run_dir=tmp_path / "seg", verbose=0)
    seg = tf.keras.models.load_model(str(out / "savedmodel"), compile=False)
    assert weight_layers(seg)[0].compute_dtype == "float32"
    bn = [i for i, lay in enumerate(weight_layers(seg)) if isinstance(lay, tf.keras.layers.BatchNormalization)]
    for a, b in zip(weight_layers(seg)[bn[0]].get_weights(), weight_layers(isl_model)[bn[0]].get_weights()):
        np.testing.assert_array_equal(a, b)  # frozen BatchNorm statistics: copied exactly
