"""Fields larger than memory: read tile by tile, predicted, written tile by tile into an OME-Zarr image.

``predict_streamed(model, source, out_path, ...)`` is ``tiling.predict_field`` for a field that is never
held whole: the same tile grid (``grid_plan``), the same reflection padding, the same whole-field
normalisation and the same Hann blending, so on a field that fits in memory both give the same prediction
(max abs difference < 1e-4, tested). Peak memory depends on the tile grid, not on the field:

1. **Statistics pass.** The field's normalisation constants (``model.offset_scale_of_blocks``) from row bands
   of ``stats_rows`` rows: exact for z-score, min/max and, with integer pixels, percentiles.
2. **Tiles.** Each tile's pixels (``source.region``; an OME-Zarr source decodes only the chunks under
   the tile) are reflection-padded where they pass the bottom/right edge, normalised and predicted, up to
   ``grid.batch`` at a time. A reader thread fetches the next batch while the network runs.
3. **Blending in place.** A tile's prediction times its normalised window (``w_i(y) w_j(x) / wsum(y, x)``,
   separable, so no weight image) is *added* to the output image on disk (``OmeZarrWriter.add``), in a
   writer thread, in order. After the last tile the sums are the blended prediction.
4. **Intensity scale.** For ISL models one pass in row bands maps the normalised prediction to the target's
   intensity scale (as ``to_output_scale``); then the image gets its NGFF metadata and its name. Until then
   it lives under a temporary ``.<name>.*.partial`` name, removed on any error, so an interrupted run never
   leaves an image that looks complete.

Sources: :class:`ArraySource` (an in-memory or memory-mapped ``(H, W, C)`` array) and
:class:`ZarrSource` (channels/planes of a ``data.chunked.LazyOmeZarr``), both ``region(y0, y1, x0, x1)``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from islkeras.data.chunked import OmeZarrWriter
from islkeras.errors import DataError, UserError
from islkeras.inference.tiling import DEFAULT_BATCH, DEFAULT_OVERLAP, DEFAULT_TILE, MIN_SIDE, grid_plan

__all__ = ["ArraySource", "ZarrSource", "open_source", "predict_streamed", "is_zarr"]


def is_zarr(path: Union[str, Path]) -> bool:
    return str(path).lower().rstrip("/").endswith(".zarr")


class ArraySource:
    """An ``(H, W, C)`` (or ``(H, W)``) array - in memory, memory-mapped or any sliceable - as a source."""

    def __init__(self, array, name: str = "image"):
        a = array if getattr(array, "ndim", 0) == 3 else np.asarray(array)[..., None]
        self._a, self.name = a, name
        self.shape = tuple(int(s) for s in a.shape)
        self.dtype = np.dtype(a.dtype)
        self.pixel_size_um = None

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(self._a[y0:y1, x0:x1])


class ZarrSource:
    """The model's input planes from a :class:`islkeras.data.chunked.LazyOmeZarr`: one ``(channel, planes,
    time, projection)`` selection per input channel, concatenated in the model's input order."""

    def __init__(self, lazy, selections: Sequence[tuple[int, list, int, str]]):
        self._lazy, self._sel = lazy, list(selections)
        self.name = str(lazy.path)
        n = sum(1 if proj != "none" else len(zs) for _, zs, _, proj in self._sel)
        self.shape = (lazy.height, lazy.width, n)
        means = any(proj == "mean" for *_, proj in self._sel)
        self.dtype = np.dtype(np.float32) if means else lazy.dtype
        self.pixel_size_um = lazy.pixel_size_um

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from types import SimpleNamespace

        from islkeras.data.tiff import project

        parts = [project(self._lazy.region(c, zs, t, y0, y1, x0, x1), SimpleNamespace(projection=proj))
                 for c, zs, t, proj in self._sel]  # the same projection as a field read whole
        return parts[0] if len(parts) == 1 else np.concatenate([p.astype(self.dtype, copy=False) for p in parts], -1)


def open_source(path: Union[str, Path], specs, n_inputs: int) -> Optional[ZarrSource]:
    """A region-wise source of the model's inputs in one OME-Zarr file, or None when ``path`` is not one
    (the caller then reads the field whole). ``specs``: ``{input: ChannelSpec}`` in the model's input order;
    with one input its channel (by name or index; the only one by default), time, planes and projection;
    with several, each names its channel in the file."""
    from islkeras.data.chunked import open_ome_zarr
    from islkeras.data.tiff import selected_planes

    if not is_zarr(path):
        return None
    lazy = open_ome_zarr(path)
    names = list(specs)
    if len(names) > 1 and any(specs[n].channel is None for n in names):
        raise DataError(f"{path}: which of its channels ({', '.join(lazy.channel_names)}) is each input of the "
                        f"model ({', '.join(names)})? say it with "
                        + " ".join(f"--file-channel {n}=CHANNEL" for n in names))
    sel = []
    for n in names:
        sp = specs[n]
        t = int(getattr(sp, "time", 0) or 0)
        if not 0 <= t < lazy.shape_tczyx[0]:
            raise DataError(f"{path}: time point {t} is beyond its {lazy.shape_tczyx[0]} time point(s)")
        zs = selected_planes(sp, lazy.shape_tczyx[2], str(path))
        sel.append((lazy.channel_index(sp.channel), zs, t, sp.projection))
    src = ZarrSource(lazy, sel)
    if src.shape[-1] != int(n_inputs):
        raise DataError(f"{path}: the model takes {n_inputs} input plane(s) ({', '.join(names)}), the selection "
                        f"gives {src.shape[-1]}; pick planes with --planes or collapse them with --projection max")
    return src


def _reflect(start: int, length: int, n: int) -> np.ndarray:
    """Indices ``start..start+length`` into an axis of ``n`` pixels, reflected past the end like
    ``np.pad(mode="reflect")`` (index ``n + k`` reads ``n - 2 - k``)."""
    idx = np.arange(start, start + length)
    return np.where(idx < n, idx, 2 * n - 2 - idx)


def _read_tile(source, y0: int, th: int, x0: int, tw: int, off, sc) -> np.ndarray:
    h, w = source.shape[:2]
    ry, rx = _reflect(y0, th, h), _reflect(x0, tw, w)
    if ry.min() < 0 or rx.min() < 0:
        raise DataError(f"{source.name}: {h} x {w} pixels is too small to pad to the tile grid")
    a = source.region(int(ry.min()), int(ry.max()) + 1, int(rx.min()), int(rx.max()) + 1)
    if y0 + th <= h and x0 + tw <= w:  # inside the field: the region is the tile
        block = a
    else:
        block = a[(ry - ry.min())[:, None], (rx - rx.min())[None, :]]
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise DataError(f"{source.name}: contains NaN or infinite pixel values (rows {y0}-{y0 + th})")
    x = np.empty(block.shape, np.float32)  # the same float32 arithmetic as tiling.normalize_padded
    x[...] = block
    x -= off
    x /= sc
    return x


def _check_source(model, source) -> None:
    h, w, c = source.shape
    if c != int(model.n_inputs):
        raise DataError(f"{source.name}: the model takes {model.n_inputs} input plane(s), the image has {c}")
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{source.name}: {h} x {w} pixels is too small; height and width must be at least {MIN_SIDE}")
    if source.dtype.kind not in "uifb":
        raise DataError(f"{source.name}: unsupported pixel type {source.dtype}")


def predict_streamed(model, source, out_path: Union[str, Path], channel_names: Sequence[str],
                     tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, batch: int = DEFAULT_BATCH,
                     output_scale: bool = True, callback: Optional[Callable[[int, int], None]] = None,
                     stats_rows: int = 512, chunk: int = 512) -> Path:
    """Predict ``source`` tile by tile into the OME-Zarr image ``out_path`` (see the module doc); returns it.

    ``model``: an ``ExportedModel``; ``source``: an :class:`ArraySource` or :class:`ZarrSource`;
    ``channel_names``: one per model output. ``callback(done, total)`` after every batch of tiles.
    """
    _check_source(model, source)
    if len(channel_names) != int(model.n_outputs):
        raise UserError(f"{len(channel_names)} output channel name(s) for a model with {model.n_outputs} outputs")
    h, w, _ = source.shape
    grid = grid_plan(h, w, tile, overlap, batch)
    rows, cols = grid.rows, grid.cols
    bands = (source.region(y, min(y + stats_rows, h), 0, w) for y in range(0, h, stats_rows))
    off, sc = model.offset_scale_of_blocks(bands, total_pixels=h * w)
    off, sc = np.asarray(off, np.float32), np.asarray(sc, np.float32)
    th, tw = rows.tile, cols.tile
    nr = [wi / rows.wsum[s:s + th] for s, wi in zip(rows.starts, rows.windows)]  # normalised 1-D windows
    nc = [wj / cols.wsum[s:s + tw] for s, wj in zip(cols.starts, cols.windows)]
    coords = [(i, j) for i in range(len(rows.starts)) for j in range(len(cols.starts))]
    batches = [coords[b:b + grid.batch] for b in range(0, len(coords), grid.batch)]

    def read(chunk_coords):
        return np.stack([_read_tile(source, rows.starts[i], th, cols.starts[j], tw, off, sc) for i, j in chunk_coords])

    writer = OmeZarrWriter(out_path, h, w, channel_names, getattr(source, "pixel_size_um", None), chunk)
    try:
        with ThreadPoolExecutor(1, "islkeras-read") as rpool, ThreadPoolExecutor(1, "islkeras-write") as wpool:
            pending = rpool.submit(read, batches[0])
            writes: list = []
            for b, chunk_coords in enumerate(batches):
                tiles = pending.result()
                if b + 1 < len(batches):
                    pending = rpool.submit(read, batches[b + 1])
                pred = model.predict_normalized(tiles)
                del tiles
                while len(writes) > 1:  # at most two batches of predictions wait for the disk
                    writes.pop(0).result()
                for k, (i, j) in enumerate(chunk_coords):
                    contrib = pred[k] * (nr[i][:, None] * nc[j][None, :])[..., None]
                    writes.append(wpool.submit(writer.add, rows.starts[i], cols.starts[j], contrib))
                if callback is not None:
                    callback(min((b + 1) * grid.batch, len(coords)), len(coords))
            for f in writes:
                f.result()
        if output_scale:
            _to_output_scale(model, writer, h, chunk)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _to_output_scale(model, writer: OmeZarrWriter, h: int, rows: int) -> None:
    meta = getattr(model, "meta", {}) or {}
    ts = meta.get("target_scale")
    if meta.get("kind") != "isl" or ts is None:
        return
    scale = np.asarray(ts["scale"], np.float32)[:, None, None]
    offset = np.asarray(ts["offset"], np.float32)[:, None, None]

    def affine(band):
        band *= scale
        band += offset
        return band

    writer.map_bands(affine, rows)
