"""tf.data input pipeline from the TFRecord shards written by ``islkeras.data.records``.

Training (infinite)::

    shards -> parse + decode (raw dtype) -> cache -> shuffle fields -> repeat (with ``balance_by``: one
           shuffled, repeated stream per group of fields, interleaved at random with equal weights) -> enumerate
           -> crops_per_field random crops of the RAW tensors (stateless RNG seeded by pipeline.seed and the
              element counter, so a run is reproducible) -> [drop empty crops: target below its threshold]
           -> cast + normalise the crop only, with its field's offset/scale (precomputed from the manifest's
              statistics, looked up by record index) -> one of the 8 rot90/flip symmetries, identical for
              input and target -> shuffle -> batch(drop_remainder) -> prefetch(AUTOTUNE)

Without the cache (``pipeline.cache: false``, training sets larger than memory) the shuffle, ``balance_by``
and repeat run on ``(idx, name, shard, position)`` tuples and only the drawn records are read, one by one
(``islkeras.data.streams``), and of each record only the rows of its crops are decoded: the same fields in
the same order as with the cache, so the same crops.

Evaluation (finite, deterministic): a centred grid of non-overlapping ``crop_size`` crops per field
(``eval_mode: grid``), or whole fields cropped (top-left) to a multiple of 32 (``eval_mode: whole``).

Everything on the hot path is a TensorFlow op (no ``py_function``). Mask channels are returned as 0/1
floats (``mask > 0``), never normalised.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from islkeras.data import augment as _aug
from islkeras.data import normalize as _norm
from islkeras.data import streams as _streams
from islkeras.errors import DataError

MULTIPLE = 32  #: whole fields are cropped to a multiple of this (the networks' down-sampling factor)


# ------------------------------------------------------------------------------------------ parameters
def _is_mask(cfg, manifest, ch: str) -> bool:
    return ch in cfg.data.masks or manifest["channels"].get(ch, {}).get("kind") == "mask"


def _check_channels(manifest, names: Sequence[str], what: str) -> None:
    chans = manifest["channels"]
    for c in names:
        if c not in chans:
            raise DataError(f"{what} channel {c!r} is not in the records (channels: {', '.join(chans)}); "
                            f"add it to data.channels and re-run `islkeras convert`")


def _train_names(manifest) -> list[str]:
    return sorted(n for n, f in manifest["fields"].items() if f["split"] == "train")


def _dataset_constants(cfg, manifest, ch: str) -> dict:
    names = _train_names(manifest)
    if not names:
        raise DataError("the records have no train split: dataset statistics are undefined")
    p = cfg.pipeline
    return _norm.dataset_offset_scale([manifest["fields"][n]["stats"][ch] for n in names], "dataset", p.percentiles)


def _offset_scale(cfg, manifest, stats: dict, ch: str, consts: dict):
    p = cfg.pipeline
    ds = consts.get(ch)
    if p.normalization == "dataset" and ds is None:
        ds = consts[ch] = _dataset_constants(cfg, manifest, ch)
    return _norm.offset_scale(stats, p.normalization, p.percentiles, ds)


def _field_params(cfg, manifest, names, inputs, targets):
    """Per record (in ``names`` order): input offset/scale, target offset/scale, target thresholds."""
    xo, xs, yo, ys, th = [], [], [], [], []
    consts: dict = {}
    for n in names:
        st = manifest["fields"][n]["stats"]
        o, s = zip(*[_offset_scale(cfg, manifest, st[c], c, consts) for c in inputs])
        xo.append(np.concatenate(o)), xs.append(np.concatenate(s))
        to, ts, tt = [], [], []
        for c in targets:
            planes = manifest["channels"][c]["planes"]
            if _is_mask(cfg, manifest, c):
                to.append(np.zeros(planes, np.float32)), ts.append(np.ones(planes, np.float32))
                tt.append(np.full(planes, 0.5, np.float32))
            else:
                o, s = _offset_scale(cfg, manifest, st[c], c, consts)
                to.append(o), ts.append(s), tt.append(np.asarray(st[c]["threshold"], np.float32))
        yo.append(np.concatenate(to)), ys.append(np.concatenate(ts)), th.append(np.concatenate(tt))
    f = lambda a: np.stack(a).astype(np.float32)  # noqa: E731
    return f(xo), f(xs), f(yo), f(ys), f(th)


def normalization_meta(cfg, manifest: dict, targets: Optional[Sequence[str]] = None) -> dict:
    """What the exporter stores so serving normalises raw images as training did.

    ``input_dataset`` is the dataset constants for method ``dataset`` (else None); ``target_scale`` maps
    normalised predictions back to the target's intensity scale (train-split average; masks: identity).
    """
    p = cfg.pipeline
    inputs = list(cfg.data.inputs)
    targets = list(cfg.data.targets if targets is None else targets)
    _check_channels(manifest, inputs, "input")
    _check_channels(manifest, targets, "target")
    chans = manifest["channels"]
    names = _train_names(manifest)
    if not names:
        raise DataError("the records have no train split: normalisation constants are undefined")

    def concat(parts):
        return {"offset": [v for d in parts for v in d["offset"]], "scale": [v for d in parts for v in d["scale"]]}

    input_dataset = None
    if p.normalization == "dataset":
        input_dataset = concat([_dataset_constants(cfg, manifest, c) for c in inputs])
    tparts = []
    for c in targets:
        if _is_mask(cfg, manifest, c):
            tparts.append({"offset": [0.0] * chans[c]["planes"], "scale": [1.0] * chans[c]["planes"]})
        else:
            tparts.append(_norm.dataset_offset_scale([manifest["fields"][n]["stats"][c] for n in names],
                                                     p.normalization, p.percentiles))
    return {
        "method": p.normalization,
        "percentiles": list(p.percentiles),
        "inputs": inputs,
        "targets": targets,
        "input_planes": int(sum(chans[c]["planes"] for c in inputs)),
        "input_dtype": np.result_type(*[np.dtype(chans[c]["dtype"]) for c in inputs]).name,
        "input_dataset": input_dataset,
        "target_scale": concat(tparts) if tparts else None,
        "target_masks": [c for c in targets if _is_mask(cfg, manifest, c)],
    }


# ---------------------------------------------------------------------------------------------- dataset
def dihedral(tf, a, k):
    """Symmetry ``k`` in 0..7 of an (H, W, C) tensor: ``rot90(a, k % 4)`` (counter-clockwise, as
    ``tf.image.rot90``), then a left-right flip when ``k >= 4``; one transpose and/or one reverse each."""
    t = lambda: tf.transpose(a, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: a,
        lambda: tf.reverse(t(), [0]),
        lambda: tf.reverse(a, [0, 1]),
        lambda: tf.reverse(t(), [1]),
        lambda: tf.reverse(a, [1]),
        lambda: tf.reverse(t(), [0, 1]),
        lambda: tf.reverse(a, [0]),
        t,
    ]
    return tf.switch_case(k, branches)


def _balanced_fields(tf, cfg, ds, names: list[str], seed: int):
    """Endless stream of cached field records in which every group of ``pipeline.balance_by`` (a column of
    the split CSV) is equally likely, fields shuffled within their group."""
    import logging

    from islkeras.data.splits import field_groups

    groups = field_groups(cfg, names, cfg.pipeline.balance_by)
    logging.getLogger(__name__).info(
        "training fields balanced over %s: %s", cfg.pipeline.balance_by,
        ", ".join(f"{g} {len(m)}" for g, m in sorted(groups.items())))
    order = sorted(groups)
    gid = {n: order.index(g) for g, members in groups.items() for n in members}
    group_of = tf.constant([gid[n] for n in names], tf.int32)  # record index -> group index
    streams = []
    for gi, g in enumerate(order):
        part = ds.filter(lambda idx, name, xr, yr, gi=gi: tf.gather(group_of, tf.cast(idx, tf.int32)) == gi)
        streams.append(part.shuffle(len(groups[g]), seed=seed + 7 * gi, reshuffle_each_iteration=True).repeat())
    if len(streams) == 1:
        return streams[0]
    return tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(streams)] * len(streams), seed=seed)


def make_dataset(cfg, split: str, training: bool, manifest: Optional[dict] = None,
                 targets: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                 inputs: Optional[Sequence[str]] = None, with_names: bool = False,
                 fields: Optional[Sequence[str]] = None):
    """``tf.data.Dataset`` of float32 ``(x, y)`` NHWC batches (``(x, y, names)`` with ``with_names``).

    ``training``: infinite random crops with augmentation; otherwise finite deterministic grid crops or
    whole fields (``pipeline.eval_mode``). ``targets``/``inputs`` override ``data.targets``/``data.inputs``;
    ``fields`` keeps only these records of the split (e.g. the first N train fields).
    """
    import tensorflow as tf

    from islkeras.data.reader import shard_paths
    from islkeras.data.records import ensure_records

    if manifest is None:
        manifest = ensure_records(cfg)
    p = cfg.pipeline
    inputs = list(cfg.data.inputs if inputs is None else inputs)
    targets = list(cfg.data.targets if targets is None else targets)
    if not targets:
        raise DataError("no target channel: set data.targets or pass targets=[...]")
    _check_channels(manifest, inputs, "input")
    _check_channels(manifest, targets, "target")
    names = sorted(n for n, f in manifest["fields"].items() if f["split"] == split)
    if not names:
        raise DataError(f"split {split!r} has no records in {cfg.data.records} "
                        f"(splits: {', '.join(manifest['counts']) or 'none'})")
    if fields is not None:
        unknown = sorted(set(fields) - set(names))
        if unknown or not fields:
            raise DataError(f"fields {', '.join(unknown) or '[]'}: not records of split {split!r} "
                            f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        names = sorted(set(fields))
    batch_size = int(batch_size or cfg.training.batch_size)
    cs = int(p.crop_size)
    whole = (not training) and p.eval_mode == "whole"
    need = MULTIPLE if whole else cs
    small = [f"{n} ({manifest['fields'][n]['height']}x{manifest['fields'][n]['width']})" for n in names
             if min(manifest["fields"][n]["height"], manifest["fields"][n]["width"]) < need]
    if small:
        what = "32 px" if whole else f"pipeline.crop_size {cs}"
        raise DataError(f"split {split!r}: field(s) smaller than {what}: {', '.join(small[:5])}; "
                        f"lower pipeline.crop_size or use larger fields")

    chans = manifest["channels"]
    xo, xs, yo, ys, th = _field_params(cfg, manifest, names, inputs, targets)
    if training and p.drop_empty:
        best = max(max(manifest["fields"][n]["stats"][c].get("nonzero_fraction", [1.0])) for n in names
                   for c in targets)
        if best < p.empty_fraction:
            raise DataError(f"pipeline.drop_empty: no {split} field has a target above its threshold in more "
                            f"than {p.empty_fraction:g} of its pixels; every crop would be dropped")
    xo, xs, yo, ys, th = (tf.constant(a) for a in (xo, xs, yo, ys, th))
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(names), tf.range(len(names), dtype=tf.int64)), -1)
    used = list(dict.fromkeys(inputs + targets))
    masks_t = [_is_mask(cfg, manifest, c) for c in targets]
    spec = {"name": tf.io.FixedLenFeature([], tf.string), "height": tf.io.FixedLenFeature([], tf.int64),
            "width": tf.io.FixedLenFeature([], tf.int64)}
    spec.update({f"ch/{c}": tf.io.FixedLenFeature([], tf.string) for c in used})

    def parse(raw, decode=True):  # decode=False: the channels' bytes, decoded crop by crop (uncached path)
        ex = tf.io.parse_single_example(raw, spec)
        h, w = tf.cast(ex["height"], tf.int32), tf.cast(ex["width"], tf.int32)
        arr = {c: tf.reshape(tf.io.decode_raw(ex[f"ch/{c}"], tf.dtypes.as_dtype(chans[c]["dtype"])),
                             [h, w, chans[c]["planes"]]) if decode else ex[f"ch/{c}"] for c in used}
        return table.lookup(ex["name"]), ex["name"], tuple(arr[c] for c in inputs), tuple(arr[c] for c in targets)

    files = shard_paths(cfg, manifest, split)
    uncached = training and not p.cache  # shuffled as indices, then each record read (islkeras.data.streams)
    if uncached:
        ds = _streams.index_dataset(tf, manifest, split, files, names)
    else:
        ds = tf.data.TFRecordDataset(files, num_parallel_reads=_streams.parallel_reads(files))
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        if fields is not None:  # records not in the table were not asked for
            ds = ds.filter(lambda idx, name, xr, yr: idx >= 0)
        if p.cache:
            ds = ds.cache()

    def cat(parts):
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)

    def normalise(idx, xr, yr):
        x = cat([tf.cast(a, tf.float32) for a in xr])
        x = (x - tf.gather(xo, idx)) / tf.gather(xs, idx)
        y = cat([tf.cast(a > 0, tf.float32) if is_mask else tf.cast(a, tf.float32) for a, is_mask in zip(yr, masks_t)])
        y = (y - tf.gather(yo, idx)) / tf.gather(ys, idx)
        return x, y

    cx = sum(chans[c]["planes"] for c in inputs)
    cy = sum(chans[c]["planes"] for c in targets)
    auto = tf.data.AUTOTUNE
    if training:
        k_crops = int(p.crops_per_field)
        seed = int(p.seed)
        if p.balance_by:
            ds = _balanced_fields(tf, cfg, ds, names, seed)
        else:
            ds = ds.shuffle(len(names), seed=seed, reshuffle_each_iteration=True).repeat()
        if uncached:
            ds = _streams.read_records(tf, ds, files, lambda raw: parse(raw, decode=False))
            hw = tf.constant([[manifest["fields"][n]["height"], manifest["fields"][n]["width"]] for n in names],
                             tf.int32)
        ds = ds.enumerate()

        aug = p.augmentation()
        zoom = aug.zoom.p > 0
        if zoom and uncached:
            raise DataError("pipeline.augment.zoom needs pipeline.cache true (zoomed windows are cut from decoded "
                            "fields); turn one of them off")

        def crops(i, el):
            idx, _, xr, yr = el
            shape = tf.gather(hw, idx) if uncached else tf.shape(xr[0])
            base = tf.stack([tf.constant(seed, tf.int64), i])
            y0 = tf.random.stateless_uniform([k_crops], base, 0, shape[0] - cs + 1, dtype=tf.int32)
            x0 = tf.random.stateless_uniform([k_crops], base + [0, 1 << 40], 0, shape[1] - cs + 1, dtype=tf.int32)
            sym = tf.random.stateless_uniform([k_crops], base + [0, 2 << 40], 0, 8, dtype=tf.int32)
            keys = _aug.crop_keys(tf, base, k_crops)

            # zoom: per crop a window of crop_size / factor (the same for every channel), resampled to crop_size
            wins = [_aug.zoom_window(tf, keys[j], aug.zoom, cs, shape[0], shape[1]) for j in range(k_crops)] \
                if zoom else None

            def cut(a, c, nearest=False):
                if zoom:
                    return tf.stack([_aug.resample_window(tf, a, *w, cs, nearest) for w in wins])
                if uncached:  # still bytes: only the crops' rows are decoded
                    return _streams.cut_rows(tf, a, chans[c]["dtype"], chans[c]["planes"], shape[1], y0, x0, cs)
                return tf.stack([a[y0[j]:y0[j] + cs, x0[j]:x0[j] + cs] for j in range(k_crops)])

            return (tf.fill([k_crops], idx), sym, keys, tuple(cut(a, c) for a, c in zip(xr, inputs)),
                    tuple(cut(a, c, m) for a, c, m in zip(yr, targets, masks_t)))

        ds = ds.map(crops, num_parallel_calls=auto)
        if k_crops > 1:
            ds = ds.unbatch()
        else:
            ds = ds.map(lambda idx, sym, key, xr, yr: (idx[0], sym[0], key[0], tuple(a[0] for a in xr),
                                                       tuple(a[0] for a in yr)))
        if p.drop_empty:
            frac = float(p.empty_fraction)

            def non_empty(idx, sym, key, xr, yr):
                y = tf.concat([tf.cast(a, tf.float32) for a in yr], axis=-1)
                above = tf.reduce_mean(tf.cast(y > tf.gather(th, idx), tf.float32), axis=[0, 1])
                return tf.reduce_any(above >= frac)

            ds = ds.filter(non_empty)

        def finish(idx, sym, key, xr, yr):
            if aug.dihedral:  # on the raw crops (fewer bytes); commutes with the per-plane affine normalisation
                xr = tuple(dihedral(tf, a, sym) for a in xr)
                yr = tuple(dihedral(tf, a, sym) for a in yr)
            x, y = normalise(idx, xr, yr)
            x = _aug.jitter_inputs(tf, x, key, aug)  # the inputs only; no-op when every p is 0
            x.set_shape([cs, cs, cx]), y.set_shape([cs, cs, cy])
            return x, y

        ds = ds.map(finish, num_parallel_calls=auto)
        if p.shuffle_buffer > 1:
            ds = ds.shuffle(p.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        if whole:
            def whole_field(idx, name, xr, yr):
                shape = tf.shape(xr[0])
                h, w = shape[0] // MULTIPLE * MULTIPLE, shape[1] // MULTIPLE * MULTIPLE
                x, y = normalise(idx, tuple(a[:h, :w] for a in xr), tuple(a[:h, :w] for a in yr))
                x.set_shape([None, None, cx]), y.set_shape([None, None, cy])
                return x, y, name

            ds = ds.map(whole_field, num_parallel_calls=auto)
            sizes = {(manifest["fields"][n]["height"] // MULTIPLE, manifest["fields"][n]["width"] // MULTIPLE)
                     for n in names}
            eval_batch = batch_size if len(sizes) == 1 else 1
        else:
            def grid(idx, name, xr, yr):
                shape = tf.shape(xr[0])
                ny, nx = shape[0] // cs, shape[1] // cs
                oy, ox = (shape[0] - ny * cs) // 2, (shape[1] - nx * cs) // 2

                def tiles(a):
                    c = a.shape[-1]
                    a = a[oy:oy + ny * cs, ox:ox + nx * cs]
                    a = tf.reshape(a, [ny, cs, nx, cs, c])
                    return tf.reshape(tf.transpose(a, [0, 2, 1, 3, 4]), [ny * nx, cs, cs, c])

                n = ny * nx
                return tf.fill([n], idx), tf.fill([n], name), tuple(tiles(a) for a in xr), tuple(tiles(a) for a in yr)

            def norm_tile(idx, name, xr, yr):
                x, y = normalise(idx, xr, yr)
                x.set_shape([cs, cs, cx]), y.set_shape([cs, cs, cy])
                return x, y, name

            ds = ds.map(grid, num_parallel_calls=auto).unbatch().map(norm_tile, num_parallel_calls=auto)
            eval_batch = batch_size
        ds = ds.batch(eval_batch, drop_remainder=False)
        if not with_names:
            ds = ds.map(lambda x, y, name: (x, y))
    return ds.prefetch(auto)


def eval_steps(cfg, manifest: dict, split: str, batch_size: Optional[int] = None) -> int:
    """Number of batches one pass of the evaluation dataset of ``split`` yields."""
    p = cfg.pipeline
    batch_size = int(batch_size or cfg.training.batch_size)
    fields = [f for f in manifest["fields"].values() if f["split"] == split]
    if p.eval_mode == "whole":
        sizes = {(f["height"] // MULTIPLE, f["width"] // MULTIPLE) for f in fields}
        b = batch_size if len(sizes) == 1 else 1
        return -(-len(fields) // b)
    n = sum((f["height"] // p.crop_size) * (f["width"] // p.crop_size) for f in fields)
    return -(-n // batch_size)
