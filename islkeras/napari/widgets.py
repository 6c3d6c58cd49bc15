"""The dock widgets: "Predict fluorescence" and "Segment nuclei" (Plugins menu, or
``viewer.window.add_plugin_dock_widget("islkeras", "Predict fluorescence")``).

Both take a model -- a run folder (``runs/<name>/<stamp>``, whose ``config.json`` gives the input channels'
z planes / projection) or a SavedModel folder -- and one image layer per input channel of the model, and
run ``islkeras.inference.tiling.predict_field`` (the tiled prediction of ``islkeras predict``, on an
``islkeras.models.savedmodel.ExportedModel``) in a worker thread; a progress bar counts the tiles. The
pixel size is the input layer's scale (``layers.pixel_size_text``); the new layers keep it.

* Predict fluorescence: one image layer per target channel, ``<channel> (predicted)``, colormap from the
  channel's name, contrast from percentiles; predicting again from the same input layer replaces them.
* Segment nuclei (segmentation runs of ``islkeras transfer``): the probability thresholded at the run's
  threshold, split into nuclei by the classical masks code (``layers.labels_from_probability``) -> a labels
  layer ``nuclei (labels)`` (and, when ticked, the probability layer).

A model that cannot be loaded, or layers it cannot predict, show one line in the widget (red); the viewer
stays usable. Models are loaded once per SavedModel (``_MODELS``) and kept while the process runs.

TensorFlow and the viewer's OpenGL share the process: ``import_tensorflow`` loads TensorFlow with
``RTLD_DEEPBIND``, because with Mesa's OpenGL (llvmpipe under Xvfb, Intel/AMD drivers) the viewer has
already loaded Mesa's LLVM library with global symbols, and TensorFlow's own LLVM binds to it and crashes
on import (segmentation fault, measured with Mesa 22.3 / TensorFlow 2.21). The other order -- TensorFlow
imported before the first viewer, e.g. by a script -- leaves TensorFlow's LLVM global instead, and Mesa
then crashes when it draws; start napari first (the Plugins menu always does).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Optional

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from islkeras.errors import UserError
from islkeras.napari.layers import (LayerInput, ModelInfo, labels_from_probability, model_info, model_input,
                                    one_line, pixel_size_text, prediction_layers)

_MODELS: dict = {}  #: (SavedModel path, saved_model.pb mtime) -> ExportedModel
_MODELS_LOCK = threading.Lock()


def import_tensorflow():
    """``import tensorflow`` for a process that may already draw with OpenGL (see the module doc): with
    ``RTLD_DEEPBIND`` its libraries use their own symbols first. A no-op once TensorFlow is imported."""
    if "tensorflow" not in sys.modules:
        import islkeras  # noqa: F401  (selects tf-keras before TensorFlow loads)

        old = sys.getdlopenflags()
        sys.setdlopenflags(old | getattr(os, "RTLD_DEEPBIND", 0))
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.setdlopenflags(old)
    return sys.modules["tensorflow"]


def load_model(info: ModelInfo):
    """The ``ExportedModel`` of ``info`` (cached); ``UserError`` naming the folder when it fails to load."""
    from islkeras.models.savedmodel import ExportedModel

    key = (str(info.path), (info.path / "saved_model.pb").stat().st_mtime_ns)
    with _MODELS_LOCK:  # one import / load at a time, also with both widgets running
        import_tensorflow()
        if key not in _MODELS:
            try:
                _MODELS[key] = ExportedModel(info.path)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{info.path}: could not load the SavedModel ({one_line(e)})") from None
        return _MODELS[key]


class _Progress(QObject):
    """Carries ``predict_field``'s tile callback from the worker thread to the progress bar (queued)."""

    tiles = Signal(int, int)


class _ModelWidget(QWidget):
    """What both widgets share: the model picker, one layer choice per input channel, tiling, run, status."""

    run_text = "Run"
    kinds = ("isl", "segmentation")

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.info: Optional[ModelInfo] = None
        self._loaded_text: Optional[str] = None  #: the model text self.info was read from
        self.worker = None
        self.layer_boxes: dict[str, QComboBox] = {}
        self._progress = _Progress()
        self._progress.tiles.connect(self._on_tiles)

        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("run folder (runs/<name>/<stamp>) or SavedModel folder")
        self.model_edit.editingFinished.connect(self.load_model)
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.model_edit)
        row.addWidget(browse)
        self.model_label = QLabel("no model")
        self.model_label.setWordWrap(True)
        self.inputs_form = QFormLayout()
        self.tile = QSpinBox()
        self.tile.setRange(32, 8192)
        self.tile.setSingleStep(32)
        self.tile.setValue(512)
        self.tile.setToolTip("Memory bound: 4 tiles of this size per forward pass (multiple of 32); smaller uses less "
                             "memory. The grid itself is chosen to compute the fewest pixels within it")
        self.overlap = QSpinBox()
        self.overlap.setRange(0, 4096)
        self.overlap.setSingleStep(32)
        self.overlap.setValue(64)
        self.run_button = QPushButton(self.run_text)
        self.run_button.clicked.connect(self.run)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Model", row)
        form.addRow(self.model_label)
        form.addRow("Tile size", self.tile)
        form.addRow("Tile overlap", self.overlap)
        self.add_options(form)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Input layers"))
        layout.addLayout(self.inputs_form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)
        for ev in ("inserted", "removed", "moved"):
            getattr(self.viewer.layers.events, ev).connect(self._refresh_layers)

    # ------------------------------------------------------------------------------ hooks
    def add_options(self, form: QFormLayout) -> None:
        """Extra rows of a subclass."""

    def options(self) -> dict:
        """A subclass's options, read in the GUI thread before the worker starts."""
        return {}

    def job(self, info: ModelInfo, model, image, source: LayerInput, callback, tile: int, overlap: int,
            **options) -> list[tuple]:
        """The worker thread's work: returns napari layer data ``[(data, kwargs, type), ...]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ model
    def _browse(self):
        d = QFileDialog.getExistingDirectory(self, "Run folder or SavedModel", self.model_edit.text())
        if d:
            self.set_model(d)

    def set_model(self, path) -> Optional[ModelInfo]:
        self.model_edit.setText(str(path))
        return self.load_model()

    def load_model(self) -> Optional[ModelInfo]:
        """Read the model's metadata (not TensorFlow yet) and offer a layer per input channel."""
        text = self.model_edit.text().strip()
        if self.info is not None and text == self._loaded_text:
            return self.info
        self.info, self._loaded_text = None, text
        self._clear_inputs()
        try:
            info = model_info(text)
            if info.kind not in self.kinds:
                raise UserError(self.wrong_kind(info))
        except Exception as e:  # one line in the widget, never a traceback in the viewer
            self.model_label.setText("no model")
            self.show_error(one_line(e))
            return None
        self.info = info
        self.model_label.setText(info.describe())
        for name in info.inputs:
            box = QComboBox()
            box.setToolTip(f"image layer of input channel {name!r}: 2-D, or a z-stack (planes, y, x)")
            self.layer_boxes[name] = box
            self.inputs_form.addRow(name, box)
        self._refresh_layers()
        self.show_status("")
        return info

    def wrong_kind(self, info: ModelInfo) -> str:
        return f"{info.path}: a {info.kind} model; this widget takes {' or '.join(self.kinds)} models"

    def _clear_inputs(self):
        while self.inputs_form.rowCount():
            self.inputs_form.removeRow(0)
        self.layer_boxes = {}

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [lay for lay in self.viewer.layers if isinstance(lay, Image)]

    def _refresh_layers(self, event=None):
        names = [lay.name for lay in self._image_layers()]
        for channel, box in self.layer_boxes.items():
            current = box.currentText()
            box.blockSignals(True)
            box.clear()
            box.addItems(names)
            if current in names:
                box.setCurrentText(current)
            else:  # a layer named like the channel, else the first one
                match = [n for n in names if channel.lower() in n.lower()]
                if match:
                    box.setCurrentText(match[0])
            box.blockSignals(False)

    # ------------------------------------------------------------------------------ run
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def run(self):
        """Start the prediction in a worker thread (returns the worker, None when nothing could start)."""
        from napari.qt.threading import create_worker

        if self.busy:
            return None
        info = self.load_model()
        if info is None:
            return None
        try:
            chosen = []
            for name, box in self.layer_boxes.items():
                if not box.currentText() or box.currentText() not in self.viewer.layers:
                    raise UserError(f"no image layer for input channel {name!r}: open an image first")
                chosen.append(LayerInput.of(self.viewer.layers[box.currentText()]))
        except Exception as e:
            self.show_error(one_line(e))
            return None
        self.run_button.setEnabled(False)
        self.progress.setRange(0, 0)  # busy until the first tiles are done (loading the model)
        self.show_status(f"loading the model and predicting {', '.join(c.name for c in chosen)}; "
                         + pixel_size_text(chosen[0].frame))
        tile, overlap, options = int(self.tile.value()), int(self.overlap.value()), self.options()
        emit = self._progress.tiles.emit

        def work():
            from islkeras.inference.tiling import check_tiling

            check_tiling(tile, overlap)
            model = load_model(info)
            image = model_input(info, chosen)
            return self.job(info, model, image, chosen[0], emit, tile, overlap, **options)

        self.worker = create_worker(work, _start_thread=False,
                                    _connect={"returned": self._on_done, "errored": self._on_error,
                                              "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def _on_tiles(self, done: int, total: int):
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_done(self, layers):
        for data, kw, kind in layers:
            self.show_layer(data, kw, kind)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.show_status("added " + ", ".join(kw["name"] for _, kw, _ in layers) + "; "
                         + pixel_size_text({k: kw[k] for k in ("scale", "units") if k in kw}))

    def show_layer(self, data, kw: dict, kind: str):
        """Add the layer, or replace the data of the one this widget made from the same input layer."""
        for lay in self.viewer.layers:
            if lay.name == kw["name"] and lay.metadata.get("islkeras") == kw["metadata"]["islkeras"] \
                    and type(lay).__name__.lower() == kind and lay.data.shape == data.shape:
                lay.data = data
                if "contrast_limits" in kw:
                    lay.contrast_limits = kw["contrast_limits"]
                return lay
        return getattr(self.viewer, f"add_{kind}")(data, **kw)

    def _on_error(self, e):
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.show_error(one_line(e))

    def _on_finished(self):
        self.worker = None
        self.run_button.setEnabled(True)

    def show_error(self, text: str):
        self.status.setStyleSheet("color: #ff6b6b;")
        self.status.setText(text)

    def show_status(self, text: str):
        self.status.setStyleSheet("")
        self.status.setText(text)


class PredictWidget(_ModelWidget):
    """Predict fluorescence: a run folder or SavedModel + input layer(s) -> one image layer per target."""

    run_text = "Predict fluorescence"

    def add_options(self, form):
        self.tta = QCheckBox("average the 8 rotations/flips (8x slower)")
        form.addRow("Test-time augmentation", self.tta)

    def options(self):
        return {"tta": bool(self.tta.isChecked())}

    def job(self, info, model, image, source, callback, tile, overlap, tta=False):
        from islkeras.inference.tiling import predict_field

        pred = predict_field(model, image, tile=tile, overlap=overlap, callback=callback, tta=tta)
        return prediction_layers(pred, info, source)


class SegmentWidget(_ModelWidget):
    """Segment nuclei: a segmentation run (``islkeras transfer``) + input layer(s) -> a labels layer."""

    run_text = "Segment nuclei"
    kinds = ("segmentation",)

    def add_options(self, form):
        from islkeras.segmentation.classical import ClassicalParams

        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.min_size.setValue(ClassicalParams().min_size)
        self.min_size.setToolTip("nuclei with fewer pixels are removed")
        self.split = QCheckBox("split touching nuclei (watershed)")
        self.split.setChecked(True)
        self.keep_prob = QCheckBox("also add the probability layer")
        form.addRow("Minimum size (px)", self.min_size)
        form.addRow(self.split)
        form.addRow(self.keep_prob)

    def wrong_kind(self, info):
        return (f"{info.path}: an ISL model ({', '.join(info.inputs)} -> {', '.join(info.outputs)}); Segment "
                "nuclei needs a segmentation run of `islkeras transfer` (use Predict fluorescence for this "
                "one)")

    def options(self):
        return {"min_size": int(self.min_size.value()), "split": bool(self.split.isChecked()),
                "keep_prob": bool(self.keep_prob.isChecked())}

    def job(self, info, model, image, source, callback, tile, overlap, min_size=None, split=True,
            keep_prob=False):
        from islkeras.inference.tiling import predict_field

        prob = predict_field(model, image, tile=tile, overlap=overlap, callback=callback)
        labels = labels_from_probability(prob[..., 0], info.threshold, min_size, split)
        meta = {"islkeras": {"model": str(info.path), "source": source.name, "threshold": info.threshold}}
        out = [(labels, dict(name="nuclei (labels)", metadata=meta, **source.frame), "labels")]
        if keep_prob:
            out = prediction_layers(prob[..., :1], info, source) + out
        return out
