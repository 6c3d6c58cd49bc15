"""islkeras evaluate on a run folder over a small real aiseg subset (5 fields, records converted once)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from testkit import export_tiny, make_run  # noqa: E402  (tests/testkit.py)

SUBSET = {"fov_001": "train", "fov_004": "train", "fov_003": "val", "fov_002": "test", "fov_007": "test"}


@pytest.fixture(scope="session")
def subset_root(tmp_path_factory, aiseg_dir):
    root = tmp_path_factory.mktemp("aiseg_subset")
    for f in SUBSET:
        (root / f).symlink_to(aiseg_dir / f, target_is_directory=True)
    (root / "fields.csv").write_text("fov,split\n" + "".join(f"{k},{v}\n" for k, v in SUBSET.items()))
    return root


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, subset_root):
    base = tmp_path_factory.mktemp("eval_runs")
    sm = export_tiny(base / "sm")
    return make_run(base / "runs" / "tiny_aiseg" / "20250101-000000", subset_root, sm)


@pytest.fixture(scope="session")
def whole_df(eval_run):
    from islkeras.evaluation.evaluate import evaluate_run

    return evaluate_run(eval_run, "test", tile=512, overlap=64)


def test_whole_field_metrics_table_and_outputs(whole_df, eval_run, aiseg_dir):
    import tifffile

    from islkeras.evaluation import metrics as M
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.inference.tiling import predict_field

    df = whole_df
    assert list(df["field"]) == ["fov_002", "fov_007"] and set(df["channel"]) == {"nuclei"}
    for col in ("pcc", "ssim", "psnr", "nrmse", "ssim_z", "psnr_z", "nrmse_z", "empty", "above_fraction",
                "threshold", "mask_jaccard"):
        assert col in df, col
    assert (df[["height", "width"]] == 1024).all().all()
    # same numbers as predicting the TIFFs directly (records hold the raw pixels)
    em = ExportedModel(eval_run)
    bf = tifffile.imread(aiseg_dir / "fov_002" / "brightfield.tif")
    nuc = tifffile.imread(aiseg_dir / "fov_002" / "nuclei.tif")
    pred = predict_field(em, bf, tile=512, overlap=64)[..., 0]
    row = df.iloc[0]
    assert row["pcc"] == pytest.approx(M.pcc(pred, nuc), abs=1e-9)
    from islkeras.segmentation.metrics import mask_jaccard_from_fluorescence

    assert row["mask_jaccard"] == pytest.approx(mask_jaccard_from_fluorescence(pred, nuc), abs=1e-12)
    assert bool(row["finite"]) and json.loads((eval_run / "evaluate" / "test" / "summary.json").read_text())[
        "non_finite_predictions"] == 0
    assert row["psnr"] == pytest.approx(M.psnr(pred, nuc, 255.0), abs=1e-9)
    z = (nuc - nuc.mean()) / nuc.std()
    pz = (pred - nuc.mean()) / nuc.std()
    assert row["nrmse_z"] == pytest.approx(np.sqrt(np.mean((z - pz) ** 2)), rel=1e-4)  # ||z|| = sqrt(N)
    assert row["ssim_z"] == pytest.approx(M.ssim(pz, z, z.max() - z.min()), abs=1e-6)
    assert row["above_fraction"] > 0.005 and not row["empty"]
    # the noise ceiling (issue 13): PCC of the stain with its sigma-2 Gaussian-smoothed self, computed here
    # with scipy (independent of skimage's gaussian), and pcc / ceiling
    from scipy.ndimage import gaussian_filter

    n64 = nuc.astype(np.float64)
    ceiling = np.corrcoef(gaussian_filter(n64, 2.0, mode="nearest", truncate=4.0).ravel(), n64.ravel())[0, 1]
    assert row["ceiling"] == pytest.approx(ceiling, abs=1e-6) and 0.5 < row["ceiling"] < 1
    assert row["pcc_over_ceiling"] == pytest.approx(row["pcc"] / ceiling, rel=1e-6)
    out = eval_run / "evaluate" / "test"
    assert pd.read_csv(out / "metrics.csv").shape == df.shape
    summary = json.loads((out / "summary.json").read_text())
    s = summary["metrics"]["nuclei"]["pcc"]
    assert s["all"]["n"] == 2 and s["all"]["mean"] == pytest.approx(df["pcc"].mean())
    assert summary["metrics"]["nuclei"]["pcc_over_ceiling"]["all"]["mean"] == pytest.approx(
        df["pcc_over_ceiling"].mean()) and summary["ceiling_sigma"] == 2.0
    # empty = fewer than pipeline.empty_fraction (0.005) of target pixels above the stored Otsu threshold;
    # fov_007 (25 small nuclei, 0.29% above) counts as empty even as a whole field
    assert list(df["empty"]) == list(df["above_fraction"] < 0.005) == [False, True]
    assert s["non_empty"]["n"] == 1 and s["empty"]["n"] == 1
    assert "z" in summary["scales"] and summary["mode"] == "whole fields"
    for fig in ("pcc_distribution.png", "learning_curves.png", "panels.png"):
        assert (out / "figures" / fig).stat().st_size > 1000


def test_mask_jaccard_known_value():
    """Two equal discs in the target, one of them in the prediction: their masks' Jaccard is 1/2."""
    from islkeras.segmentation.metrics import mask_jaccard_from_fluorescence

    yy, xx = np.mgrid[:256, :256]
    disc = lambda y, x: ((yy - y) ** 2 + (xx - x) ** 2 < 12 ** 2).astype(np.float32)  # noqa: E731
    true = 200 * (disc(64, 64) + disc(180, 170)) + 10
    pred = 200 * disc(64, 64) + 10
    assert mask_jaccard_from_fluorescence(true, true) == 1.0
    assert mask_jaccard_from_fluorescence(pred, true) == pytest.approx(0.5, abs=0.02)


def test_diverged_model_is_flagged_and_the_runs_steps_recorded(eval_run, tmp_path):
    """A model that outputs NaN: PCC NaN (not 0), `finite` False, counted in summary.json and warned about;
    the run's training steps (its summary.json) go into the evaluation summary."""
    import shutil

    from click.testing import CliRunner

    from islkeras.cli import cli
    from islkeras.config import ModelConfig
    from islkeras.models.savedmodel import export_savedmodel, read_meta
    from islkeras.models.unet import build_generator

    run = tmp_path / "runs" / "tiny_aiseg" / "diverged"
    shutil.copytree(eval_run, run, ignore=shutil.ignore_patterns("savedmodel", "evaluate"))
    net = build_generator(ModelConfig(architecture="unet", unet_filters=4, unet_depth=2), 1, 1)
    net.get_layer("final_conv").bias.assign([np.nan])
    export_savedmodel(net, run / "savedmodel", read_meta(eval_run / "savedmodel"))
    (run / "summary.json").write_text(json.dumps({"epochs": 3, "steps": 840, "steps_budget": 1680,
                                                  "stopped": "max_minutes", "max_minutes": 15}))
    res = CliRunner().invoke(cli, ["evaluate", str(run), "--split", "test", "--crops", "2", "--no-mask-jaccard"])
    assert res.exit_code == 0, res.output
    assert "WARNING: 4 of 4 prediction(s) contain NaN or infinite values" in res.output
    df = pd.read_csv(run / "evaluate" / "test" / "metrics.csv")
    assert df["pcc"].isna().all() and not df["finite"].any()
    summary = json.loads((run / "evaluate" / "test" / "summary.json").read_text())
    assert summary["non_finite_predictions"] == 4
    assert summary["metrics"]["nuclei"]["pcc"]["all"] == {"mean": None, "std": None, "median": None, "n": 4,
                                                         "n_finite": 0}
    assert summary["training"] == {"epochs": 3, "steps": 840, "steps_budget": 1680, "stopped": "max_minutes",
                                   "max_minutes": 15}


def test_crops_are_deterministic_and_cli(eval_run, tmp_path):
    from click.testing import CliRunner

    from islkeras.cli import cli
    from islkeras.evaluation.evaluate import crop_boxes, evaluate_run

    assert crop_boxes("fov_002", 1024, 1024, 256, 3, 0) == crop_boxes("fov_002", 1024, 1024, 256, 3, 0)
    assert crop_boxes("fov_002", 1024, 1024, 256, 3, 0) != crop_boxes("fov_007", 1024, 1024, 256, 3, 0)
    assert crop_boxes("f", 100, 1000, 256, 1)[0][2:] == (96, 256)
    df = evaluate_run(eval_run, "val", crops=4, mask_jaccard=False, out_dir=tmp_path / "a")
    assert len(df) == 4 and (df[["height", "width"]] == 256).all().all()
    assert df["image"].str.startswith("fov_003@y").all() and df["mask_jaccard"].isna().all()
    assert df["empty"].dtype == bool
    res = CliRunner().invoke(cli, ["evaluate", str(eval_run), "--split", "val", "--crops", "4",
                                   "--no-mask-jaccard", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "val: nuclei: PCC" in res.output
    again = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert list(again["image"]) == list(df["image"])
    np.testing.assert_allclose(again["pcc"], df["pcc"], atol=1e-9)
    res = CliRunner().invoke(cli, ["evaluate", str(eval_run), "--split", "nope"])
    assert res.exit_code == 1 and "split 'nope'" in res.output


def test_report_evaluates_missing_split(eval_run, whole_df, tmp_path):
    from click.testing import CliRunner

    from islkeras.cli import cli

    assert not (eval_run / "evaluate" / "val").exists()
    res = CliRunner().invoke(cli, ["report", str(eval_run), "--split", "val", "--split", "test",
                                   "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    t = pd.read_csv(tmp_path / "rep" / "report.csv")
    assert len(t) == 1 and t.loc[0, "n_val"] == 1 and t.loc[0, "n_test"] == 2
    assert t.loc[0, "pcc_mean_test"] == pytest.approx(whole_df["pcc"].mean())
    assert (eval_run / "evaluate" / "val" / "metrics.csv").is_file()


def test_tta_cli_matches_predict_field_tta(eval_run, tmp_path):
    """evaluate --tta scores the 8-symmetry mean prediction (checked against predict_field(tta=True) and
    the PCC computed here), records it in summary.json, and refuses --crops."""
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.evaluation.metrics import pcc
    from islkeras.inference.tiling import predict_field

    res = CliRunner().invoke(cli, ["evaluate", str(eval_run), "--split", "val", "--tta", "--no-mask-jaccard",
                                   "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["tta"] is True and "test-time augmentation" in summary["mode"]
    df = pd.read_csv(tmp_path / "t" / "metrics.csv")
    root = json.loads((eval_run / "config.json").read_text())["data"]["root"]
    bf = tifffile.imread(f"{root}/fov_003/brightfield.tif")
    nuc = tifffile.imread(f"{root}/fov_003/nuclei.tif")
    want = pcc(predict_field(ExportedModel(eval_run / "savedmodel"), bf, tta=True)[..., 0], nuc)
    plain = pcc(predict_field(ExportedModel(eval_run / "savedmodel"), bf)[..., 0], nuc)
    assert float(df["pcc"].iloc[0]) == pytest.approx(want, abs=1e-5) and abs(want - plain) > 1e-4
    res = CliRunner().invoke(cli, ["evaluate", str(eval_run), "--tta", "--crops", "2"])
    assert res.exit_code == 1 and "--tta" in res.output
