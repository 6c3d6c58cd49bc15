"""Shared test fixtures.

Tests that need the real microscopy data in ../shared/data (or $ISLKERAS_DATA) fail when it is
missing under CI=true, and skip otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ISLKERAS_NO_PROGRESS", "1")
import islkeras  # noqa: E402,F401  (selects tf-keras before any test imports TensorFlow)
from islkeras.utils import shared_data_dir  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"shared data not found at {path} (set ISLKERAS_DATA to the folder holding it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (fails under CI=true when missing)."""
    return _require(shared_data_dir())


@pytest.fixture(scope="session")
def aiseg_dir(data_dir) -> Path:
    return _require(data_dir / "aiseg-nuclei")


@pytest.fixture(scope="session")
def neurons_dir(data_dir) -> Path:
    return _require(data_dir / "isl-neurons")


@pytest.fixture(scope="session")
def dsb_dir(data_dir) -> Path:
    return _require(data_dir / "dsb2018-nuclei")


@pytest.fixture(scope="session")
def stardist_dir(data_dir) -> Path:
    return _require(data_dir / "stardist-nuclei")


@pytest.fixture(scope="session")
def experiments_dir() -> Path:
    return PROJECT / "experiments"
