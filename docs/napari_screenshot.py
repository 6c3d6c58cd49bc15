"""Make docs/napari_widget.png: napari with the "Predict fluorescence" widget after a prediction.

    .venv/bin/islkeras demo --workdir /tmp/demo          # a run and synthetic fields
    xvfb-run -a .venv/bin/python docs/napari_screenshot.py /tmp/demo/runs/demo/*/ \\
        /tmp/demo/data/field_001/transmitted.tif docs/napari_widget.png

The viewer starts first and the widget loads TensorFlow, as in a napari session; the screenshot is napari's
own ``viewer.screenshot(canvas_only=False)`` (the window with its dock widgets).
"""
from __future__ import annotations

import sys
import time


def main(run: str, image: str, out: str, pixel_size: float = 0.65) -> None:
    import napari
    import tifffile
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="islkeras in napari")
    viewer.window.resize(1500, 900)
    viewer.add_image(tifffile.imread(image), name="transmitted", scale=(pixel_size, pixel_size))
    _, widget = viewer.window.add_plugin_dock_widget("islkeras", "Predict fluorescence")
    if widget.set_model(run) is None:
        raise SystemExit(widget.status.text())
    widget.run()
    t0 = time.time()
    while widget.busy and time.time() - t0 < 600:
        QApplication.processEvents()
        time.sleep(0.02)
    print(widget.status.text())
    viewer.layers.selection.active = viewer.layers[-1]
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.screenshot(out, canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:4])
