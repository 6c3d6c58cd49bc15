"""The dock widgets of islkeras.napari.widgets in a real napari viewer (pytest-qt, ``make_napari_viewer``):
Predict fluorescence against `islkeras predict` on the same image, Segment nuclei against the masks code at
the run's threshold, and the one-line errors that leave the viewer usable."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.napari

TILE, OVERLAP = 64, 32
SCALE = (0.65, 0.65)


def _dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget("islkeras", name)
    widget.tile.setValue(TILE)
    widget.overlap.setValue(OVERLAP)
    return widget


def _run(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget.status.text()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    return worker


def test_predict_widget_equals_islkeras_predict(make_napari_viewer, qtbot, isl_run, field, tmp_path):
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli
    from islkeras.inference.tiling import DEFAULT_BATCH, grid_plan

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((48, 48), np.uint16), name="decoy")
    viewer.add_image(field, name="brightfield", scale=SCALE, translate=(10.0, 20.0))
    widget = _dock(viewer, "Predict fluorescence")
    info = widget.set_model(isl_run)
    assert info is not None, widget.status.text()
    assert widget.model_label.text().startswith(
        "ISL model: brightfield -> nuclei, tubulin (1 input plane(s), uint8")
    assert list(widget.layer_boxes) == ["brightfield"]
    assert widget.layer_boxes["brightfield"].currentText() == "brightfield"  # picked by name, not the first
    ticks = []
    widget._progress.tiles.connect(lambda done, total: ticks.append((done, total)))
    _run(qtbot, widget)

    tifffile.imwrite(tmp_path / "field.tif", field)
    res = CliRunner().invoke(cli, ["predict", str(isl_run), str(tmp_path / "field.tif"), "--out",
                                   str(tmp_path / "out"), "--tile", str(TILE), "--overlap", str(OVERLAP)])
    assert res.exit_code == 0, res.output
    want = tifffile.imread(tmp_path / "out" / "field_prediction.tif")  # (C, H, W)
    assert want.shape == (2,) + field.shape
    for i, (name, cmap) in enumerate([("nuclei", "blue"), ("tubulin", "green")]):
        lay = viewer.layers[f"{name} (predicted)"]
        assert lay.data.shape == field.shape and lay.data.dtype == np.float32
        assert float(np.abs(lay.data - want[i]).max()) < 1e-4
        assert tuple(lay.scale) == SCALE and tuple(lay.translate) == (10.0, 20.0)
        assert lay.colormap.name == cmap and lay.blending == "additive"
        lo, hi = np.percentile(want[i], (0.5, 99.9))
        assert lay.contrast_limits == pytest.approx([lo, hi], rel=1e-5)
    grid = grid_plan(*field.shape, TILE, OVERLAP, DEFAULT_BATCH)
    n_tiles = grid.n_tiles
    assert n_tiles > 1 and ticks[-1] == (n_tiles, n_tiles) and len(ticks) == -(-n_tiles // grid.batch)
    assert widget.status.text() == ("added nuclei (predicted), tubulin (predicted); "
                                    "pixel size: 0.65 x 0.65 (from the layer's scale)")
    # predicting again from the same layer replaces its layers instead of stacking copies
    n_layers = len(viewer.layers)
    _run(qtbot, widget)
    assert len(viewer.layers) == n_layers


def test_predict_widget_errors_are_one_line_and_the_viewer_stays_usable(make_napari_viewer, qtbot, isl_run,
                                                                        field, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(field, name="brightfield")
    widget = _dock(viewer, "Predict fluorescence")

    missing = tmp_path / "no such run"
    assert widget.set_model(missing) is None and widget.run() is None
    assert widget.status.text() == f"{missing}: no such run folder or SavedModel"
    assert "ff6b6b" in widget.status.styleSheet()  # shown as an error
    not_a_run = tmp_path / "just a folder"
    not_a_run.mkdir()
    widget.set_model(not_a_run)
    assert widget.status.text() == (f"{not_a_run}: not a run folder or SavedModel (no saved_model.pb in it "
                                    f"or in {not_a_run / 'savedmodel'})")
    assert widget.layer_boxes == {} and len(viewer.layers) == 1

    # metadata fine, graph broken: fails in the worker thread, reported on one line
    broken = tmp_path / "broken"
    shutil.copytree(isl_run / "savedmodel", broken)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    assert widget.set_model(broken) is not None
    _run(qtbot, widget)
    text = widget.status.text()
    assert text.startswith(f"{broken}: could not load the SavedModel (") and "\n" not in text, text
    assert len(viewer.layers) == 1 and widget.run_button.isEnabled()

    # a layer the model cannot take: 3 colour planes for a 1-plane model
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="rgb", rgb=True)
    widget.set_model(isl_run)
    widget.layer_boxes["brightfield"].setCurrentText("rgb")
    _run(qtbot, widget)
    assert widget.status.text() == ("layer 'rgb': the model takes 1 input plane(s) (brightfield), got 3 "
                                    "(brightfield: 3); a z-stack layer is (planes, y, x)")
    # still usable: the same widget predicts once a good layer is chosen
    widget.layer_boxes["brightfield"].setCurrentText("brightfield")
    _run(qtbot, widget)
    assert viewer.layers["nuclei (predicted)"].data.shape == field.shape


def test_segment_widget_labels_at_the_runs_threshold(make_napari_viewer, qtbot, seg_run, isl_run,
                                                     nuclei_field):
    import json

    from scipy import ndimage as ndi

    from islkeras.inference.tiling import predict_field
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.napari.layers import labels_from_probability
    from islkeras.segmentation.classical import ClassicalParams
    from islkeras.segmentation.masks import make_segmenter

    stain, mask = nuclei_field
    threshold = json.loads((seg_run / "assets" / "islkeras.json").read_text())["threshold"]
    assert abs(threshold - 0.5) > 0.5  # far from the default, so using the run's threshold is visible
    viewer = make_napari_viewer()
    viewer.add_image(stain, name="stain", scale=SCALE)
    widget = _dock(viewer, "Segment nuclei")
    widget.set_model(isl_run)  # an ISL model is refused with a pointer to the right widget
    assert widget.status.text() == (f"{isl_run / 'savedmodel'}: an ISL model (brightfield -> nuclei, "
                                    "tubulin); Segment nuclei needs a segmentation run of `islkeras "
                                    "transfer` (use Predict fluorescence for this one)")
    assert widget.set_model(seg_run) is not None
    assert widget.model_label.text().endswith(f"threshold {threshold:g})")
    widget.keep_prob.setChecked(True)
    _run(qtbot, widget)

    prob = predict_field(ExportedModel(seg_run), stain, tile=TILE, overlap=OVERLAP)[..., 0]
    assert float(np.abs(viewer.layers["mask (probability)"].data - prob).max()) < 1e-4
    labels = viewer.layers["nuclei (labels)"]
    assert type(labels).__name__ == "Labels" and tuple(labels.scale) == SCALE
    got = np.asarray(labels.data)
    assert got.shape == stain.shape and got.dtype == np.int32
    above = prob > threshold
    segment = make_segmenter("classical", params=ClassicalParams(sigma=0.0, threshold=0.5))
    want = segment(above.astype(np.float32))
    np.testing.assert_array_equal(got, want)
    # at the run's threshold: inside prob > threshold (holes filled), covering it, unlike the labels at 0.5
    assert not (got > 0)[~ndi.binary_fill_holes(above)].any()
    assert (got > 0)[above].mean() > 0.95
    assert not np.array_equal(got, labels_from_probability(prob, 0.5))
    # and they are the synthetic nuclei: one label per nucleus of the mask, overlapping it
    n_true = ndi.label(mask > 0)[1]
    assert abs(int(got.max()) - n_true) <= max(2, n_true // 5), (got.max(), n_true)
    inter, union = np.logical_and(got > 0, mask > 0).sum(), np.logical_or(got > 0, mask > 0).sum()
    assert inter / union > 0.6, inter / union
