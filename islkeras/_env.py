"""Select the Keras 2 API (tf-keras) and segmentation-models' tf.keras backend before TensorFlow loads.

This module must be imported before anything imports TensorFlow; ``islkeras/__init__.py`` does so first.
"""
from __future__ import annotations

import os
import sys


class Keras3Error(ImportError):
    """TensorFlow was imported with Keras 3 before islkeras could select tf-keras."""


def configure() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        # TensorFlow chose its Keras at import time; too late to switch to tf-keras now.
        tf = sys.modules["tensorflow"]
        keras_mod = getattr(getattr(tf, "keras", None), "__name__", "")
        if not keras_mod.startswith("tf_keras"):
            raise Keras3Error(
                "islkeras needs the Keras 2 API (tf-keras), but TensorFlow was already imported with "
                "Keras 3: import islkeras before tensorflow, or set TF_USE_LEGACY_KERAS=1 before starting Python."
            )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ["SM_FRAMEWORK"] = "tf.keras"


configure()
