"""Uncached training input (``pipeline.cache: false``): the order of the fields is decided on small index
tuples, and only then is each record read, by its position in its shard.

Why: shuffling (and ``balance_by``) on the decoded record stream holds ``len(fields)`` decoded fields in the
shuffle buffer -- as much memory as the cache it was meant to avoid -- and ``balance_by`` filtered one full
read of every shard per group (every record read and parsed once per group, kept by one). Here the shuffle
buffer and the group filters see ``(idx, name, shard, position)`` tuples; the records are then read with a
parallel interleave over single-record reads (``TFRecordDataset(shard).skip(position).take(1)``: the skipped
records' headers are read, their bodies seeked over), so memory stays a few records whatever the size of
the training set, and each record chosen is read exactly once per draw. The channels stay bytes until the
crops are cut (``cut_rows``): of each record only the rows of its ``crops_per_field`` crops are decoded (no
whole-field copy), all crops of a field from that one read.

The index tuples come in the order the cached path reads the records (``TFRecordDataset(shards,
num_parallel_reads)``: an interleave over the shards, block 1); shuffled with the same seeds, the uncached
path draws the same fields in the same order as the cached one, so with the same ``pipeline.seed`` it yields
exactly the same crops (tests/data/test_pipeline_uncached.py). Reading is deterministic (order kept) unless
``deterministic=False`` is passed (faster when one shard is slow to answer, e.g. network storage; the crops
of a run are then no longer reproducible).
"""
from __future__ import annotations

from islkeras.errors import DataError


def parallel_reads(files) -> int | None:
    """``num_parallel_reads`` of the cached path's ``TFRecordDataset`` (its read order depends on it)."""
    return min(len(files), 4) if len(files) > 1 else None


def read_order(tf, manifest: dict, split: str, files: list[str], names: list[str]) -> list[tuple[int, str, int, int]]:
    """``(record index in names, name, shard index in files, position in shard)`` of every record of
    ``names`` (``files``: ``reader.shard_paths`` of ``split``), in the order
    ``TFRecordDataset(files, num_parallel_reads=parallel_reads(files))`` reads them.

    The order is computed by the same interleave (cycle ``num_parallel_reads``, block 1) over the shards'
    record lists of the manifest, without reading a shard.
    """
    shards = [s["records"] for s in manifest["shards"] if s["split"] == split]  # shard_paths' order
    if len(shards) != len(files):
        raise DataError(f"{len(files)} shard file(s) for {len(shards)} shard(s) of split {split!r} in the manifest")
    counts = [len(r) for r in shards]
    width = max(counts, default=0)
    fid = tf.constant([[fi] * width for fi in range(len(files))], tf.int64)
    pos = tf.constant([list(range(width))] * len(files), tf.int64)
    seq = tf.data.Dataset.from_tensor_slices((fid, pos, tf.constant(counts, tf.int64))).interleave(
        lambda f, p, n: tf.data.Dataset.from_tensor_slices((f[:n], p[:n])),
        cycle_length=parallel_reads(files) or 1, block_length=1)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for f, p in seq.as_numpy_iterator():
        name = shards[f][p]
        if name in index:
            out.append((index[name], name, int(f), int(p)))
    missing = sorted(set(names) - {o[1] for o in out})
    if missing:
        raise DataError(f"records {', '.join(missing[:5])}: in the manifest's fields but in no shard of the split; "
                        f"re-run `islkeras convert`")
    return out


def index_dataset(tf, manifest: dict, split: str, files: list[str], names: list[str]):
    """Finite dataset of ``(idx int64, name string, shard int64, position int64)``, one per record, in the
    cached path's read order."""
    order = read_order(tf, manifest, split, files, names)
    idx, nm, fi, pos = zip(*order)
    return tf.data.Dataset.from_tensor_slices((tf.constant(idx, tf.int64), tf.constant(nm), tf.constant(fi, tf.int64),
                                               tf.constant(pos, tf.int64)))


def read_records(tf, index, files: list[str], parse, deterministic: bool = True, cycle_length: int = 4):
    """The records an (endless) index stream names, read one by one and parsed: ``(idx, name, xr, yr)``
    as ``parse`` returns them. ``parse(raw)`` must return ``(table idx, name, xr, yr)``; a record whose name
    is not the one the index expects (a shard rewritten under the manifest) fails with InvalidArgumentError.
    """
    shards = tf.constant(files)

    def one(idx, name, f, pos):
        rec = tf.data.TFRecordDataset(tf.gather(shards, f)).skip(tf.cast(pos, tf.int64)).take(1)
        return rec.map(lambda raw: (tf.cast(idx, tf.int64), name, raw))

    ds = index.interleave(one, cycle_length=cycle_length, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=deterministic)

    def checked(idx, name, raw):
        got_idx, got_name, xr, yr = parse(raw)
        with tf.control_dependencies([tf.debugging.assert_equal(
                got_name, name, message="record at this shard position is not the one the manifest lists")]):
            idx = tf.identity(idx)
        return idx, got_name, xr, yr

    return ds.map(checked, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def cut_rows(tf, raw, dtype: str, planes: int, width, y0, x0, size: int):
    """``len(y0)`` crops ``(size, size, planes)`` at rows ``y0[j]``, columns ``x0[j]`` of one channel of a
    record still in its bytes (``ch/<name>``: row-major (H, W, planes) ``dtype``, as written by
    ``records``): only each crop's ``size`` rows are decoded, not the whole field."""
    dt = tf.dtypes.as_dtype(dtype)
    row = tf.cast(width, tf.int64) * planes * dt.size
    out = []
    for j in range(int(y0.shape[0])):
        rows = tf.strings.substr(raw, tf.cast(y0[j], tf.int64) * row, size * row)
        a = tf.reshape(tf.io.decode_raw(rows, dt), [size, width, planes])
        out.append(a[:, x0[j]:x0[j] + size])
    return tf.stack(out)
