"""Fields as files for prediction: which files of a field folder are the model's inputs (run layout,
``--channel/--planes/--projection/--file-channel/--time``), reading them (TIFF, or any microscope format of
``islkeras.data.formats``: OME-TIFF, OME-Zarr, CZI, ND2, LIF), and writing predictions as ImageJ TIFFs.

Output files (``islkeras predict``): ``<out>/<name>_prediction.tif`` where ``<name>`` is the field
folder's name or the input file's name without extension (``_2``, ``_3``... appended when two inputs
share a name; ``.ome.tif``, ``.ome.zarr`` are stripped whole). ImageJ hyperstack: axes ``YX`` (one output
channel) or ``CYX``, channel names as labels.

``--dtype float32`` (default) writes the prediction as it is: float32 on the training target's intensity
scale (ISL) or probabilities 0..1 (segmentation). ``--dtype uint16`` writes::

    ISL:           uint16 = clip(round(prediction), 0, 65535)
    segmentation:  uint16 = round(probability * 65535)

For an ISL model the prediction is already on the target's scale, so a uint8 or uint16 training target
comes back as the same grey values (round half to even); negative predictions (below the camera's black
level) become 0 and values above 65535 become 65535 -- the number of clipped pixels is reported.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from islkeras.data.formats import is_image_path, suffix_of
from islkeras.errors import DataError, UserError
from islkeras.training.run import run_config_of
from islkeras.utils import _umask
from islkeras.inference.tiling import check_image, predict_field

__all__ = ["parse_planes", "input_specs", "InputItem", "find_inputs", "read_input", "output_names", "to_uint16",
           "write_prediction", "unique_names", "FieldSettings", "FieldResult", "predict_one", "failure_message"]


# ------------------------------------------------------------------------------------- input layout
def parse_planes(text: str, what: str = "--planes"):
    """``"all"`` or z indices: ``"0,2,4"``, ``"0-12"`` (inclusive), ``"3"`` -> ``"all"`` or a list."""
    t = str(text).strip().lower()
    if t == "all":
        return "all"
    out = []
    try:
        for part in t.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                a, b = int(a), int(b)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        out = []
    if not out or any(p < 0 for p in out):
        raise UserError(f"{what} {text!r}: expected 'all' or z indices like '0,2,4' or '0-12'")
    return out


def _split_named(value: str, names: Sequence[str], option: str):
    """``NAME=VALUE`` -> (NAME, VALUE); a bare ``VALUE`` applies to every input channel (name None)."""
    if "=" in value:
        name, v = value.split("=", 1)
        name = name.strip()
        if name not in names:
            raise UserError(f"{option} {value!r}: {name!r} is not an input channel of the model ({', '.join(names)})")
        return name, v.strip()
    return None, value.strip()


def input_specs(model, channel_files: Sequence[str] = (), planes: Sequence[str] = (),
                projections: Sequence[str] = (), file_channels: Sequence[str] = (),
                times: Sequence[str] = ()) -> dict:
    """``{input channel: ChannelSpec}`` in the model's input order: the run's ``data.channels`` when the
    model sits in a run folder (``<run>/config.json``), else ``<channel>.tif``/``.tiff`` with all planes;
    then the CLI overrides ``--channel NAME=FILE``, ``--planes [NAME=]LIST``, ``--projection [NAME=]MODE``,
    ``--file-channel [NAME=]CHANNEL`` (a channel name inside the file, or its index when a number) and
    ``--time [NAME=]T``."""
    import copy

    from islkeras.config import ChannelSpec

    names = list(model.meta["inputs"])
    specs = {n: ChannelSpec(file=f"{n}.tif*") for n in names}
    cfg = run_config_of(model.path)
    if cfg is not None:
        for n in names:
            if n in cfg.data.channels:
                specs[n] = copy.deepcopy(cfg.data.channels[n])
    for item in channel_files:
        if "=" not in item:
            raise UserError(f"--channel {item!r}: expected NAME=FILE, e.g. brightfield=BF.tif")
        n, v = _split_named(item, names, "--channel")
        specs[n].file = v
    for item in planes:
        n, v = _split_named(item, names, "--planes")
        for k in ([n] if n else names):
            specs[k].planes = parse_planes(v)
    for item in projections:
        n, v = _split_named(item, names, "--projection")
        if v not in ("none", "max", "mean"):
            raise UserError(f"--projection {item!r}: expected none, max or mean")
        for k in ([n] if n else names):
            specs[k].projection = v
    for item in file_channels:
        n, v = _split_named(item, names, "--file-channel")
        if not v:
            raise UserError(f"--file-channel {item!r}: expected [NAME=]CHANNEL, a channel's name or index")
        for k in ([n] if n else names):
            specs[k].channel = int(v) if v.isdigit() else v
    for item in times:
        n, v = _split_named(item, names, "--time")
        if not v.isdigit():
            raise UserError(f"--time {item!r}: expected [NAME=]T, a time point index >= 0")
        for k in ([n] if n else names):
            specs[k].time = int(v)
    return specs


@dataclass
class InputItem:
    """One thing to predict: a field folder laid out like the training data, or a single image file."""

    name: str  #: used for the output file name
    kind: str  #: "field" or "file"
    path: Path  #: the field folder or the image file (an OME-Zarr folder is a file here)
    root: Optional[Path] = None  #: data root a field's channel patterns are resolved against
    error: Optional[str] = None  #: set when the input could not even be located


IMAGE_KINDS = ".tif/.tiff, .ome.tif, .ome.zarr, .czi, .nd2, .lif"
_is_image = is_image_path  #: a TIFF, CZI, ND2, LIF... file or an OME-Zarr folder


def _stem(p: Path) -> str:
    """The file name without its format suffix (``.tif``, ``.ome.tif``, ``.ome.zarr``, ``.czi``...)."""
    s = suffix_of(p)
    return p.name[:len(p.name) - len(s)] if s and p.name.lower().endswith(s) else p.stem


def _resolves(root: Path, field: str, specs: Mapping) -> bool:
    from islkeras.data import tiff as _tiff

    try:
        for n, s in specs.items():
            _tiff.channel_path(root, field, n, s)
    except UserError:
        return False
    return True


def find_inputs(paths: Iterable[Union[str, Path]], specs: Mapping) -> list[InputItem]:
    """Expand the INPUT arguments into ``InputItem``s (see ``predict_command``'s help for the rules)."""
    from islkeras.data import tiff as _tiff

    items: list[InputItem] = []
    flat = any("{field}" in s.file for s in specs.values())
    for raw in paths:
        p = Path(raw)
        if _is_image(p):
            items.append(InputItem(_stem(p), "file", p))
            continue
        if p.is_file():
            items.append(InputItem(p.stem, "file", p, error=f"{p}: not an image file ({IMAGE_KINDS})"))
            continue
        if not p.is_dir():
            items.append(InputItem(p.name or str(p), "file", p, error=f"{p}: no such file or folder"))
            continue
        if not flat and _resolves(p.parent, p.name, specs):
            items.append(InputItem(p.name, "field", p, root=p.parent))
            continue
        found: list[InputItem] = []
        if flat:
            try:
                names = _tiff.field_names(p, "*", specs)
            except UserError:
                names = []
            found = [InputItem(n, "field", p / n, root=p) for n in names]
        else:
            subs = (d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and not _is_image(d))
            for sub in sorted(subs):
                if _resolves(p, sub.name, specs):
                    found.append(InputItem(sub.name, "field", sub, root=p))
                elif any(_is_image(f) for f in sub.iterdir()):
                    want = ", ".join(f"{n}: {s.file}" for n, s in specs.items())
                    found.append(InputItem(sub.name, "field", sub, root=p,
                                           error=f"{sub}: not a field folder of this model (expects {want})"))
        if not found:
            found = [InputItem(_stem(f), "file", f) for f in sorted(p.iterdir()) if _is_image(f)]
        if not found:
            want = ", ".join(f"{n}: {s.file}" for n, s in specs.items())
            found = [InputItem(p.name, "field", p, error=f"{p}: no image files and no field folders ({want}) in it")]
        items.extend(found)
    return items


def read_input(item: InputItem, specs: Mapping, n_inputs: int) -> np.ndarray:
    """The raw ``(H, W, n_inputs)`` network input of one ``InputItem`` (DataError naming the file otherwise).

    A field folder: every input channel read as its ``ChannelSpec`` says (file, planes, projection), planes
    stacked in the model's input order. A single file: with one input channel, read with that channel's
    channel/time/planes/projection; with several, each input channel is read from the file by its own
    ``channel`` when one names it (a CZI/ND2/LIF/OME file holding every input channel), else the file's planes
    (after ``--planes``) must be all the input planes in order. 2-D TIFFs are one plane; TIFF stacks are split
    into planes by their non-YX axes (ZYX, CYX, YXS...).
    """
    import copy

    from islkeras.data import tiff as _tiff

    if item.error:
        raise DataError(item.error)
    names = list(specs)
    if item.kind == "field":
        parts, shapes = [], {}
        for n in names:
            path = _tiff.channel_path(item.root, item.path.name, n, specs[n])
            arr = _tiff.read_channel(path, specs[n], item.path.name, n)
            shapes[n] = (arr.shape[:2], path.name)
            parts.append(arr)
        if len({s for s, _ in shapes.values()}) > 1:
            desc = ", ".join(f"{n} {h}x{w} ({f})" for n, ((h, w), f) in shapes.items())
            raise DataError(f"field {item.path}: input channels have different sizes: {desc}")
        where = f"field {item.path}"
        detail = ", ".join(f"{n}: {a.shape[-1]}" for n, a in zip(names, parts))
    elif len(names) > 1 and any(specs[n].channel is not None for n in names):  # one file holds every input
        parts = [_tiff.read_channel(item.path, specs[n], item.name, n) for n in names]
        where = str(item.path)
        detail = ", ".join(f"{n}: {a.shape[-1]}" for n, a in zip(names, parts))
    else:
        if len(names) == 1:
            spec = copy.deepcopy(specs[names[0]])
        else:
            from islkeras.config import ChannelSpec
            from islkeras.data.formats import is_tiff, open_image

            if not is_tiff(item.path) and len(chans := open_image(item.path).channel_names) > 1:
                raise DataError(f"{item.path}: which of its channels ({', '.join(chans)}) is each input of the "
                                f"model ({', '.join(names)})? say it with "
                                + " ".join(f"--file-channel {n}=CHANNEL" for n in names))

            first = specs[names[0]]
            spec = ChannelSpec(file=item.path.name, planes=first.planes, projection=first.projection)
        parts = [_tiff.read_channel(item.path, spec, item.name, names[0] if len(names) == 1 else "input")]
        where = str(item.path)
        detail = f"{parts[0].shape[-1]} in the file"
    if len(parts) == 1:
        image = parts[0]
    else:
        dt = np.result_type(*[a.dtype for a in parts])
        image = np.concatenate([a.astype(dt, copy=False) for a in parts], axis=-1)
    if image.shape[-1] != n_inputs:
        hint = ("; pick planes with --planes (e.g. --planes 0 or --planes 0-12) or collapse them with --projection "
                "max (a multi-channel file: pick the channel with --file-channel NAME=CHANNEL)")
        raise DataError(f"{where}: the model takes {n_inputs} input plane(s) "
                        f"({', '.join(names)}), got {image.shape[-1]} ({detail}){hint}")
    return check_image(image, n_inputs, where)


# --------------------------------------------------------------------------------------------- output
def output_names(meta: Mapping) -> list[str]:
    """Names of the output channels: the target channels, or ``<target>_<i>`` for multi-plane targets."""
    n = int(meta["n_outputs"])
    targets = list(meta.get("targets") or [])
    if len(targets) == n:
        return targets
    if len(targets) == 1:
        return [f"{targets[0]}_{i}" for i in range(n)]
    return [f"channel_{i}" for i in range(n)]


def to_uint16(pred: np.ndarray, kind: str = "isl") -> tuple[np.ndarray, int]:
    """(uint16 image, number of clipped pixels) per the mapping in the module doc."""
    p = np.asarray(pred, np.float32)
    if kind == "segmentation":
        p = p * np.float32(65535.0)
    r = np.rint(p)
    clipped = int(np.count_nonzero((r < 0) | (r > 65535)))
    return np.clip(r, 0, 65535).astype(np.uint16), clipped


def write_prediction(path: Union[str, Path], pred: np.ndarray, channel_names: Sequence[str],
                     dtype: str = "float32", kind: str = "isl", pixel_size_um: Optional[float] = None) -> int:
    """Write an (H, W, C) prediction as an ImageJ TIFF (axes YX or CYX, channel labels; ``pixel_size_um`` as
    ImageJ resolution tags when known), atomically (temporary file + rename). Returns the number of pixels
    clipped by ``dtype="uint16"``."""
    import tifffile

    path = Path(path)
    clipped = 0
    if dtype == "uint16":
        data, clipped = to_uint16(pred, kind)
    elif dtype == "float32":
        data = np.asarray(pred, np.float32)
    else:
        raise UserError(f"--dtype {dtype!r}: expected float32 or uint16")
    if data.ndim == 2:
        data = data[..., None]
    names = list(channel_names)
    if data.shape[-1] == 1:
        arr, meta = data[..., 0], {"axes": "YX", "Labels": names[:1]}
    else:
        arr, meta = np.moveaxis(data, -1, 0), {"axes": "CYX", "Labels": names}
    res = {}
    if pixel_size_um:
        meta["unit"] = "um"
        res = {"resolution": (1.0 / pixel_size_um, 1.0 / pixel_size_um)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # complete on disk before it gets its name (a worker may die next)
            tifffile.imwrite(f, np.ascontiguousarray(arr), imagej=True, metadata=meta, **res)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: others on a shared filesystem could not read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return clipped


def unique_names(items: Sequence[InputItem]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        base = re.sub(r"[\\/:*?\"<>|]", "_", it.name) or "field"
        k = seen.get(base, 0) + 1
        seen[base] = k
        out.append(base if k == 1 else f"{base}_{k}")
    return out


# ------------------------------------------------------------------------------- one field, end to end
@dataclass(frozen=True)
class FieldSettings:
    """What every field of one ``islkeras predict`` shares (picklable: sent to Dask workers as is)."""

    out: Path  #: output folder; a field is written to ``out/<name>_prediction.tif``
    specs: Mapping  #: ``{input channel: ChannelSpec}`` (``input_specs``)
    labels: tuple  #: output channel names (``output_names``)
    dtype: str = "float32"
    kind: str = "isl"
    tile: int = 512
    overlap: int = 64
    batch: int = 4
    tta: bool = False
    output_format: str = "tiff"  #: "tiff" (in memory) or "ome-zarr" (streamed tile by tile, flat memory)
    pixel_size: Optional[float] = None  #: --pixel-size: the fields' pixel size (um), resampled to the model's
    diameter: Union[str, float, None] = None  #: --diameter: nuclei diameter (px) in the fields, or "auto"

    def target(self, name: str) -> Path:
        suffix = ".ome.zarr" if self.output_format == "ome-zarr" else ".tif"
        return Path(self.out) / f"{name}_prediction{suffix}"


@dataclass(frozen=True)
class FieldResult:
    """The outcome of one field: ``ok`` and a note (clipped pixels), or the one-line error ``message``."""

    name: str
    ok: bool
    message: str = ""  #: the error (ok False) or a note for the user (ok True), "" when there is nothing to say


def failure_message(item: InputItem, exc: BaseException) -> str:
    """The one-line error of a field that failed, naming its file (the same text serial and on Dask)."""
    if isinstance(exc, UserError):
        msg = exc.format_message()
        return msg if str(item.path) in msg else f"{item.path}: {msg}"  # name the file (NaN pixels...)
    if isinstance(exc, MemoryError):
        return f"{item.path}: not enough memory (try a smaller --tile or --batch)"
    return f"{item.path}: prediction failed ({type(exc).__name__}: {exc})"


def predict_one(model, item: InputItem, name: str, settings: FieldSettings) -> FieldResult:
    """Read, predict and write (atomically) one field: the body of ``islkeras predict``'s serial loop and
    of its Dask task. Never raises for a bad field: the error comes back as ``FieldResult(ok=False)``."""
    try:
        if settings.output_format == "ome-zarr":
            _predict_streamed(model, item, name, settings)
            return FieldResult(name, True, "")
        image = read_input(item, settings.specs, model.n_inputs)
        from islkeras.inference.rescale import field_factor, predict_rescaled

        kw = dict(tile=settings.tile, overlap=settings.overlap, batch=settings.batch, tta=settings.tta)
        pred = predict_rescaled(model, image, field_factor(model, image, settings, str(item.path), **kw), **kw)
        clipped = write_prediction(settings.target(name), pred, settings.labels, settings.dtype, settings.kind,
                                   settings.pixel_size)
    except Exception as e:  # keep going: one bad file must not stop the others
        return FieldResult(name, False, failure_message(item, e))
    note = f"{item.path}: {clipped} pixel(s) outside 0..65535 clipped for uint16" if clipped else ""
    return FieldResult(name, True, note)


def _predict_streamed(model, item: InputItem, name: str, settings: FieldSettings) -> None:
    """One field into ``<name>_prediction.ome.zarr`` tile by tile: an OME-Zarr input is read region by region
    (flat memory for any size), any other input is read whole first."""
    from islkeras.inference.streaming import ArraySource, open_source, predict_streamed

    if item.error:
        raise DataError(item.error)
    source = open_source(item.path, settings.specs, model.n_inputs) if item.kind == "file" else None
    if source is None:
        source = ArraySource(read_input(item, settings.specs, model.n_inputs), str(item.path))
    predict_streamed(model, source, settings.target(name), settings.labels, tile=settings.tile,
                     overlap=settings.overlap, batch=settings.batch)
