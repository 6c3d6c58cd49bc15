"""Figures of an evaluation (islkeras.evaluation.figures)."""
import numpy as np
import pandas as pd


def test_figure_helpers(tmp_path):
    from islkeras.evaluation import figures as R

    hist = tmp_path / "history.csv"
    pd.DataFrame({"epoch": range(4), "loss": [4, 3, 2, 1], "g_loss": [4, 3, 2, 1], "g_gan": [1, 1, 1, 1],
                  "g_l1": [3, 2, 1, 0], "d_loss": [0.7, 0.6, 0.65, 0.6], "pcc": [0.1, 0.3, 0.5, 0.6],
                  "pcc_std": 0.1, "val_loss": [4, 3, 3, 2], "val_d_loss": [0.7] * 4, "val_pcc": [0.1, 0.2, 0.4, 0.5],
                  "val_pcc_std": 0.1, "lr": 1e-3}).to_csv(hist, index=False)
    assert R.plot_learning_curves(hist, tmp_path / "lc.png").stat().st_size > 1000
    rng = np.random.default_rng(0)
    t = rng.integers(0, 255, (600, 700)).astype(np.uint8)
    panels = [{"name": "f1", "input": t, "target": t, "prediction": t * 0.9, "channel": "nuc"}] * 2
    assert R.plot_panels(panels, tmp_path / "p.png").stat().st_size > 1000
    df = pd.DataFrame({"channel": ["a", "a", "b"], "pcc": [0.5, 0.7, 0.1], "empty": [False, True, False]})
    assert R.plot_pcc_distribution(df, tmp_path / "d.png").stat().st_size > 1000
    assert R.plot_pcc_comparison({"x": [0.1, 0.2]}, tmp_path / "c.png").stat().st_size > 1000
