"""islkeras report (run comparison table + box plot); no TensorFlow needed."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


def _run(tmp_path, name, arch, loss, pccs_by_split, history_cols=None, trained=None):
    from islkeras.config import from_dict

    run = tmp_path / "runs" / name / "20250101-000000"
    run.mkdir(parents=True)
    cfg = from_dict({"name": name, "data": {"root": str(tmp_path), "channels": {"bf": {"file": "bf.tif"},
                                                                              "nuc": {"file": "nuc.tif"}},
                                             "inputs": ["bf"], "targets": ["nuc"]},
                     "model": {"architecture": arch}, "loss": {"kind": loss}}, base_dir=tmp_path)
    cfg.save(run / "config.json")
    if trained:
        (run / "summary.json").write_text(json.dumps(trained))
    for split, pccs in pccs_by_split.items():
        out = run / "evaluate" / split
        out.mkdir(parents=True)
        df = pd.DataFrame({"split": split, "field": [f"f{i}" for i in range(len(pccs))],
                           "image": [f"f{i}" for i in range(len(pccs))], "channel": "nuc", "pcc": pccs,
                           "empty": [i == 0 for i in range(len(pccs))]})
        df.to_csv(out / "metrics.csv", index=False)
        (out / "summary.json").write_text(json.dumps({"mode": "whole fields"}))
    return run


def test_report_table_markdown_and_boxplot(tmp_path):
    from click.testing import CliRunner

    from islkeras.cli import cli

    a = _run(tmp_path, "aiseg_l1", "unet_sm", "l1", {"val": [0.1, 0.8, 0.9], "test": [0.2, 0.7, 0.8, 0.9]},
             trained={"steps": 1680, "steps_budget": 1680, "stopped": "epochs"})
    b = _run(tmp_path, "aiseg_p2p", "unet", "pix2pix", {"test": [0.5, 0.6]},
             trained={"steps": 1000, "steps_budget": 1125, "stopped": "max_minutes"})
    c = _run(tmp_path, "old", "unet", "l1", {"test": [0.5]})  # no summary.json: steps unknown
    out = tmp_path / "rep out"
    res = CliRunner().invoke(cli, ["report", str(a), str(b / "savedmodel"), str(c), "--out", str(out),
                                   "--no-evaluate-missing"])
    assert res.exit_code == 0, res.output
    t = pd.read_csv(out / "report.csv")
    assert list(t["run"]) == ["aiseg_l1/20250101-000000", "aiseg_p2p/20250101-000000", "old/20250101-000000"]
    assert t["steps"].tolist()[:2] == [1680, 1000] and np.isnan(t.loc[2, "steps"])
    assert t["stopped"].tolist()[:2] == ["epochs", "max_minutes"] and t.loc[1, "steps_budget"] == 1125
    assert list(t["architecture"])[:2] == ["unet_sm/densenet121", "unet/32x4"] and list(t["loss"])[:2] == ["l1", "pix2pix"]
    assert t.loc[0, "pcc_mean_test"] == pytest.approx(0.65)
    assert t.loc[0, "pcc_std_test"] == pytest.approx(np.std([0.2, 0.7, 0.8, 0.9]))
    assert t.loc[0, "pcc_nonempty_mean_test"] == pytest.approx(0.8) and t.loc[0, "n_val"] == 3
    assert np.isnan(t.loc[1, "pcc_mean_val"]) and t.loc[1, "pcc_mean_test"] == pytest.approx(0.55)
    md = (out / "report.md").read_text()
    assert "| aiseg_l1/20250101-000000 | unet_sm/densenet121 | l1 | 1680 | nuc | 0.600 ± 0.356 | 0.650 ± 0.269 |" in md
    assert "| aiseg_p2p/20250101-000000 | unet/32x4 | pix2pix | 1000 of 1125 (max_minutes) | nuc | n/a |" in md
    assert "| old/20250101-000000 | unet/32x4 | l1 | n/a | nuc |" in md
    assert "n/a" in md and md in res.output
    assert (out / "pcc_boxplot.png").stat().st_size > 1000


def test_report_errors(tmp_path):
    from click.testing import CliRunner

    from islkeras.cli import cli

    a = _run(tmp_path, "r", "unet", "l1", {})
    res = CliRunner().invoke(cli, ["report", str(a), "--no-evaluate-missing", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no evaluation for split(s) val, test" in res.output
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not a run folder" in res.output
