"""SavedModel export with a serving signature that takes raw microscope images, and its loader.

``export_savedmodel`` saves the Keras generator itself (``tf.keras.models.load_model`` reloads it for
fine-tuning) with two signatures:

* ``serving_default(image)``: raw images ``[N, H, W, C_in]`` in the microscope's dtype (the training
  input's dtype, e.g. uint8 or uint16), any height and width. In the graph: cast to float32, normalise
  each image with its own statistics (the run's method: see ``islkeras.data.normalize``), pad to a
  multiple of 32 (reflection), run the network in inference mode, crop back, and map the prediction to
  the target's intensity scale (``kind == "isl"``) -- or leave probabilities (``kind == "segmentation"``).
  Output ``{"prediction": float32 [N, H, W, C_out]}``.
* ``normalized(x)``: the bare network on already normalised float32 input whose H and W are multiples of
  32; tiled whole-field prediction normalises the whole field once and calls this per batch of tiles.

``assets/islkeras.json`` holds the metadata (channels, dtype, normalisation, target scale, config hash).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np

from islkeras.data import normalize as N
from islkeras.errors import UserError
from islkeras.models.unet import MULTIPLE

META_FILE = "islkeras.json"
REQUIRED_META = ("kind", "inputs", "targets", "input_dtype", "normalization")


def _pad_amount(tf, n):
    return (MULTIPLE - n % MULTIPLE) % MULTIPLE


def make_serving_fn(model, meta: dict):
    """The raw-image -> prediction tf.function exported as ``serving_default``."""
    import tensorflow as tf

    n_in = int(model.input_shape[-1])
    dtype = tf.as_dtype(meta["input_dtype"])
    norm = meta["normalization"]
    method, pct, ds = norm["method"], norm.get("percentiles", [1.0, 99.8]), norm.get("input_dataset")
    ts = meta.get("target_scale")
    is_isl = meta["kind"] == "isl"

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, n_in], dtype, name="image")])
    def serving(image):
        x = tf.cast(image, tf.float32)
        off, sc = N.offset_scale_tf(x, method, pct, ds)
        x = (x - off) / sc
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        ph, pw = _pad_amount(tf, h), _pad_amount(tf, w)
        paddings = [[0, 0], [0, ph], [0, pw], [0, 0]]
        # reflection needs the pad to be smaller than the image; tiny images are padded with 0 (= the mean)
        x = tf.cond(tf.logical_and(ph < h, pw < w),
                    lambda: tf.pad(x, paddings, mode="REFLECT"), lambda: tf.pad(x, paddings))
        y = tf.cast(model(x, training=False), tf.float32)[:, :h, :w, :]
        if is_isl and ts is not None:
            y = y * tf.constant(ts["scale"], tf.float32) + tf.constant(ts["offset"], tf.float32)
        return {"prediction": y}

    return serving


def make_normalized_fn(model):
    import tensorflow as tf

    n_in = int(model.input_shape[-1])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, n_in], tf.float32, name="x")])
    def normalized(x):
        return {"prediction": tf.cast(model(x, training=False), tf.float32)}

    return normalized


def export_savedmodel(model, out_dir: Union[str, Path], meta: dict) -> Path:
    """Save ``model`` (a Keras generator) to ``out_dir`` atomically, with both signatures and metadata."""
    import tensorflow as tf

    from islkeras.utils import atomic_dir, atomic_write_json

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"export metadata lacks {missing}")
    meta = dict(meta, multiple=MULTIPLE, n_inputs=int(model.input_shape[-1]),
                n_outputs=int(model.output_shape[-1]), format_version=1)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tf.keras.models.save_model(
            model, str(tmp), include_optimizer=False, save_format="tf",
            signatures={"serving_default": make_serving_fn(model, meta), "normalized": make_normalized_fn(model)},
        )
        atomic_write_json(tmp / "assets" / META_FILE, meta)
    return out_dir


def find_savedmodel(path: Union[str, Path]) -> Path:
    """A SavedModel folder from a run folder (``<run>/savedmodel``), a TF-Serving base or the folder itself."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such run folder or SavedModel")
    for cand in (p, p / "savedmodel"):
        if (cand / "saved_model.pb").is_file():
            return cand
    versions = sorted((d for d in p.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)) \
        if p.is_dir() else []
    if versions and (versions[-1] / "saved_model.pb").is_file():
        return versions[-1]
    raise UserError(f"{p}: not a run folder or SavedModel (no saved_model.pb in it or in {p / 'savedmodel'})")


def read_meta(savedmodel: Union[str, Path]) -> dict:
    f = Path(savedmodel) / "assets" / META_FILE
    if not f.is_file():
        raise UserError(f"{savedmodel}: not an islkeras SavedModel (no assets/{META_FILE})")
    meta = json.loads(f.read_text())
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{f}: metadata lacks {', '.join(missing)}")
    return meta


class ExportedModel:
    """An exported islkeras SavedModel: metadata plus its two signatures (numpy in, numpy out)."""

    def __init__(self, path: Union[str, Path]):
        import tensorflow as tf

        self.path = find_savedmodel(path)
        self.meta = read_meta(self.path)
        self._obj = tf.saved_model.load(str(self.path))
        sigs = self._obj.signatures
        if "serving_default" not in sigs or "normalized" not in sigs:
            raise UserError(f"{self.path}: SavedModel lacks the serving_default/normalized signatures")
        self._serving = sigs["serving_default"]
        self._normalized = sigs["normalized"]
        self.input_dtype = np.dtype(self.meta["input_dtype"])
        self.n_inputs = int(self.meta["n_inputs"])
        self.n_outputs = int(self.meta["n_outputs"])

    # --------------------------------------------------------------------------------- signatures
    def predict_raw(self, batch: np.ndarray) -> np.ndarray:
        """serving_default on a raw (N, H, W, C) batch (cast to the model's input dtype)."""
        import tensorflow as tf

        x = tf.constant(np.asarray(batch).astype(self.input_dtype, copy=False))
        return self._serving(image=x)["prediction"].numpy()

    def predict_normalized(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._normalized(x=tf.constant(np.asarray(batch, np.float32)))["prediction"].numpy()

    # --------------------------------------------------------------------------------- numpy side
    def offset_scale(self, image: np.ndarray):
        """Whole-field normalisation constants of an (H, W, C) image, as the serving graph computes them."""
        n = self.meta["normalization"]
        return N.offset_scale_of_image(image, n["method"], n.get("percentiles", [1.0, 99.8]), n.get("input_dataset"))

    def offset_scale_of_blocks(self, blocks, total_pixels=None):
        """``offset_scale`` of a field given as blocks that tile it (read region by region)."""
        n = self.meta["normalization"]
        return N.offset_scale_of_blocks(blocks, n["method"], n.get("percentiles", [1.0, 99.8]),
                                        n.get("input_dataset"), total_pixels=total_pixels)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        off, sc = self.offset_scale(image)
        return N.normalize_np(image, off, sc)

    def to_output_scale(self, pred: np.ndarray) -> np.ndarray:
        """Map a ``normalized`` prediction to the target's intensity scale (ISL) -- identity for segmentation."""
        ts = self.meta.get("target_scale")
        if self.meta["kind"] != "isl" or ts is None:
            return pred.astype(np.float32, copy=False)
        return N.denormalize_np(pred, ts["offset"], ts["scale"])

    def keras_model(self):
        import tensorflow as tf

        return tf.keras.models.load_model(str(self.path), compile=False)


def load_exported(path: Union[str, Path]) -> ExportedModel:
    return ExportedModel(path)


def copy_savedmodel(src: Union[str, Path], dst: Union[str, Path], extra_meta: Optional[dict] = None) -> Path:
    """Copy a SavedModel folder atomically (e.g. into a TF-Serving ``<base>/<name>/<version>/``)."""
    from islkeras.utils import atomic_dir, atomic_write_json

    src = find_savedmodel(src)
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if extra_meta:
            meta = read_meta(tmp)
            meta.update(extra_meta)
            atomic_write_json(tmp / "assets" / META_FILE, meta)
    os.utime(dst)
    return dst
