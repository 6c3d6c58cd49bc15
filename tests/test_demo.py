"""The README's first command: `islkeras demo` runs convert -> fit -> evaluate -> predict on synthetic data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path):
    work = tmp_path / "demo dir"  # a space in the path on purpose
    env = dict(os.environ, ISLKERAS_NO_PROGRESS="1")
    p = subprocess.run(
        [sys.executable, "-m", "islkeras.cli", "demo", "--workdir", str(work), "--fields", "8", "--size", "128",
         "--epochs", "3"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((work / "runs" / "demo").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert json.loads((run / "config.json").read_text())["name"] == "demo"
    assert len(pd.read_csv(run / "history.csv")) == 3
    metrics = pd.read_csv(run / "evaluate" / "test" / "metrics.csv")
    assert len(metrics) >= 1 and metrics["pcc"].notna().all()
    # the synthetic nuclei are visible in the transmitted image: even 3 short epochs must learn them
    assert metrics["pcc"].mean() > 0.3, metrics[["field", "pcc"]]
    preds = sorted((work / "predictions").glob("*_prediction.tif"))
    assert len(preds) == len(metrics)
    for f in preds:
        field = f.name.replace("_prediction.tif", "")
        src = tifffile.imread(work / "data" / field / "transmitted.tif")
        out = tifffile.imread(f)
        assert out.shape == src.shape and out.dtype == np.float32 and np.isfinite(out).all()
