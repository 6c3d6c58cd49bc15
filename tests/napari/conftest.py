"""Fixtures of the napari plugin tests: tiny ISL and segmentation runs, and the guard that needs napari.

They need the extras ``[napari,napari-test]`` and an X server to draw in: with ``xvfb`` installed
(``apt-get install xvfb``), pytest-xvfb starts one for the test session, so ``python -m pytest`` needs no
``xvfb-run``. Missing either: the tests fail under CI=true and skip otherwise (marker ``napari``).

The end of a test session that had TensorFlow and a napari viewer: the suite imports TensorFlow long before
these tests create viewers, so Mesa's OpenGL (llvmpipe under Xvfb) loads its LLVM library after
TensorFlow's, binds to TensorFlow's global LLVM symbols, and the process aborts in the libraries'
destructors at exit (``free(): invalid pointer``, exit code 134) after every test has passed. So
``pytest_unconfigure`` ends such a process with ``os._exit(<pytest's exit status>)`` once pytest has
reported everything. The viewers here do not draw (``show=False``), which is what this order allows; the
order napari users have (viewer first, TensorFlow from the widget) is tested in a fresh process
(``test_napari_process.py``).
"""
from __future__ import annotations

import os
import sys

import pytest

from testkit import META, export_tiny, make_run  # tests/testkit.py

_EXIT: dict = {}  #: "status" -> pytest's exit status, "viewer" -> True once a napari viewer was made

#: the ISL test model: one bright-field input, two targets (two layers, two colormaps)
ISL_META = dict(META, targets=["nuclei", "tubulin"])


def _need(msg: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def _napari_and_a_display():
    """Before any other fixture (``make_napari_viewer`` only exists when napari is installed)."""
    try:
        import napari  # noqa: F401
        import pytestqt  # noqa: F401
    except ImportError as e:
        _need(f"the napari tests need pip install -e '.[napari,napari-test]' ({e})")
    if not os.environ.get("DISPLAY"):
        _need("the napari tests need an X server: apt-get install xvfb (pytest-xvfb then starts it)")
    _EXIT["viewer"] = True


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Skip the crashing library destructors (module doc) when TensorFlow and a viewer shared the process."""
    if not (_EXIT.get("viewer") and "tensorflow" in sys.modules and "status" in _EXIT):
        return
    import logging

    logging.shutdown()
    xvfb = sys.modules.get("pytest_xvfb")
    if xvfb is not None:  # its atexit handler would not run
        xvfb.shutdown_xvfb()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT["status"])


@pytest.fixture(scope="session")
def isl_run(tmp_path_factory):
    """A run folder (config.json + savedmodel/) of a tiny random U-Net: brightfield -> nuclei, tubulin."""
    base = tmp_path_factory.mktemp("napari_runs")
    sm = export_tiny(base / "sm_isl", n_out=2, meta=ISL_META)
    return make_run(base / "runs" / "tiny_isl" / "20250101-000000", base, sm)


@pytest.fixture(scope="session")
def field():
    """A 150 x 130 synthetic bright-field field (uint16): not a multiple of 32, several 64-pixel tiles."""
    from islkeras.data.synthetic import synthetic_field

    return synthetic_field(size=160, rng=3)["transmitted"][:150, :130].copy()


def export_blur_segmenter(out_dir, threshold: float):
    """A segmentation SavedModel (the real exporter, as `islkeras transfer` stores one) whose "probability"
    is the normalised input blurred by a fixed 3x3 mean: on a nuclear stain it is high on the nuclei.
    Exported in about a second (no U-Net), loaded as fast."""
    import tensorflow as tf

    from islkeras.models.savedmodel import export_savedmodel

    inp = tf.keras.Input((None, None, 1))
    out = tf.keras.layers.Conv2D(1, 3, padding="same", use_bias=False,
                                 kernel_initializer=tf.keras.initializers.Constant(1.0 / 9.0))(inp)
    meta = dict(META, kind="segmentation", targets=["mask"], threshold=threshold, input_dtype="uint16")
    return export_savedmodel(tf.keras.Model(inp, out), out_dir, meta)


#: the segmentation model's threshold (z-score units of its input): far from 0.5, so using it shows
SEG_THRESHOLD = 1.25


@pytest.fixture(scope="session")
def nuclei_field():
    """A synthetic nuclear stain (uint16) and its nucleus mask, 150 x 130 pixels."""
    from islkeras.data.synthetic import synthetic_field

    f = synthetic_field(size=160, rng=3)
    return f["nuclei"][:150, :130].copy(), f["mask"][:150, :130].copy()


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory):
    return export_blur_segmenter(tmp_path_factory.mktemp("napari_seg") / "savedmodel", SEG_THRESHOLD)
