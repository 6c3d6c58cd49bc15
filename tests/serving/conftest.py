"""Shared by the serving tests: one model base of tiny exported U-Nets, the same SavedModels loaded in this
process, and in-process servers on free loopback ports that reuse those loaded models.

The base: model ``isl`` with versions 1 and 2 (different weights) and model ``other`` (a copy of isl/1).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

META = {"kind": "isl", "inputs": ["bf"], "targets": ["nuc"], "input_dtype": "uint8",
        "normalization": {"method": "zscore", "percentiles": [1, 99.8], "input_dataset": None},
        "target_scale": {"offset": [10.0], "scale": [5.0]}}


def _tiny_model(seed: int):
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(seed)
    return build_generator(ModelConfig(architecture="unet", unet_filters=8, unet_depth=3), 1, 1)


@pytest.fixture(scope="session")
def model_base(tmp_path_factory) -> Path:
    from islkeras.models.savedmodel import copy_savedmodel, export_savedmodel

    base = tmp_path_factory.mktemp("models")
    for version in (1, 2):
        export_savedmodel(_tiny_model(version), base / "isl" / str(version), META)
    copy_savedmodel(base / "isl" / "1", base / "other" / "1")
    return base


@pytest.fixture(scope="session")
def direct(model_base):
    """The SavedModels loaded in this process: {(name, version): ExportedModel}."""
    from islkeras.models.savedmodel import ExportedModel

    return {("isl", 1): ExportedModel(model_base / "isl" / "1"), ("isl", 2): ExportedModel(model_base / "isl" / "2")}


@pytest.fixture(scope="session")
def start_server(model_base, direct):
    """``start_server(**options) -> server``: ``make_server`` on 127.0.0.1, a free port, in a thread of this
    process; its versions "load" the models of ``direct`` (instantly). Stopped at the end of the session."""
    from islkeras.serving.http import make_server
    from islkeras.serving.repository import ModelVersion

    mp = pytest.MonkeyPatch()
    real = ModelVersion._load
    mp.setattr(ModelVersion, "_load", lambda self: direct.get((self.name, self.version)) or real(self))
    running = []

    def start(**options):
        srv = make_server(model_base, "127.0.0.1", 0, **{"preload": "none", **options})
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        running.append((srv, th))
        srv.host, srv.port = srv.server_address[:2]
        return srv

    yield start
    for srv, th in running:
        srv.shutdown()
        srv.server_close()
        th.join(10)
    mp.undo()
