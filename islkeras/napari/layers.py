"""napari layers <-> the arrays islkeras predicts (no Qt here: the widgets call these, in the worker thread
where the work is heavy).

* ``model_info(path)``: a run folder or SavedModel -> ``ModelInfo`` (metadata, one ``ChannelSpec`` per input
  channel from the run's ``config.json``, the segmentation threshold) without loading TensorFlow;
* ``LayerInput`` / ``model_input``: the image layer chosen for each input channel -> the raw ``(H, W, C_in)``
  field ``predict_field`` takes. A 2-D layer is one plane, a 3-D layer ``(planes, y, x)`` a z-stack (the
  run's ``planes``/``projection`` of that channel apply, as in ``islkeras predict``), an RGB layer its colour
  planes;
* ``LayerInput.frame``: the layer's last two axes' ``scale``/``translate``/``units``, i.e. the pixel size
  when the layer has one (a reader that knows the pixel size sets the scale); the output layers get it, so a
  prediction lies on its input in world coordinates;
* ``prediction_layers`` / ``labels_from_probability``: the prediction as napari layer data, with a colormap
  chosen from the channel's name and contrast limits from percentiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np

from islkeras.errors import DataError, UserError

#: channel-name fragment -> napari colormap (first match wins); nuclear stains are blue as in Fiji/ImageJ,
#: transmitted light grey
COLORMAP_RULES = (
    (("bright", "phase", "dic", "trans", "bf"), "gray"),
    (("dapi", "hoechst", "nuc", "dna", "h2b"), "blue"),
    (("tuj", "tubulin", "axon", "neurite", "gfp", "green"), "green"),
    (("map2", "dendrit", "membrane", "cy5", "far"), "magenta"),
    (("actin", "phalloidin", "rfp", "mcherry", "red"), "red"),
    (("mito", "yellow"), "yellow"),
    (("dead", "cyan"), "cyan"),
)
#: colormaps for channels no rule matches, in output order
FALLBACK_COLORMAPS = ("green", "magenta", "cyan", "yellow", "red", "blue")
#: contrast limits of a predicted fluorescence layer: these percentiles of its pixels
CONTRAST_PERCENTILES = (0.5, 99.9)


def one_line(e: BaseException) -> str:
    """The one line a widget shows for an error: a ``UserError``'s message, else ``Type: first line``."""
    if isinstance(e, UserError):
        msg = e.format_message()
    elif isinstance(e, MemoryError):
        return "not enough memory: try a smaller tile size"
    else:
        msg = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


# ------------------------------------------------------------------------------------------ the model
@dataclass
class ModelInfo:
    """What the widgets need to know of a model before TensorFlow loads it."""

    path: Path  #: the SavedModel folder
    meta: dict  #: assets/islkeras.json
    specs: dict  #: input channel -> ChannelSpec (planes, projection)
    threshold: float  #: probability threshold of a segmentation model (the transfer run's), else 0.5

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "isl"))

    @property
    def inputs(self) -> list[str]:
        return list(self.meta["inputs"])

    @property
    def outputs(self) -> list[str]:
        from islkeras.inference.fields import output_names

        return output_names(self.meta)

    def describe(self) -> str:
        arch = "/".join(str(self.meta[k]) for k in ("architecture", "backbone") if self.meta.get(k))
        what = "segmentation model" if self.kind == "segmentation" else "ISL model"
        extra = f", threshold {self.threshold:g}" if self.kind == "segmentation" else ""
        return (f"{what}: {', '.join(self.inputs)} -> {', '.join(self.outputs)} "
                f"({self.meta.get('n_inputs')} input plane(s), {self.meta.get('input_dtype')}"
                f"{', ' + str(arch) if arch else ''}{extra})")


def model_info(path) -> ModelInfo:
    """``ModelInfo`` of a run folder or SavedModel; ``UserError`` (one line) when it is neither."""
    from islkeras.inference.fields import input_specs
    from islkeras.models.savedmodel import find_savedmodel, read_meta
    from islkeras.training.run import run_config_of

    text = str(path or "").strip()
    if not text:
        raise UserError("no model: pick a run folder (runs/<name>/<stamp>) or a SavedModel folder")
    sm = find_savedmodel(Path(text).expanduser())
    meta = read_meta(sm)
    for key in ("n_inputs", "n_outputs"):
        if key not in meta:
            raise UserError(f"{sm}/assets/islkeras.json: metadata lacks {key}")
    specs = input_specs(SimpleNamespace(meta=meta, path=sm))
    threshold = meta.get("threshold")
    if threshold is None:
        cfg = run_config_of(sm)
        tr = getattr(cfg, "transfer", None) if cfg is not None else None
        threshold = getattr(tr, "threshold", None)
    return ModelInfo(sm, meta, specs, float(0.5 if threshold is None else threshold))


# ----------------------------------------------------------------------------------------- the inputs
@dataclass
class LayerInput:
    """An image layer's pixels and placement, captured in the GUI thread (reading them can wait)."""

    name: str
    data: Any  #: layer.data (numpy, dask, ...; the first level of a multiscale layer)
    rgb: bool = False
    frame: dict = field(default_factory=dict)  #: scale/translate/units of the last two axes

    @classmethod
    def of(cls, layer) -> "LayerInput":
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        rgb = bool(getattr(layer, "rgb", False))
        # the last two axes are y, x (an RGB layer's colour axis is not one of its dimensions)
        frame = {"scale": tuple(float(s) for s in layer.scale[-2:]),
                 "translate": tuple(float(t) for t in layer.translate[-2:])}
        units = getattr(layer, "units", None)
        if units is not None:
            frame["units"] = tuple(str(u) for u in units[-2:])
        return cls(layer.name, data, rgb, frame)

    def planes(self) -> np.ndarray:
        """The layer as ``(H, W, planes)``."""
        a = np.asarray(self.data)
        if self.rgb:
            return a if a.ndim == 3 else a.reshape(a.shape[:2] + (-1,))
        if a.ndim == 2:
            return a[..., None]
        if a.ndim == 3:
            return np.moveaxis(a, 0, -1)
        raise DataError(f"layer {self.name!r}: {a.ndim}-D data of shape {a.shape}; pick a 2-D image or a "
                        f"z-stack (planes, y, x)")


def pixel_size_text(frame: dict) -> str:
    """How the widget reports the pixel size it used (from the layer's scale when the layer has one)."""
    sy, sx = frame.get("scale", (1.0, 1.0))
    units = frame.get("units") or ("pixel", "pixel")
    if (sy, sx) == (1.0, 1.0) and all(u in ("pixel", "px", "") for u in units):
        return "pixel size: not given (layer scale 1)"
    unit = "" if units[-1] in ("pixel", "px") else f" {units[-1].replace('micrometer', 'µm')}"
    return f"pixel size: {sy:g} x {sx:g}{unit} (from the layer's scale)"


def _apply_spec(arr: np.ndarray, spec, where: str) -> np.ndarray:
    """The run's z planes and projection of one channel (the code ``islkeras.data.tiff.read_channel`` uses)."""
    from islkeras.data.tiff import project, select_planes

    return project(select_planes(arr, spec, where), spec)


def model_input(info: ModelInfo, layers: Sequence[LayerInput]) -> np.ndarray:
    """The raw ``(H, W, n_inputs)`` field from one layer per input channel (in ``info.inputs`` order);
    ``DataError`` naming the layer(s) when it cannot be predicted."""
    from islkeras.inference.tiling import check_image

    names = info.inputs
    if len(layers) != len(names):
        raise UserError(f"the model takes {len(names)} input channel(s) ({', '.join(names)}), "
                        f"{len(layers)} layer(s) were chosen")
    parts = []
    for n, lay in zip(names, layers):
        parts.append(_apply_spec(lay.planes(), info.specs[n], f"layer {lay.name!r} (input channel {n!r})"))
    shapes = {a.shape[:2] for a in parts}
    if len(shapes) > 1:
        desc = ", ".join(f"{lay.name!r} {a.shape[0]}x{a.shape[1]}" for lay, a in zip(layers, parts))
        raise DataError(f"the input layers have different sizes: {desc}")
    if len(parts) == 1:
        image = parts[0]
    else:
        dt = np.result_type(*[a.dtype for a in parts])
        image = np.concatenate([a.astype(dt, copy=False) for a in parts], axis=-1)
    n_in = int(info.meta["n_inputs"])
    where = ", ".join(f"layer {lay.name!r}" for lay in layers)
    if image.shape[-1] != n_in:
        got = ", ".join(f"{n}: {a.shape[-1]}" for n, a in zip(names, parts))
        raise DataError(f"{where}: the model takes {n_in} input plane(s) ({', '.join(names)}), got "
                        f"{image.shape[-1]} ({got}); a z-stack layer is (planes, y, x)")
    return check_image(image, n_in, where)


# ---------------------------------------------------------------------------------------- the outputs
def colormap_for(name: str, index: int = 0) -> str:
    low = name.lower()
    for keys, cmap in COLORMAP_RULES:
        if any(k in low for k in keys):
            return cmap
    return FALLBACK_COLORMAPS[index % len(FALLBACK_COLORMAPS)]


def contrast_for(data: np.ndarray) -> tuple[float, float]:
    """Contrast limits from the ``CONTRAST_PERCENTILES`` of the finite pixels (a range, never empty)."""
    a = np.asarray(data, np.float32)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(a, CONTRAST_PERCENTILES))
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            hi = lo + 1.0
    return lo, hi


def prediction_layers(pred: np.ndarray, info: ModelInfo, source: LayerInput) -> list[tuple]:
    """napari layer data ``(data, kwargs, "image")`` per output channel of an ``(H, W, C_out)`` prediction:
    named ``<channel> (predicted)``, on the source layer's pixel grid, additive blending over it."""
    out = []
    for i, ch in enumerate(info.outputs):
        data = np.ascontiguousarray(pred[..., i])
        if info.kind == "segmentation":
            cmap, clim, name = "magma", (0.0, 1.0), f"{ch} (probability)"
        else:
            cmap, clim, name = colormap_for(ch, i), contrast_for(data), f"{ch} (predicted)"
        kw = dict(name=name, colormap=cmap, contrast_limits=clim, blending="additive",
                  metadata={"islkeras": {"model": str(info.path), "source": source.name, "channel": ch}},
                  **source.frame)
        out.append((data, kw, "image"))
    return out


def labels_from_probability(prob: np.ndarray, threshold: float, min_size: Optional[int] = None,
                            split: bool = True) -> np.ndarray:
    """Instance labels (int32) of ``prob > threshold`` through ``islkeras masks``' classical method.

    The foreground is thresholded at the run's probability threshold first; the binary image then goes
    through ``make_segmenter("classical")`` with a fixed threshold of 0.5 and no smoothing (its percentile
    normalisation keeps a 0/1 image 0/1), so the masks code fills holes, removes objects under
    ``min_size`` pixels and splits touching nuclei by its distance-transform watershed.
    """
    from islkeras.segmentation.classical import ClassicalParams
    from islkeras.segmentation.masks import make_segmenter

    p = np.asarray(prob, np.float32)
    if p.ndim == 3:
        p = p[..., 0]
    fg = (p > np.float32(threshold)).astype(np.float32)
    d = ClassicalParams()
    params = ClassicalParams(sigma=0.0, threshold=0.5, split=split,
                             min_size=d.min_size if min_size is None else int(min_size))
    return make_segmenter("classical", params=params)(fg)
