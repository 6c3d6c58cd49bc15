"""SavedModel export of a trained generator: raw-image signature, reload for fine-tuning, equal outputs."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from testkit import AISEG_CFG, small_cfg  # noqa: F401  (tests/testkit.py)


@pytest.fixture(scope="module")
def exported(aiseg_dir, tmp_path_factory):
    """A plain U-Net with non-trivial BN statistics, exported with the metadata `fit` stores."""
    from islkeras.data.reader import load_fields
    from islkeras.data.records import ensure_records
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.models.unet import build_generator
    from islkeras.training.fit import export_meta

    base = tmp_path_factory.mktemp("isl_export")
    cfg = small_cfg(base, name="export_l1")
    manifest = ensure_records(cfg)
    tf.keras.utils.set_random_seed(3)
    model = build_generator(cfg.model, 1, 1)
    x = np.random.default_rng(0).normal(size=(4, 64, 64, 1)).astype(np.float32)
    model(x, training=True)  # move BN statistics away from their initial values
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(1).normal(0, 0.1, layer.moving_mean.shape))
    meta = export_meta(cfg, manifest)
    path = export_savedmodel(model, base / "savedmodel", meta)
    field = load_fields(cfg, "test", manifest)[0]
    return model, path, meta, field


def _normalise(meta, raw):
    """The run's normalisation of a whole field, in numpy (islkeras.data.normalize)."""
    from islkeras.data.normalize import normalize_np, offset_scale_of_image

    n = meta["normalization"]
    off, sc = offset_scale_of_image(raw, n["method"], n["percentiles"], n.get("input_dataset"))
    return normalize_np(raw, off, sc)


def _reference(model, meta, raw):
    """In-memory model on the field normalised in numpy, mapped back to the target's intensities."""
    y = model(_normalise(meta, raw)[None], training=False).numpy()[0]
    ts = meta["target_scale"]
    return y * np.float32(ts["scale"][0]) + np.float32(ts["offset"][0])


def test_export_signatures_match_in_memory_model_and_reload_fine_tunes(exported):
    from islkeras.models.savedmodel import load_exported

    model, path, meta, field = exported
    raw = field.arrays["brightfield"][:512, :480]  # uint8, width not a multiple of 32: padded in the graph
    assert raw.dtype == np.uint8

    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures["serving_default"]
    spec = sig.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 1]
    out = sig(image=tf.constant(raw[None]))["prediction"].numpy()[0]
    assert out.shape == (512, 480, 1) and out.dtype == np.float32

    exp = load_exported(path)
    np.testing.assert_allclose(exp.predict_raw(raw[None])[0], out, atol=1e-5, rtol=0)

    # on a 32-aligned field the serving graph equals "normalise in numpy, run the in-memory model"
    raw32 = field.arrays["brightfield"][:512, :512]
    ref = _reference(model, meta, raw32)
    np.testing.assert_allclose(exp.predict_raw(raw32[None])[0], ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)
    # normalisation happens inside: rescaled raw intensities give the same prediction
    np.testing.assert_allclose(exp.predict_raw((raw32 // 2)[None])[0], _reference(model, meta, raw32 // 2),
                               atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)

    # the bare network: Keras reload and the `normalized` signature equal the in-memory model
    x = _normalise(meta, raw32)[None]
    mem = model(x, training=False).numpy()
    keras = tf.keras.models.load_model(str(path), compile=False)
    assert np.abs(keras(x, training=False).numpy() - mem).max() < 1e-5
    assert np.abs(loaded.signatures["normalized"](x=tf.constant(x))["prediction"].numpy() - mem).max() < 1e-5

    # ... and the Keras reload fine-tunes
    keras.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="mae")
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 1)).astype(np.float32)
    before = [w.copy() for w in keras.get_weights()]
    keras.fit(x, x, epochs=1, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, keras.get_weights()))


@pytest.mark.parametrize("method", ["minmax", "dataset", "zscore", "percentile"])
def test_serving_graph_normalisation_matches_numpy(method):
    """The in-graph normalisation of ``serving_default`` (an identity network, so the output is the
    normalised image) against the documented formula in numpy, per image and channel, on a uint16 batch
    whose size is not a multiple of 32 (padded in the graph, cropped back)."""
    from islkeras.models.savedmodel import make_serving_fn

    inp = tf.keras.Input((None, None, 2))
    identity = tf.keras.Model(inp, tf.keras.layers.Activation("linear")(inp))
    ds = {"offset": [100.0, 2000.0], "scale": [50.0, 400.0]}
    meta = {"kind": "isl", "input_dtype": "uint16", "target_scale": {"offset": [0.0, 0.0], "scale": [1.0, 1.0]},
            "normalization": {"method": method, "percentiles": [1.0, 99.8], "input_dataset": ds}}
    rng = np.random.default_rng(4)
    raw = np.stack([rng.integers(10, 300, (2, 40, 50)), rng.integers(500, 60000, (2, 40, 50))], -1).astype(np.uint16)
    got = make_serving_fn(identity, meta)(tf.constant(raw))["prediction"].numpy()
    x = raw.astype(np.float64)
    if method == "minmax":
        lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
        want = (x - lo) / (hi - lo)
    elif method == "dataset":
        want = (x - np.array(ds["offset"])) / np.array(ds["scale"])
    elif method == "zscore":
        want = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    else:
        lo, hi = (np.percentile(x, q, axis=(1, 2), keepdims=True) for q in (1.0, 99.8))
        want = (x - lo) / (hi - lo)
    assert got.shape == raw.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
