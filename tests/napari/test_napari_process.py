"""The plugin in a fresh process, in the order a napari user has: the viewer (and its OpenGL) first, then the
widget imports TensorFlow, predicts, and the viewer draws the new layer; the process must exit cleanly.

With Mesa's OpenGL (llvmpipe under Xvfb) a plain ``import tensorflow`` at that point crashes the process
(segmentation fault); ``islkeras.napari.widgets.import_tensorflow`` is what prevents it (see its module doc).
The test process itself cannot show this: the suite imported TensorFlow before any viewer existed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.napari

SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication

    model, image, out = sys.argv[1:4]
    viewer = napari.Viewer(show=True)  # OpenGL first, as when napari starts
    viewer.add_image(np.load(image), name="stain")
    _, widget = viewer.window.add_plugin_dock_widget("islkeras", "Predict fluorescence")
    before = viewer.screenshot(canvas_only=True)
    assert "tensorflow" not in sys.modules
    widget.tile.setValue(64)
    widget.overlap.setValue(32)
    assert widget.set_model(model) is not None, widget.status.text()
    assert widget.run() is not None, widget.status.text()
    t0 = time.time()
    while widget.busy and time.time() - t0 < 120:
        QApplication.processEvents()
        time.sleep(0.01)
    after = viewer.screenshot(canvas_only=True)  # drawn with TensorFlow loaded
    np.savez(out, before=before, after=after, prob=viewer.layers["mask (probability)"].data)
    print("status:", widget.status.text(), flush=True)
    viewer.close()
""")


def test_viewer_first_then_tensorflow_predicts_draws_and_exits_cleanly(seg_run, nuclei_field, tmp_path):
    from islkeras.inference.tiling import predict_field
    from islkeras.models.savedmodel import ExportedModel

    stain, _ = nuclei_field
    np.save(tmp_path / "stain.npy", stain)
    env = dict(os.environ, ISLKERAS_NO_PROGRESS="1", TF_CPP_MIN_LOG_LEVEL="2")
    (tmp_path / "run.py").write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(seg_run), str(tmp_path / "stain.npy"),
                          str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    assert "status: added mask (probability); pixel size: not given (layer scale 1)" in res.stdout
    out = np.load(tmp_path / "out.npz")
    want = predict_field(ExportedModel(seg_run), stain, tile=64, overlap=32)[..., 0]
    assert float(np.abs(out["prob"] - want).max()) < 1e-4
    # the grey stain alone has R == B everywhere; the magma probability layer drawn over it does not
    colour = [np.abs(out[k][..., 0].astype(int) - out[k][..., 2].astype(int)) for k in ("before", "after")]
    assert colour[0].max() <= 2 and (colour[1] > 20).sum() > 1000, (colour[0].max(), (colour[1] > 20).sum())
