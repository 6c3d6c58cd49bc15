"""Microscope files (TIFF folders, or any format of ``islkeras.data.formats``) -> TFRecord shards +
``manifest.json`` (``islkeras convert``, ``ensure_records``); the folder's format is described in
``islkeras.data.manifest``.

Records hold *all* channels of ``data.channels`` so several configs (which differ in inputs/targets/loss)
share one records folder. They are stale when the part of the data section that shapes them (root, fields,
channels, masks, split), the set of fields or a source file's size/mtime changed. ``<key>`` in a shard name
is a hash of exactly what went into it, so an unchanged shard is kept on re-runs and a new shard never
overwrites one that the current manifest still points to: until the new manifest replaces the old one
(atomically), the folder stays consistent, and an interrupted run (Ctrl-C, kill -9) leaves at most
complete-but-unreferenced shards and ``.*.tmp`` files, cleaned up by the next run.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import click
import numpy as np

from islkeras.data import tiff as _tiff
from islkeras.data.manifest import (MANIFEST, SHARD_RE, Shard, build_manifest, channel_stats, field_pixel_size,
                                    records_hash, source_signature, split_rank, try_manifest)
from islkeras.data.splits import Record, assign_splits, spatial_records
from islkeras.errors import DataError

log = logging.getLogger(__name__)

LOCK = ".convert.lock"


# --------------------------------------------------------------------------------------------- helpers
def _channel_kind(cfg, name: str) -> str:
    d = cfg.data
    if name in d.masks:
        return "mask"
    if name in d.targets:
        return "target"
    if name in d.inputs:
        return "input"
    return "other"


# ------------------------------------------------------------------------------------------- conversion
def _plan(cfg, names, splits, headers) -> list[Record]:
    recs = []
    for n in names:
        if n not in splits:
            continue
        if cfg.data.split.spatial is not None:
            h, w = next(iter(headers[n].values())).shape[:2]
            recs.extend(spatial_records(cfg, n, h, w))
        else:
            recs.append(Record(name=n, field=n, split=splits[n], region=None))
    recs.sort(key=lambda r: (split_rank(r.split), r.name))
    return recs


def _shards(cfg, recs: list[Record], rhash: str, sources: dict) -> list[Shard]:
    by_split: dict[str, list] = {}
    for r in recs:
        by_split.setdefault(r.split, []).append(r)
    out = []
    size = cfg.data.shard_size
    for split in sorted(by_split, key=split_rank):
        rs = by_split[split]
        count = (len(rs) + size - 1) // size
        for i in range(count):
            sh = Shard(split=split, index=i, count=count, records=rs[i * size:(i + 1) * size])
            content = [rhash, split, i, count] + [
                [r.name, r.region, [[c, sources[f"{r.field}/{c}"]["size"], sources[f"{r.field}/{c}"]["mtime_ns"]]
                                    for c in cfg.data.channels]]
                for r in sh.records
            ]
            sh.key = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:10]
            out.append(sh)
    return out


def _field_job(cfg, rec_list: list[Record]):
    """Read one source field and build the serialized Example + metadata of each of its records."""
    import tensorflow as tf

    d = cfg.data
    arrays = _tiff.read_field(d.root, rec_list[0].field, d.channels)
    out = {}
    for r in rec_list:
        if r.region is None:
            sub = arrays
        else:
            y0, y1, x0, x1 = r.region
            sub = {c: np.ascontiguousarray(a[y0:y1, x0:x1]) for c, a in arrays.items()}
        h, w = next(iter(sub.values())).shape[:2]
        feats = {
            "name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.name.encode()])),
            "split": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.split.encode()])),
            "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[h])),
            "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[w])),
        }
        stats = {}
        for c, a in sub.items():
            feats[f"ch/{c}"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[a.tobytes()]))
            feats[f"planes/{c}"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[a.shape[-1]]))
            stats[c] = channel_stats(a, c in d.masks)
        ex = tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
        meta = {"split": r.split, "field": r.field, "region": r.region, "height": h, "width": w, "stats": stats}
        out[r.name] = (ex, meta)
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temp file visible under its final name (atomic rename)."""
    os.replace(tmp, final)


def _write_shard(out: Path, shard: Shard, examples: list[bytes]) -> None:
    import tensorflow as tf

    final = out / shard.file
    tmp = out / f".{shard.file}.{os.getpid()}.tmp"
    try:
        with tf.io.TFRecordWriter(str(tmp)) as w:
            for ex in examples:
                w.write(ex)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(out: Path):
    """Exclusive lock on the records folder (released by the OS even on kill -9)."""
    import fcntl

    path = out / LOCK
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            log.warning("waiting for another `islkeras convert` writing %s", out)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the file we locked must still be the one at `path` (a finishing run unlinks it)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _clean_stale(out: Path, keep: Iterable[str]) -> None:
    """Remove temp files and shards no manifest refers to (leftovers of interrupted runs)."""
    keep = set(keep)
    for p in out.iterdir():
        if p.name in keep or p.name == LOCK:
            continue
        if (p.name.startswith(".") and p.name.endswith(".tmp")) or SHARD_RE.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()


def _sources(cfg, names: list[str]) -> dict:
    d = cfg.data
    out = {}
    for n in names:
        for c, spec in d.channels.items():
            out[f"{n}/{c}"] = source_signature(_tiff.channel_path(d.root, n, c, spec))
    return out


def _field_names(cfg) -> list[str]:
    """Field folders of cfg (never the records folder itself, should it lie under data.root)."""
    d = cfg.data
    out = Path(d.records).resolve()
    return [n for n in _tiff.field_names(d.root, d.fields, d.channels) if (Path(d.root) / n).resolve() != out]


def stale_reason(cfg, manifest: Optional[dict]) -> Optional[str]:
    """Why the records of ``cfg`` must be (re)written, or None when they are up to date (cheap: stat only)."""
    if manifest is None:
        return "no manifest"
    if manifest.get("records_hash") != records_hash(cfg):
        return "the data section changed (root, fields, channels, masks or split)"
    try:
        src = _sources(cfg, _field_names(cfg))
    except DataError as e:
        return f"sources changed ({e})"
    old = manifest.get("sources", {})
    if set(src) != set(old):
        return "the set of fields or channels changed"
    for k, v in src.items():
        if (v["size"], v["mtime_ns"]) != (old[k]["size"], old[k]["mtime_ns"]):
            return f"source {v['path']} changed (size or modification time)"
    out = Path(cfg.data.records)
    for sh in manifest.get("shards", []):
        if not (out / sh["file"]).is_file():
            return f"shard {sh['file']} is missing"
    return None


def convert(cfg, overwrite: bool = False, workers: Optional[int] = None) -> dict:
    """Convert the fields of ``cfg.data`` (TIFF or other microscope files) into shards + manifest under
    ``cfg.data.records``.

    Up-to-date records are left alone (unless ``overwrite``); unchanged shards are kept. Returns the manifest.
    On any error nothing that was there before is changed and nothing new is left behind.
    """
    d = cfg.data
    out = Path(d.records)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        with _locked(out):
            old = try_manifest(out)
            if not overwrite and stale_reason(cfg, old) is None and old.get("shard_size") == d.shard_size:
                return _refresh_kinds(cfg, out, old)
            manifest = _convert_locked(cfg, out, old, overwrite, workers, created)
    except BaseException:
        for p in created:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        else:
            _clean_tmp(out)
        raise
    return manifest


def _clean_tmp(out: Path) -> None:
    for p in out.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def _refresh_kinds(cfg, out: Path, manifest: dict) -> dict:
    """Records are shared by configs with different inputs/targets: report this config's view."""
    for name, ch in manifest["channels"].items():
        ch["kind"] = _channel_kind(cfg, name)
    return manifest


def _convert_locked(cfg, out, old, overwrite, workers, created) -> dict:
    import tensorflow  # noqa: F401  (imported once here, not concurrently by the reader threads)

    d = cfg.data
    names = _field_names(cfg)
    if not names:
        raise DataError(f"no field folders matching {d.fields!r} in {d.root} (data.fields)")
    splits = assign_splits(cfg, names)
    names = [n for n in names if n in splits]
    n_workers = workers or d.workers or os.cpu_count() or 1

    # 1. headers only: missing files, unreadable files, channel/z/time out of range, shapes, consistent dtypes
    with cf.ThreadPoolExecutor(max_workers=n_workers) as ex:
        headers = dict(zip(names, ex.map(lambda n: _tiff.check_field(d.root, n, d.channels), names)))
    channels = {}
    for c, spec in d.channels.items():
        seen = {}
        for n in names:
            h = headers[n][c]
            sig = (_tiff.stored_dtype(spec, h.dtype), _tiff.output_planes(spec, h.shape[2]))
            seen.setdefault(sig, n)
        if len(seen) > 1:
            desc = "; ".join(f"{dt} x {pl} plane(s) in field {f}" for (dt, pl), f in seen.items())
            raise DataError(f"channel {c!r} differs between fields ({desc}); all fields must match")
        (dt, pl), = seen
        channels[c] = {"dtype": dt, "planes": pl, "kind": _channel_kind(cfg, c), "file": spec.file,
                       "planes_selected": spec.planes, "projection": spec.projection}
    sources = _sources(cfg, names)
    rhash = records_hash(cfg)
    recs = _plan(cfg, names, splits, headers)
    shards = _shards(cfg, recs, rhash, sources)

    # 2. shards: keep those whose content key is unchanged, write the others (parallel over fields)
    old_files = {s["file"]: s for s in (old or {}).get("shards", [])}
    old_fields = (old or {}).get("fields", {})
    reuse = [] if overwrite else [s for s in shards if s.file in old_files and (out / s.file).is_file()
                                  and all(r.name in old_fields for r in s.records)]
    reuse_files = {s.file for s in reuse}
    todo = [s for s in shards if s.file not in reuse_files]
    metas = {r.name: old_fields[r.name] for s in reuse for r in s.records}

    field_recs: dict[str, list] = {}
    for s in todo:
        for r in s.records:
            field_recs.setdefault(r.field, []).append(r)
    order = list(field_recs)
    remaining = {f: len(v) for f, v in field_recs.items()}
    window = max(2, 2 * n_workers)
    bar = _progress(len(order), f"convert {cfg.name}")
    futures: dict[str, cf.Future] = {}
    pos = 0
    ex = cf.ThreadPoolExecutor(max_workers=n_workers)
    try:
        def submit_upto(k):
            nonlocal pos
            while pos < len(order) and len(futures) < k:
                f = order[pos]
                futures[f] = ex.submit(_field_job, cfg, field_recs[f])
                futures[f].add_done_callback(lambda _: bar.update(1))
                pos += 1

        for s in todo:
            examples = []
            for r in s.records:
                while r.field not in futures:
                    submit_upto(len(futures) + 1)
                submit_upto(window)
                ex_bytes, meta = futures[r.field].result()[r.name]
                meta["shard"] = s.file
                examples.append(ex_bytes)
                metas[r.name] = meta
                remaining[r.field] -= 1
                if remaining[r.field] == 0:
                    del futures[r.field]
            final = out / s.file
            if not final.exists():
                created.append(final)
            _write_shard(out, s, examples)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        bar.close()

    for r in recs:  # the pixel size from the files' metadata, when they have one
        ps = field_pixel_size(cfg, headers[r.field])
        if ps is not None:
            metas[r.name] = dict(metas[r.name], pixel_size_um=ps)

    # 3. manifest (last, atomic), then remove what no manifest refers to
    manifest = build_manifest(cfg, rhash, channels, sources, shards, recs, metas)
    from islkeras.utils import atomic_write_json

    atomic_write_json(out / MANIFEST, manifest)
    os.chmod(out / MANIFEST, 0o644)  # readable like the shards (the temp file was 0600)
    created.clear()
    _clean_stale(out, [s.file for s in shards] + [MANIFEST])
    return manifest


def _progress(total, desc):
    from islkeras.utils import progress

    return progress(total=total, desc=desc, unit="field")


def ensure_records(cfg, workers: Optional[int] = None) -> dict:
    """The manifest of ``cfg``'s records, converting first when they are missing or stale."""
    out = Path(cfg.data.records)
    m = try_manifest(out) if out.exists() else None
    reason = stale_reason(cfg, m)
    if reason is None:
        return _refresh_kinds(cfg, out, m)
    log.info("records in %s: %s -> converting", out, reason)
    click.echo(f"islkeras: records in {out} need converting ({reason})", err=True)
    return convert(cfg, workers=workers)


# -------------------------------------------------------------------------------------------------- CLI
@click.command("convert", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Rewrite every shard even if the records are up to date.")
@click.option("--workers", type=int, default=None, help="Parallel field readers (default: data.workers, 0 = all CPUs).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Replace data.root of the config.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path, JSON value), e.g. --set data.shard_size=2. Repeatable.")
def convert_command(config, overwrite, workers, data_root, sets):
    """Convert the fields named by CONFIG (TIFF, OME-TIFF, OME-Zarr, CZI, ND2, LIF) into TFRecord shards.

    Reads every field folder under data.root (data.fields glob), stacks the channels of data.channels in
    their own dtype, assigns splits (data.split) and writes data.shard_size records per shard into
    data.records, with per-field statistics in manifest.json. Re-running is cheap: unchanged records
    are not rewritten (use --overwrite to force). `islkeras fit` converts automatically when needed.

    \b
    Examples:
      islkeras convert experiments/aiseg_nuclei_l1.json
      islkeras convert experiments/demo.json --overwrite --workers 2
      islkeras convert experiments/isl_neurons_hoechst_l1.json --data-root /data/isl-neurons
      islkeras convert my.json --set data.records=/scratch/records --set data.shard_size=16
    """
    from islkeras.config import load_config, parse_set_option

    cfg = load_config(config, overrides=parse_set_option(sets), data_root=data_root)
    if workers is not None and workers < 1:
        raise click.BadParameter("must be >= 1", param_hint="--workers")
    m = convert(cfg, overwrite=overwrite, workers=workers)
    counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items())
    click.echo(f"{cfg.data.records}: {sum(m['counts'].values())} records ({counts}) in {len(m['shards'])} shard(s)")
