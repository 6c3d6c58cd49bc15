"""The files of a BioImage Model Zoo package besides ``rdf.yaml`` (see :mod:`islkeras.export.bioimageio`).

* ``sample_crop``: a crop of a real field of the run's data -- the first test field (else val, else train),
  read from its TIFF files (from the records when the TIFF folder is gone), the window with the most target
  structure;
* ``write_weights``: the package's SavedModel zip -- the run's network re-saved with one function,
  ``serving_default(image: float32 [N, H, W, C_in] normalised) -> {"prediction": ...}`` (what bioimageio.core
  and deepImageJ call; also the attribute ``serve``, the endpoint Keras 3's ``TFSMLayer`` tries first);
* ``write_files``: those, the test tensors (``.npy``), the sample TIFFs, the cover (input | target |
  prediction, 2:1) and the run's config;
* ``readme``: the documentation, with the ``# Validation`` section holding the run's metrics.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from islkeras.errors import DataError, UserError

#: edge of the sample/test crop (pixels); a smaller field gives a smaller crop (a multiple of the model's 32)
CROP = 256
SPLITS = ("test", "val", "train")


# ------------------------------------------------------------------------------------------- sample
def _read(cfg, field: str, channels: list, region=None) -> dict:
    from islkeras.data.tiff import read_field

    arrays = read_field(cfg.data.root, field, {c: cfg.data.channels[c] for c in channels})
    if region is not None:
        y0, y1, x0, x1 = region
        arrays = {c: a[y0:y1, x0:x1] for c, a in arrays.items()}
    return arrays


def sample_field(cfg, channels: list) -> tuple[str, str, dict]:
    """``(name, split, {channel: (H, W, planes) array})`` of the run's first test field (else val, train)."""
    from islkeras.data.manifest import try_manifest
    from islkeras.data.reader import load_fields, split_names

    manifest = try_manifest(cfg.data.records)
    if manifest is not None:
        for split in SPLITS:
            names = split_names(manifest, split)
            if not names:
                continue
            rec = manifest["fields"][names[0]]
            try:
                return names[0], split, _read(cfg, rec.get("field", names[0]), channels, rec.get("region"))
            except DataError:  # the TIFF folder moved: the records hold the same pixels
                field = load_fields(cfg, split, manifest, channels=channels)[0]
                return field.name, split, field.arrays
    from islkeras.data.splits import assign_splits
    from islkeras.data.tiff import field_names

    try:
        names = field_names(cfg.data.root, cfg.data.fields, {c: cfg.data.channels[c] for c in channels})
        splits = assign_splits(cfg, names)
    except DataError as e:
        raise UserError(f"no field of the run's data to take the test tensors from: no records in "
                        f"{cfg.data.records}, and {e}") from None
    for split in SPLITS:
        for n in names:
            if splits.get(n) == split:
                return n, split, _read(cfg, n, channels)
    return names[0], splits.get(names[0], "?"), _read(cfg, names[0], channels)


def best_window(image: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` window (on a grid of stride size/2) where ``image`` varies most."""
    h, w = image.shape[:2]
    t = image.astype(np.float32).mean(axis=-1) if image.ndim == 3 else image.astype(np.float32)
    step = max(size // 2, 1)
    corners = [(y, x) for y in sorted({*range(0, h - size + 1, step), h - size})
               for x in sorted({*range(0, w - size + 1, step), w - size})]
    return max(corners, key=lambda c: float(t[c[0]:c[0] + size, c[1]:c[1] + size].std()))


def sample_crop(cfg, meta: dict, multiple: int) -> dict:
    """The sample: ``{"field", "split", "corner", "input" (H, W, C_in) in the input dtype, "target"
    (H, W, C_out) or None, "input_names", "target_names"}``, H = W = a multiple of ``multiple``."""
    inputs, targets = list(meta["inputs"]), list(meta["targets"])
    known = [c for c in targets if c in cfg.data.channels]
    field, split, arrays = sample_field(cfg, inputs + known)
    h, w = arrays[inputs[0]].shape[:2]
    size = min(CROP, h // multiple * multiple, w // multiple * multiple)
    if size < multiple:
        raise UserError(f"field {field} is {h}x{w} px: too small for a {multiple}x{multiple} test crop")
    x = np.concatenate([arrays[c] for c in inputs], axis=-1).astype(meta["input_dtype"])
    y = np.concatenate([arrays[c] for c in known], axis=-1) if known else None
    y0, x0 = best_window(y if y is not None else x, size)

    def names(chans):
        n = {c: arrays[c].shape[-1] for c in chans}
        return [c if n[c] == 1 else f"{c}_{i}" for c in chans for i in range(n[c])]

    return {"field": field, "split": split, "corner": (y0, x0), "input": x[y0:y0 + size, x0:x0 + size],
            "target": None if y is None else y[y0:y0 + size, x0:x0 + size],
            "input_names": names(inputs), "target_names": names(known) if known else targets}


# ------------------------------------------------------------------------------------------- files
def write_weights(loaded, dst_zip: Path, input_id: str, output_id: str) -> Path:
    """The network of ``loaded`` (an islkeras SavedModel from ``tf.saved_model.load``) re-saved with one
    function, its ``normalized`` signature as ``serving_default``, zipped (the SavedModel at the zip's
    root)."""
    import tempfile

    import tensorflow as tf

    net = loaded.signatures["normalized"]
    n_in = int(net.structured_input_signature[1]["x"].shape[-1])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, n_in], tf.float32, name=input_id)])
    def serve(x):
        return {output_id: net(x=x)["prediction"]}

    # the variables and this one function only: without the Keras object graph it loads ~6x faster
    holder = tf.Module()
    holder.model_variables = list(loaded.variables)
    holder.serve = serve
    with tempfile.TemporaryDirectory(dir=dst_zip.parent, prefix=".savedmodel.") as tmp:
        tf.saved_model.save(holder, tmp, signatures={"serving_default": serve})
        with zipfile.ZipFile(dst_zip, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(tmp).as_posix())
    return dst_zip


def _display(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, [1.0, 99.8])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def write_cover(path: Path, x: np.ndarray, target: Optional[np.ndarray], pred: np.ndarray,
                titles: list) -> Path:
    """input | target | prediction (first channel each), 800 x 400 px."""
    from islkeras.utils import new_figure, save_figure

    panels = [x[..., 0]] + ([] if target is None else [target[..., 0]]) + [pred[..., 0]]
    titles = titles if target is not None else [titles[0], titles[2]]
    fig = new_figure((8.0, 4.0))
    for i, (img, title) in enumerate(zip(panels, titles)):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(_display(img), cmap="gray" if i == 0 else "magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    return save_figure(fig, path, dpi=100)


def write_files(work: Path, files: dict, ids: tuple, model, sample: dict, pred: np.ndarray, meta: dict,
                config: Path) -> None:
    """Everything but rdf.yaml and README.md into ``work`` (names from ``files``; ``ids``: the input and
    output tensor ids); ``model`` is the run's ``ExportedModel``, ``pred`` its prediction for the sample."""
    import tifffile

    write_weights(model._obj, work / files["weights"], *ids)  # the SavedModel loaded once, for both
    np.save(work / files["test_input"], sample["input"][None])
    np.save(work / files["test_output"], pred)
    tifffile.imwrite(work / files["sample_input"], np.squeeze(sample["input"]))
    tifffile.imwrite(work / files["sample_output"], np.squeeze(pred[0]))
    write_cover(work / files["cover"], sample["input"], sample["target"], pred[0],
                [f"input: {sample['input_names'][0]}", f"target: {', '.join(meta['targets'])}",
                 f"prediction: {sample['target_names'][0]}"])
    shutil.copyfile(config, work / files["config"])


# ------------------------------------------------------------------------------------------- README
def _fmt(stats: Optional[dict]) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n_finite']})"


def evaluations(run_dir: Path) -> dict:
    """``{split: evaluate/<split>/summary.json}`` of a run folder (``islkeras evaluate``)."""
    out = {}
    for f in sorted((Path(run_dir) / "evaluate").glob("*/summary.json")):
        try:
            out[f.parent.name] = json.loads(f.read_text())
        except ValueError:
            continue
    return out


METRICS = ("pcc", "ssim", "psnr", "nrmse", "ssim_z", "psnr_z", "nrmse_z", "mask_jaccard")


def validation_section(run_dir: Path, meta: dict, summary: Optional[dict]) -> list[str]:
    lines = ["# Validation", ""]
    evals = evaluations(run_dir)
    for split, ev in evals.items():
        lines += [f"`islkeras evaluate` on the {split} split ({ev.get('n_images')} images, "
                  f"{ev.get('mode')}); mean ± std over images:", "",
                  "| channel | metric | all | non-empty | empty |", "|---|---|---|---|---|"]
        for ch, block in ev.get("metrics", {}).items():
            for m in METRICS if ch != "_overall" else ():
                if m in block:
                    b = block[m]
                    lines.append(f"| {ch} | {m} | {_fmt(b.get('all'))} | {_fmt(b.get('non_empty'))} | "
                                 f"{_fmt(b.get('empty'))} |")
        lines.append("")
    s = summary or {}
    if meta.get("kind") == "segmentation" and s.get("test_iou") is not None:
        lines += ["Test IoU of the thresholded probability (`islkeras transfer`, whole test fields): "
                  f"{s['test_iou']:.3f} ± {s.get('test_iou_std', float('nan')):.3f}, pixel accuracy "
                  f"{s.get('test_pixel_accuracy', float('nan')):.4f}.", ""]
    if s.get("best") is not None:
        lines += [f"Training: best {s.get('monitor')} {s['best']:.4f} at epoch {s.get('best_epoch')} of "
                  f"{s.get('epochs')} ({s.get('stopped')}).", ""]
    if not evals and s.get("test_iou") is None:
        lines += ["This run has not been evaluated on held-out fields: run "
                  "`islkeras evaluate RUN --split test` and export again to have its metrics here.", ""]
    lines += ["The package's test output is the run's own prediction for its test input; reproduce it with "
              "(where `TF_USE_LEGACY_KERAS` is not set):", "",
              "```bash", "bioimageio test model.zip", "```", ""]
    return lines


NORM_TEXT = {
    "zscore": "each image is z-scored per channel over its own pixels: `zero_mean_unit_variance` over `y, x`",
    "percentile": "each image is scaled per channel by its own percentiles: `scale_range` over `y, x`",
    "minmax": "each image is scaled per channel to its own minimum and maximum: `scale_range` over `y, x` "
              "with percentiles 0 and 100",
    "dataset": "fixed constants of the train fields: `fixed_zero_mean_unit_variance` along `channel`",
}


def readme(rdf: dict, meta: dict, cfg, sample: dict, run_dir: Path, summary: Optional[dict]) -> str:
    """README.md of the package: what goes in and out, the processing and why, training, validation."""
    isl = meta["kind"] == "isl"
    ipt, opt = rdf["inputs"][0], rdf["outputs"][0]
    norm = meta["normalization"]
    pct = (f" ({norm['percentiles'][0]:g} and {norm['percentiles'][1]:g})" if norm["method"] == "percentile"
           else "")
    thr = f" (islkeras thresholds it at {meta['threshold']:g})" if meta.get("threshold") is not None else ""
    out_text = "float32 on the target's intensity scale" if isl else f"float32 probability of the mask{thr}"
    how = (f"loss `{meta.get('loss', 'n/a')}`" if isl else
           f"`islkeras transfer` (init `{meta.get('init', 'n/a')}`) from "
           f"`{meta.get('isl_run') or 'scratch'}`")
    lines = [
        f"# {rdf['name']}", "", rdf["description"], "", "![input | target | prediction](cover.png)", "",
        "## Tensors", "",
        f"* input `{ipt['id']}`: axes batch, y, x, channel ({', '.join(sample['input_names'])}); the raw "
        f"microscope image ({meta['input_dtype']}); height and width multiples of "
        f"{meta.get('multiple', 32)}.",
        f"* output `{opt['id']}`: axes batch, y, x, channel ({', '.join(sample['target_names'])}), the "
        f"input's height and width; {out_text}.", "",
        "## Pre- and postprocessing", "",
        f"Normalisation `{norm['method']}` (as in training): {NORM_TEXT[norm['method']]}{pct}. It is spec "
        "preprocessing, not part of the graph, so that a tool that tiles a large field (deepImageJ, "
        "bioimageio.core) computes it once on the whole image, as `islkeras predict` does.", ""]
    if opt["postprocessing"]:
        k = opt["postprocessing"][0]["kwargs"]
        lines += [f"Postprocessing `scale_linear` along `channel` (gain {k['gain']}, offset {k['offset']}): "
                  "the network predicts the normalised target; this maps it back to intensities with the "
                  "train fields' average target offset and scale.", ""]
    lines += [
        "The weights are the bare network (TensorFlow SavedModel, signature `serving_default`, normalised "
        "float32 input). No halo is declared: when tiling, overlap the tiles by at least 32 pixels.", "",
        "## Training", "",
        f"* islkeras run `{cfg.name}` (config hash `{meta.get('config_hash', 'n/a')}`), architecture "
        f"`{meta.get('architecture')}`" + (f" ({meta['backbone']})" if meta.get("backbone") else "")
        + f", {how}.",
        f"* data `{Path(cfg.data.root).name}`: inputs {', '.join(meta['inputs'])}, targets "
        f"{', '.join(meta['targets'])}. Test tensors and samples: a {sample['input'].shape[0]} px crop of "
        f"field {sample['field']} ({sample['split']} split) at y, x = {sample['corner'][0]}, "
        f"{sample['corner'][1]}.",
        "* the run's resolved config is attached (`config.json`).", ""]
    lines += validation_section(run_dir, meta, summary)
    lines += ["## Cite", ""] + [f"* {c['text']}. doi:{c['doi']}" for c in rdf["cite"]]
    return "\n".join(lines + ["", f"License: {rdf['license']}.", ""])
