"""The format of a records folder: ``manifest.json`` (what it holds, its content hash, the statistics it
stores, reading it) and the names of the TFRecord shards beside it.

Layout of ``data.records``::

    manifest.json                              # written last: present == conversion complete
    train-00000-of-00005-<key>.tfrecord        # shard_size records each, per split
    val-00000-of-00001-<key>.tfrecord
    ...

One ``tf.train.Example`` per field (or per spatial band of a field, named ``<field>@<split>``) with
``name``, ``split``, ``height``, ``width`` and, for every channel in ``data.channels``, ``ch/<name>`` (raw
bytes in the channel's own dtype, C order, shape ``(height, width, planes)``) and ``planes/<name>``
(written by ``islkeras.data.records``, read back by ``islkeras.data.reader`` and ``islkeras.data.pipeline``).

``manifest.json`` ``fields.<name>`` holds, per record, its split, source field, region, height, width, shard,
per-channel statistics and, when the field's files carry one, ``pixel_size_um`` ``[y, x]`` (micrometres, from
the first channel, inputs first, whose file's metadata has a physical pixel size).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from islkeras.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLIT_ORDER = ("train", "val", "test")
SHARD_RE = re.compile(r"^(?P<split>[^/]+)-(?P<i>\d{5})-of-(?P<n>\d{5})-(?P<key>[0-9a-f]{10})\.tfrecord$")


@dataclass
class Shard:
    split: str
    index: int
    count: int
    records: list
    key: str = ""

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}-{self.key}.tfrecord"


def split_rank(s: str) -> tuple:
    return (SPLIT_ORDER.index(s), s) if s in SPLIT_ORDER else (len(SPLIT_ORDER), s)


def records_hash(cfg) -> str:
    """Hash of what shapes the records' content (not inputs/targets/shard_size/workers)."""
    from islkeras.config import to_dict

    d = cfg.data
    key = {
        "format": FORMAT_VERSION,
        "root": d.root,
        "fields": d.fields,
        "channels": to_dict(d.channels),
        "masks": sorted(d.masks),
        "split": to_dict(d.split),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(records_dir) -> dict:
    """The manifest of a records folder; DataError when missing or unreadable."""
    path = Path(records_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {records_dir}: run `islkeras convert CONFIG.json` first")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run `islkeras convert --overwrite`") from None
    if m.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: records format {m.get('format')} is not {FORMAT_VERSION}; re-run `islkeras convert`")
    return m


def try_manifest(records_dir) -> Optional[dict]:
    try:
        return read_manifest(records_dir)
    except DataError:
        return None


def source_signature(path) -> dict:
    """``sources`` entry of a channel file: path, size, mtime (an OME-Zarr folder: its files' total size and
    latest modification)."""
    if os.path.isdir(path):
        sts = [os.stat(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs] or [os.stat(path)]
        latest = max(sts, key=lambda st: st.st_mtime_ns)
        return {"path": str(path), "size": sum(int(st.st_size) for st in sts), "mtime": latest.st_mtime,
                "mtime_ns": int(latest.st_mtime_ns)}
    st = os.stat(path)
    return {"path": str(path), "size": int(st.st_size), "mtime": st.st_mtime, "mtime_ns": int(st.st_mtime_ns)}


def field_pixel_size(cfg, headers: dict) -> Optional[list]:
    """A field's ``[y, x]`` pixel size in micrometres from its channel headers (``tiff.ChannelHeader``), or None."""
    d = cfg.data
    for c in list(d.inputs) + [c for c in d.channels if c not in d.inputs]:
        if headers[c].pixel_size_um is not None:
            return [float(v) for v in headers[c].pixel_size_um]
    return None


# ------------------------------------------------------------------------------------------- statistics
def channel_stats(arr: np.ndarray, is_mask: bool) -> dict:
    """normalize.image_stats of an (H, W, planes) array plus the empty/non-empty ``threshold`` per plane
    (Otsu of the plane; 0.5 for masks)."""
    from islkeras.data.normalize import image_stats

    st = image_stats(arr)
    if is_mask:
        thr = [0.5] * arr.shape[-1]
    else:
        from skimage.filters import threshold_otsu

        thr = []
        for p in range(arr.shape[-1]):
            plane = arr[..., p]
            lo, hi = plane.min(), plane.max()
            thr.append(float(lo) if lo == hi else float(threshold_otsu(plane)))
    st["threshold"] = thr
    st["nonzero_fraction"] = [float(np.count_nonzero(arr[..., p] > thr[p])) / (arr.shape[0] * arr.shape[1])
                              for p in range(arr.shape[-1])]
    return st


def dataset_stats(field_stats: list[dict], pixels: list[int]) -> dict:
    """Pooled statistics of a channel over fields (float64), from per-field mean/std/min/max."""
    if not field_stats:
        return {}
    wts = np.asarray(pixels, np.float64)[:, None]
    means = np.asarray([s["mean"] for s in field_stats], np.float64)
    sq = np.asarray([s["std"] for s in field_stats], np.float64) ** 2 + means ** 2
    mean = (means * wts).sum(0) / wts.sum()
    var = np.maximum((sq * wts).sum(0) / wts.sum() - mean ** 2, 0.0)
    return {
        "mean": mean.tolist(), "std": np.sqrt(var).tolist(),
        "min": np.min([s["min"] for s in field_stats], axis=0).tolist(),
        "max": np.max([s["max"] for s in field_stats], axis=0).tolist(),
        "n_fields": len(field_stats), "n_pixels": int(wts.sum()),
    }


# --------------------------------------------------------------------------------------------- manifest
def build_manifest(cfg, rhash, channels, sources, shards, recs, metas) -> dict:
    """The ``manifest.json`` of a conversion: counts, shards, sources, per-field and dataset statistics."""
    from islkeras import __version__
    from islkeras.config import to_dict

    d = cfg.data
    counts: dict[str, int] = {}
    for r in recs:
        counts[r.split] = counts.get(r.split, 0) + 1
    fields = {}
    for r in recs:
        m = dict(metas[r.name])
        fields[r.name] = m
    train = [r.name for r in recs if r.split == "train"]
    ds_stats = {c: dataset_stats([fields[n]["stats"][c] for n in train],
                                 [fields[n]["height"] * fields[n]["width"] for n in train]) for c in d.channels}
    return {
        "format": FORMAT_VERSION,
        "islkeras": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.source,
        "records_hash": rhash,
        "data": to_dict(d),
        "shard_size": d.shard_size,
        "channels": channels,
        "counts": {k: counts[k] for k in sorted(counts, key=split_rank)},
        "shards": [{"file": s.file, "split": s.split, "records": [r.name for r in s.records],
                    "bytes": (Path(d.records) / s.file).stat().st_size} for s in shards],
        "sources": sources,
        "fields": fields,
        "dataset_stats": ds_stats,
    }
