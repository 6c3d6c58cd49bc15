"""Helpers shared by several test folders (tests/ is on sys.path: it holds the root conftest.py).

Small configs and tiny models, so each test trains or predicts in seconds.
"""
from __future__ import annotations

from pathlib import Path

from islkeras.config import load_config

PROJECT = Path(__file__).resolve().parents[1]
AISEG_CFG = PROJECT / "experiments" / "aiseg_nuclei_l1.json"


def small_overrides(base: Path, **extra) -> dict:
    """aiseg_nuclei_l1 shrunk for tests: 8 fields, 64x64 crops, a plain U-Net with 8 filters."""
    ov = {
        "data.fields": "fov_00[1-8]", "data.records": str(base / "records"), "training.runs_dir": str(base / "runs"),
        "model.architecture": "unet", "model.unet_filters": 8, "model.unet_depth": 3,
        "pipeline.crop_size": 64, "pipeline.crops_per_field": 2, "pipeline.eval_mode": "grid",
        "training.batch_size": 4, "training.epochs": 2, "training.steps_per_epoch": 4,
        "training.validation_steps": 2, "training.lr_schedule": None, "training.max_minutes": None,
        "loss.vgg_weights": None, "loss.vgg_layers": ["block1_conv2", "block2_conv2"], "loss.patchgan_filters": 8,
    }
    ov.update(extra)
    return ov


def small_cfg(base: Path, **extra):
    return load_config(AISEG_CFG, overrides=small_overrides(base, **extra))


META = {
    "kind": "isl", "inputs": ["brightfield"], "targets": ["nuclei"], "input_dtype": "uint8",
    "normalization": {"method": "zscore", "percentiles": [1.0, 99.8]},
    "target_scale": {"offset": [20.0], "scale": [30.0]},
}


def export_tiny(out_dir, n_in=1, n_out=1, meta=None, seed=0):
    """A plain U-Net (8 filters, depth 3, random init) exported as an islkeras SavedModel."""
    import tensorflow as tf

    from islkeras.config import ModelConfig
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator

    tf.keras.utils.set_random_seed(seed)
    model = build_generator(ModelConfig(architecture="unet", unet_filters=8, unet_depth=3), n_in, n_out)
    return export_savedmodel(model, out_dir, meta or META)


def make_run(run_dir, data_root, savedmodel_src=None, arch="unet", loss="l1", history=True):
    """A run folder as `islkeras fit` leaves it: config.json, savedmodel/, history.csv."""
    import shutil

    from islkeras.config import from_dict

    cfg = from_dict({
        "name": "tiny_aiseg",
        "data": {
            "root": str(data_root), "fields": "fov_*",
            "channels": {"brightfield": {"file": "brightfield.tif"}, "nuclei": {"file": "nuclei.tif"},
                         "mask": {"file": "mask.tif"}},
            "inputs": ["brightfield"], "targets": ["nuclei"], "masks": ["mask"],
            "split": {"csv": "fields.csv:split", "id_column": "fov"},
            "records": str(run_dir.parent / "records"),
        },
        "pipeline": {"crop_size": 256, "normalization": "zscore", "eval_mode": "whole"},
        "model": {"architecture": arch, "unet_filters": 8, "unet_depth": 3},
        "loss": {"kind": loss},
        "training": {"runs_dir": str(run_dir.parent)},
    }, base_dir=run_dir.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    if savedmodel_src is not None:
        shutil.copytree(savedmodel_src, run_dir / "savedmodel")
    if history:
        rows = ["epoch,loss,val_loss,val_pcc,val_pcc_std,lr"] + [
            f"{e},{1 / (e + 1):.4f},{1.2 / (e + 1):.4f},{0.5 + e * 0.05:.3f},0.1,0.001" for e in range(5)]
        (run_dir / "history.csv").write_text("\n".join(rows) + "\n")
    return run_dir


def write_ome_tiff(path, data, channels, pixel_size_um=None):
    """``data`` (T, C, Z, Y, X) as an OME-TIFF (tifffile) with channel names and a (y, x) pixel size in um."""
    import tifffile

    md = {"axes": "TCZYX", "Channel": {"Name": list(channels)}}
    if pixel_size_um is not None:
        md.update(PhysicalSizeY=pixel_size_um[0], PhysicalSizeX=pixel_size_um[1])
    tifffile.imwrite(path, data, ome=True, metadata=md)
    return path


def write_ome_zarr(path, data, channels, pixel_size=None, unit="micrometer"):
    """``data`` (T, C, Z, Y, X) as an OME-Zarr folder (bioio-ome-zarr's writer, NGFF 0.5); pixel size (y, x)."""
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    y, x = pixel_size if pixel_size is not None else (1.0, 1.0)
    w = OMEZarrWriter(str(path), level_shapes=data.shape, dtype=data.dtype,
                      channels=[Channel(label=n, color="FFFFFF") for n in channels],
                      physical_pixel_size=[1.0, 1.0, 1.0, y, x] if pixel_size is not None else None,
                      axes_units=[None, None, unit, unit, unit] if pixel_size is not None else None)
    w.write_full_volume(data)
    return path


def require_extra(extra: str, *modules: str) -> None:
    """Import ``modules``; if one is missing, fail under CI=true (CI installs every extra) else skip, naming
    the extra to install."""
    import importlib
    import os

    import pytest

    try:
        for m in modules:
            importlib.import_module(m)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the {extra} tests need pip install -e '.[{extra}]' ({e})")
        pytest.skip(f"{extra} extra not installed ({e})")
