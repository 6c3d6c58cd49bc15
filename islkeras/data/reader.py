"""Records read back: the shard files and record names of a split, and every record of a split decoded
to numpy (``load_fields`` -> ``Field``).
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Optional

import numpy as np

from islkeras.data.records import ensure_records
from islkeras.errors import DataError


@dataclass
class Field:
    """One record read back: ``arrays[channel]`` is (H, W, planes) in the stored dtype."""

    name: str
    split: str
    arrays: dict = dc_field(default_factory=dict)
    stats: dict = dc_field(default_factory=dict)
    source: str = ""  #: the field folder the record came from (differs from name for spatial bands)
    region: Optional[list] = None  #: [y0, y1, x0, x1] in the source field (spatial splits), else None


def shard_paths(cfg, manifest: dict, split: str) -> list[str]:
    out = Path(cfg.data.records)
    return [str(out / s["file"]) for s in manifest["shards"] if s["split"] == split]


def split_names(manifest: dict, split: str) -> list[str]:
    return sorted(n for n, f in manifest["fields"].items() if f["split"] == split)


def load_fields(cfg, split: str, manifest: Optional[dict] = None, channels: Optional[list] = None) -> list[Field]:
    """Every record of ``split`` decoded to numpy (sorted by name). ``channels`` limits what is decoded."""
    import tensorflow as tf

    if manifest is None:
        manifest = ensure_records(cfg)
    files = shard_paths(cfg, manifest, split)
    chans = manifest["channels"]
    want = list(channels) if channels is not None else list(chans)
    for c in want:
        if c not in chans:
            raise DataError(f"channel {c!r} is not in the records ({', '.join(chans)})")
    out = []
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.train.Example.FromString(raw.numpy())
        f = ex.features.feature
        name = f["name"].bytes_list.value[0].decode()
        h, w = f["height"].int64_list.value[0], f["width"].int64_list.value[0]
        arrays = {}
        for c in want:
            buf = f[f"ch/{c}"].bytes_list.value[0]
            arrays[c] = np.frombuffer(buf, dtype=chans[c]["dtype"]).reshape(h, w, f[f"planes/{c}"].int64_list.value[0])
        meta = manifest["fields"][name]
        out.append(Field(name=name, split=split, arrays=arrays, stats={c: meta["stats"][c] for c in want},
                         source=meta.get("field", name), region=meta.get("region")))
    out.sort(key=lambda x: x.name)
    return out

