"""Uncached training input (pipeline.cache: false -> islkeras.data.streams): same crops as the cached path,
only the drawn records read, the cached path's read order reproduced from the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from islkeras.data import streams
from islkeras.data.pipeline import make_dataset
from islkeras.data.reader import shard_paths, split_names
from test_pipeline import _field, locate, pattern_cfg, write_pattern  # tests/data/test_pipeline.py


def _batches(cfg, m, n, **kw):
    return [tuple(t.numpy() for t in b) for b in make_dataset(cfg, "train", True, m, **kw).take(n)]


def _grouped_cfg(tmp_path, n_fields, pipeline):
    root = tmp_path / "data"
    write_pattern(root, n_fields, h=64, w=80)
    rows = "".join(f"f{i},train,{'AB'[i % 3 == 0]}\n" for i in range(n_fields))
    (root / "fields.csv").write_text("fov,split,group\n" + rows)
    return pattern_cfg(tmp_path, n_fields, split={"csv": "fields.csv:split"}, h=64, w=80, pipeline=pipeline)


@pytest.mark.parametrize("pipeline", [
    {},
    {"crops_per_field": 1, "shuffle_buffer": 1},
    {"balance_by": "group", "normalization": "dataset"},
    {"drop_empty": True, "empty_fraction": 0.5, "crops_per_field": 3},  # tgt > threshold in about half the pixels
], ids=["plain", "one-crop", "balance_by", "drop_empty"])
def test_uncached_yields_exactly_the_cached_crops(tmp_path, pipeline):
    # 7 fields in shards of 2 -> 4 shards of 2, 2, 2, 1 records: the 4-way interleave of the cached read order
    cfg, m = _grouped_cfg(tmp_path, 7, pipeline)
    assert sorted(len(s["records"]) for s in m["shards"]) == [1, 2, 2, 2]
    cached = _batches(cfg, m, 12)  # 12 batches of 8 crops: several passes over the 7 fields
    cfg.pipeline.cache = False
    uncached = _batches(cfg, m, 12)
    for a, b in zip(cached, uncached, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    cfg.pipeline.seed = 8  # and the seed still matters
    assert not np.array_equal(_batches(cfg, m, 1)[0][0], uncached[0][0])


def test_uncached_fields_filter_reads_only_the_drawn_records(tmp_path):
    """With fields=[f1] only f1's shard is opened: the other shards may be garbage (the old path read and
    parsed every record of the split, then filtered)."""
    cfg, m = pattern_cfg(tmp_path, n_fields=6, pipeline={"cache": False})
    files = shard_paths(cfg, m, "train")
    keep = next(f for f, s in zip(files, [s for s in m["shards"] if s["split"] == "train"]) if "f1" in s["records"])
    for f in files:
        if f != keep:
            Path(f).write_bytes(b"\x00garbage" * 64)
    field = _field(cfg, "f1")
    s = m["fields"]["f1"]["stats"]["inp"]
    for x, _ in make_dataset(cfg, "train", True, m, fields=["f1"]).take(3):
        for xi in x.numpy()[..., 0]:
            locate(xi.astype(np.float64) * s["std"][0] + s["mean"][0], field)


def test_crops_per_field_crops_come_from_one_read(tmp_path):
    """No augmentation, no shuffle of crops: each run of crops_per_field consecutive crops is one field."""
    cfg, m = pattern_cfg(tmp_path, n_fields=5, pipeline={"cache": False, "augment": False, "shuffle_buffer": 1,
                                                         "crops_per_field": 4, "normalization": "dataset"})
    from test_pipeline import _field_params

    xo, xs = (float(a[0][0]) for a in _field_params(cfg, m, ["f0"], ["inp"], ["tgt"])[:2])
    crops = np.concatenate([x.numpy()[..., 0] for x, _ in make_dataset(cfg, "train", True, m).take(10)])
    which = [int(np.rint(c * xs + xo).min()) // 10000 for c in crops]  # field i holds 10000*i + 1..H*W
    runs = np.reshape(which, (-1, 4))
    assert (runs == runs[:, :1]).all(), runs
    assert sorted(set(runs[:5, 0])) == [0, 1, 2, 3, 4]  # the first 5 runs: one pass over the 5 fields


def test_read_order_is_the_cached_read_order(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=11, pipeline={})  # 6 shards of 2, 2, 2, 2, 2, 1
    files = shard_paths(cfg, m, "train")
    names = split_names(m, "train")
    got = [o[1] for o in streams.read_order(tf, m, "train", files, names)]
    spec = {"name": tf.io.FixedLenFeature([], tf.string)}
    want = [tf.io.parse_single_example(r, spec)["name"].numpy().decode()
            for r in tf.data.TFRecordDataset(files, num_parallel_reads=streams.parallel_reads(files))]
    assert got == want and sorted(got) == names
    assert got != names  # the interleave really reorders (else this test would prove nothing)
    sub = streams.read_order(tf, m, "train", files, ["f3", "f10"])
    pos = {"f3": 0, "f10": 1}  # idx = position in the names given
    assert [(o[0], o[1]) for o in sub] == [(pos[n], n) for n in want if n in pos]

def test_read_records_reads_what_the_index_names_and_checks_it(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=5, pipeline={})
    files = shard_paths(cfg, m, "train")
    order = streams.read_order(tf, m, "train", files, split_names(m, "train"))
    spec = {"name": tf.io.FixedLenFeature([], tf.string)}

    def parse(raw):
        name = tf.io.parse_single_example(raw, spec)["name"]
        return tf.constant(-1, tf.int64), name, (), ()

    pick = [order[i] for i in (3, 0, 3, 4, 1)]  # repeats allowed: one read per draw
    idx, nm, fi, pos = (list(c) for c in zip(*pick))
    index = tf.data.Dataset.from_tensor_slices((idx, nm, fi, pos))
    got = [(int(i), n.decode()) for i, n, _, _ in streams.read_records(tf, index, files, parse).as_numpy_iterator()]
    assert got == [(p[0], p[1]) for p in pick]
    wrong = tf.data.Dataset.from_tensor_slices((idx[:1], ["f9"], fi[:1], pos[:1]))  # name not at that position
    with pytest.raises(tf.errors.InvalidArgumentError, match="not the one the manifest lists"):
        list(streams.read_records(tf, wrong, files, parse))


@pytest.mark.parametrize("dtype,planes", [("uint16", 3), ("float32", 1), ("uint8", 2)])
def test_cut_rows_decodes_only_the_crop_rows_exactly(dtype, planes):
    a = np.random.default_rng(0).integers(0, 250, (40, 24, planes)).astype(dtype)
    y0, x0 = tf.constant([0, 29, 7], tf.int32), tf.constant([13, 0, 5], tf.int32)
    got = streams.cut_rows(tf, tf.constant(a.tobytes()), dtype, planes, tf.constant(24), y0, x0, 11).numpy()
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 11, 11, planes)
    for j, (y, x) in enumerate(zip(y0.numpy(), x0.numpy())):
        np.testing.assert_array_equal(got[j], a[y:y + 11, x:x + 11])
