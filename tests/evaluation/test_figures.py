"""Figures of an evaluation (islkeras.evaluation.figures): the saved PNGs are read back, and the pixels where
the data should be drawn (data coordinates through the axes' transform) have the colour of what is plotted."""
import numpy as np
import pandas as pd
import pytest
from matplotlib import colors as mcolors
from matplotlib import image as mimage


@pytest.fixture
def render(monkeypatch):
    """Call a plot function; return (figure, PNG pixels as RGB floats) -- the figure saved, then read back."""
    from islkeras.evaluation import figures as R

    figs = []
    save = R.save_figure
    monkeypatch.setattr(R, "save_figure", lambda fig, path, **kw: (figs.append(fig), save(fig, path, **kw))[1])

    def run(fn, *args, **kw):
        path = fn(*args, **kw)
        return figs[-1], mimage.imread(path)[..., :3]

    return run


def _pixel(png, ax, x, y):
    """The PNG pixel (rows from the top) at data coordinates (x, y) of ``ax``."""
    dx, dy = ax.transData.transform((x, y))
    return png[int(round(png.shape[0] - dy)), int(round(dx))]


def _near(png, ax, x, y, color, alpha=1.0, tol=0.08, r=2):
    """Some pixel within r px of (x, y) has ``color`` (drawn with ``alpha`` over white)."""
    dx, dy = ax.transData.transform((x, y))
    row, col = int(round(png.shape[0] - dy)), int(round(dx))
    patch = png[row - r:row + r + 1, col - r:col + r + 1].reshape(-1, 3)
    want = alpha * np.array(mcolors.to_rgb(color)) + (1.0 - alpha)
    return bool((np.abs(patch - want).max(axis=1) < tol).any())


def test_learning_curves_draw_each_column_at_its_values(render, tmp_path):
    from islkeras.evaluation import figures as R

    hist = tmp_path / "history.csv"
    h = pd.DataFrame({"epoch": range(1, 5), "loss": [4, 3, 2, 1], "g_loss": [4, 3, 2, 1], "g_gan": [1, 1, 1, 1],
                      "g_l1": [3, 2, 1, 0], "d_loss": [0.7, 0.6, 0.65, 0.6], "pcc": [0.1, 0.3, 0.5, 0.6],
                      "pcc_std": 0.1, "val_loss": [4, 3, 3, 2], "val_d_loss": [0.5] * 4, "val_pcc": [0.05, 0.2, 0.4, 0.45],
                      "val_pcc_std": 0.1, "lr": 1e-3})
    h.to_csv(hist, index=False)
    fig, png = render(R.plot_learning_curves, hist, tmp_path / "lc.png")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"generator loss", "discriminator loss", "PCC"}
    for title, cols in (("PCC", ["pcc", "val_pcc"]), ("discriminator loss", ["d_loss", "val_d_loss"])):
        ax = axes[title]
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert list(lines) == cols
        for c in cols:
            color = lines[c].get_color()
            for x, y in zip(h["epoch"], h[c]):
                assert _near(png, ax, x, y, color), (title, c, x, y)


def test_pcc_distribution_and_comparison_dots_are_the_values(render, tmp_path):
    from islkeras.evaluation import figures as R

    df = pd.DataFrame({"channel": ["a", "a", "a", "b"], "pcc": [0.2, 0.5, 0.8, -0.3],
                       "empty": [False, True, False, False]})
    fig, png = render(R.plot_pcc_distribution, df, tmp_path / "d.png")
    ax = fig.axes[0]
    filled, hollow = ax.collections[:2]
    assert sorted(filled.get_offsets()[:, 1]) == [0.2, 0.8] and hollow.get_offsets()[:, 1].tolist() == [0.5]
    for x, y in filled.get_offsets():
        assert _near(png, ax, x, y, "tab:blue", alpha=0.7)
    (x, y), = hollow.get_offsets()
    assert _near(png, ax, x, y, "tab:orange", r=3)  # a small ring: its rim
    assert ax.get_ylim()[0] < -0.3  # the negative value is inside the plot
    fig, png = render(R.plot_pcc_comparison, {"run1": [0.1, 0.9], "run2": [0.4]}, tmp_path / "c.png")
    ax = fig.axes[0]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(offsets[:, 1]) == [0.1, 0.4, 0.9] and [t.get_text() for t in ax.get_xticklabels()] == ["run1", "run2"]
    for x, y in offsets:
        assert _near(png, ax, x, y, "tab:blue", alpha=0.6)


def test_panels_show_input_target_prediction_and_error(render, tmp_path):
    """A ramp target: the shown colours follow the colour map at the ramp's values, the prediction panel
    shows half the ramp on the target's scale, and the error panel |prediction - target|."""
    from islkeras.evaluation import figures as R

    ramp = np.tile(np.linspace(0, 255, 700), (600, 1))
    panels = [{"name": "f1", "input": ramp[::-1], "target": ramp, "prediction": ramp * 0.5, "channel": "nuc"}]
    fig, png = render(R.plot_panels, panels, tmp_path / "p.png")
    ax_in, ax_t, ax_p, ax_e = fig.axes[:4]
    assert [a.get_title() for a in (ax_in, ax_t, ax_p, ax_e)] == ["f1: input", "nuc: target", "nuc: prediction",
                                                                  "|error|"]
    for ax, values, cmap in ((ax_t, ramp, "magma"), (ax_p, ramp * 0.5, "magma"), (ax_e, ramp * 0.5, "viridis"),
                             (ax_in, ramp[::-1], "gray")):
        im = ax.images[0]
        shown = np.asarray(im.get_array())
        np.testing.assert_allclose(shown, values[::2, ::2])  # subsampled to <= 512 px
        for col in (40, 175, 310):
            want = np.array(im.cmap(im.norm(shown[150, col]))[:3])
            got = _pixel(png, ax, col, 150)
            assert np.abs(got - want).max() < 0.06, (ax.get_title(), col, got, want)
