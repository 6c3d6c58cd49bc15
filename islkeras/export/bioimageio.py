"""``islkeras export --format bioimageio``: a run as a BioImage Model Zoo model package (format 0.5.12).

``export(run_dir, out)`` writes ``out`` (a ``.zip``): ``rdf.yaml``, the weights as a
``tensorflow_saved_model_bundle`` (a zipped SavedModel), test input/output tensors (``.npy``) and sample TIFFs
of a crop of a real field of the run's data, a cover (input | target | prediction), the run's ``config.json``
and a ``README.md`` whose ``# Validation`` section holds the run's metrics. ``bioimageio test out.zip``
(bioimageio.core 0.11) reproduces the test output from the test input; deepImageJ and bioimage.io read the
same package. The files other than ``rdf.yaml`` come from :mod:`islkeras.export.bioimageio_files`.

**Normalisation is spec preprocessing, not graph code.** Each islkeras method is one operation of the spec
with the same arithmetic (``x_norm = (x - offset) / scale``, see ``islkeras.data.normalize``):

==========  ===========================================================================
zscore      ``zero_mean_unit_variance`` over ``y, x`` (per image and channel)
percentile  ``scale_range`` over ``y, x`` with the run's two percentiles
minmax      ``scale_range`` over ``y, x`` with percentiles 0 and 100
dataset     ``fixed_zero_mean_unit_variance`` along ``channel`` with the train-set constants
==========  ===========================================================================

(the spec divides by ``scale + 1e-6`` where islkeras divides by ``max(scale, 1e-6)``: the same for any
image that is not constant). A consumer that tiles a large field (deepImageJ, bioimageio.core's blockwise
prediction) then computes the statistics once on the whole image, as ``islkeras predict`` does;
normalising inside the graph would normalise each tile on its own. The map back to the target's
intensities (``y = y_norm * scale + offset``, train-set averages) is ``scale_linear`` along ``channel``
(ISL runs); segmentation runs output probabilities (a sigmoid inside the network): no postprocessing.
The weights are therefore the bare network, ``serving_default(image: float32 [N, H, W, C_in]) ->
{"prediction": float32 [N, H, W, C_out]}`` with H and W multiples of 32.

The test output is what the run's own SavedModel (``serving_default``: raw image in, normalisation in the
graph) predicts for the test input, so ``bioimageio test`` checks that the spec's operations around the
bare network reproduce islkeras's prediction.
"""
from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from islkeras.errors import UserError

EXTRA = "bioimageio"
FORMAT_VERSION = "0.5.12"
INPUT_ID, OUTPUT_ID = "image", "prediction"
NAME_RE = re.compile(r"^[A-Za-z0-9_+\- ()]{5,128}$")  # what the spec allows in a model name
EPS = 1e-6
#: ``bioimageio test``'s absolute tolerance in units of the output's scale (the target's scale; 1 for
#: probabilities): differences arise in the network's normalised units (measured here: ~1e-6), then scale up
TOLERANCE = 1e-4
FILES = {"readme": "README.md", "cover": "cover.png", "config": "config.json", "weights": "savedmodel.zip",
         "test_input": "test_input.npy", "test_output": "test_output.npy",
         "sample_input": "sample_input.tif", "sample_output": "sample_output.tif"}

ISL_PAPER = {"text": "Christiansen EM et al. (2018). In silico labeling: predicting fluorescent labels in "
                     "unlabeled images. Cell 173(3): 792-803.e19", "doi": "10.1016/j.cell.2018.03.040"}
#: the shipped data sets (by data.root's folder name): what to cite besides ISL_PAPER, the models' license
DATASETS = {
    "aiseg-nuclei": {"license": "CC-BY-4.0", "cite": [
        {"text": "Schirmacher D et al. (2024). aiSEGcell: user-friendly deep learning-based segmentation of "
                 "nuclei in transmitted light images. PLoS Comput Biol 20(8): e1012361",
         "doi": "10.1371/journal.pcbi.1012361"},
        {"text": "Schirmacher D et al. (2024). Data set Schirmacher_aiSEGcell_supplement, ETH Research "
                 "Collection (aiseg-nuclei is a selection of its fields, CC BY 4.0)",
         "doi": "10.3929/ethz-b-000679085"}]},
    "isl-neurons": {"license": "Apache-2.0", "cite": []},  # google/in-silico-labeling test data: ISL_PAPER
}
DEFAULT_LICENSE = "CC-BY-4.0"


def _spec():
    try:
        import bioimageio.spec as spec
    except ImportError as e:
        raise UserError(f"--format bioimageio needs the '{EXTRA}' extra ({e}): "
                        f"pip install 'islkeras[{EXTRA}]'") from None
    return spec


# ------------------------------------------------------------------------------------------- rdf.yaml
def preprocessing(meta: dict) -> list[dict]:
    """The run's normalisation as spec preprocessing (see the module docstring)."""
    norm = meta["normalization"]
    method = norm["method"]
    if method == "zscore":
        op = {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": EPS}}
    elif method in ("percentile", "minmax"):
        lo, hi = norm.get("percentiles", [1.0, 99.8]) if method == "percentile" else (0.0, 100.0)
        op = {"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": float(lo),
                                              "max_percentile": float(hi), "eps": EPS}}
    elif method == "dataset":
        ds = norm["input_dataset"]
        op = {"id": "fixed_zero_mean_unit_variance", "kwargs": {
            "axis": "channel", "mean": [float(v) for v in ds["offset"]],
            "std": [max(float(v), EPS) for v in ds["scale"]]}}
    else:
        raise UserError(f"normalisation {method!r} of this run has no BioImage Model Zoo equivalent")
    f32 = {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}  # data.type: the tensor after this
    return [f32, op, f32]


def postprocessing(meta: dict) -> list[dict]:
    """ISL: ``scale_linear`` back to the target's intensities; segmentation (probabilities): none."""
    ts = meta.get("target_scale")
    if meta["kind"] != "isl" or not ts:
        return []
    gain, offset = [float(v) for v in ts["scale"]], [float(v) for v in ts["offset"]]
    if all(g == 1.0 for g in gain) and all(o == 0.0 for o in offset):
        return []  # the spec rejects an identity scale_linear
    return [{"id": "scale_linear", "kwargs": {"axis": "channel", "gain": gain, "offset": offset}}]


def output_scale(meta: dict) -> float:
    ts = meta.get("target_scale")
    return float(max(ts["scale"])) if meta["kind"] == "isl" and ts else 1.0


def tags(meta: dict, dataset: Optional[str]) -> list[str]:
    """One tag of each bioimage.io category (modality, dims, content, task, framework, software, network)."""
    nuclear = re.search(r"nucle|hoechst|dapi|mask|dna", " ".join(meta["targets"]).lower())
    content = "nuclei" if nuclear else "cells"
    task = "semantic-segmentation" if meta["kind"] == "segmentation" else "in-silico-labeling"
    backbone = (meta.get("backbone") or "").lower()
    net = ["unet"] + [n for n in ("densenet", "resnet", "inception") if backbone.startswith(n)]
    return ["transmission-light-microscopy", "2d", content, task, "tensorflow", "deepimagej", *net,
            "islkeras", *([dataset] if dataset else [])]


def _axes(channel_names: list, size) -> list[dict]:
    return [{"type": "batch"}, {"type": "space", "id": "y", "size": size("y")},
            {"type": "space", "id": "x", "size": size("x")},
            {"type": "channel", "channel_names": list(channel_names)}]


def _tensor(tid: str, description: str, axes: list, data: dict, proc: tuple, test: str, sample: str) -> dict:
    return {"id": tid, "description": description, "axes": axes, "data": data, proc[0]: proc[1],
            "test_tensor": {"source": test}, "sample_tensor": {"source": sample}}


def build_rdf(*, name: str, version: str, meta: dict, cfg, sample: dict, author: str, tf_version: str,
              multiple: int, dataset: Optional[str]) -> dict:
    """The ``rdf.yaml`` content; its files (``FILES``) are relative to the package folder."""
    isl = meta["kind"] == "isl"
    ins, outs = ", ".join(meta["inputs"]), ", ".join(meta["targets"])
    desc = (f"islkeras in-silico labeling model: predicts {outs} fluorescence from {ins}." if isl else
            f"islkeras segmentation model: {outs} probability from {ins}.")
    if cfg.description:
        desc += " " + cfg.description
    desc = desc if len(desc) <= 500 else desc[:497] + "..."
    f = FILES
    ipt = _tensor(INPUT_ID, f"raw {ins} image ({meta['input_dtype']}), normalised by the preprocessing "
                            f"({meta['normalization']['method']})",
                  _axes(sample["input_names"], lambda a: {"min": multiple, "step": multiple}),
                  {"type": "float32"}, ("preprocessing", preprocessing(meta)), f["test_input"],
                  f["sample_input"])
    opt = _tensor(OUTPUT_ID, "on the target's intensity scale" if isl else "probability of the mask channel",
                  _axes(sample["target_names"], lambda a: {"tensor_id": INPUT_ID, "axis_id": a}),
                  {"type": "float32"} if isl else {"type": "float32", "range": [0.0, 1.0]},
                  ("postprocessing", postprocessing(meta)), f["test_output"], f["sample_output"])
    keys = ("kind", "name", "config_hash", "architecture", "backbone", "loss", "inputs", "targets",
            "input_dtype", "normalization", "target_scale", "threshold", "init", "multiple")
    islkeras = {k: meta[k] for k in keys if meta.get(k) is not None}
    islkeras["sample"] = {"field": sample["field"], "split": sample["split"], "y": int(sample["corner"][0]),
                          "x": int(sample["corner"][1]), "size": int(sample["input"].shape[0])}
    return {
        "format_version": FORMAT_VERSION, "type": "model", "name": name, "version": version,
        "description": desc,
        "authors": [{"name": author}],
        "cite": [ISL_PAPER, *(DATASETS[dataset]["cite"] if dataset else [])],
        "license": DATASETS[dataset]["license"] if dataset else DEFAULT_LICENSE,
        "tags": tags(meta, dataset),
        "documentation": {"source": f["readme"]}, "covers": [{"source": f["cover"]}],
        "attachments": [{"source": f["config"]}],
        "inputs": [ipt], "outputs": [opt],
        "weights": {"tensorflow_saved_model_bundle": {"source": f["weights"],
                                                      "tensorflow_version": tf_version}},
        "config": {"islkeras": islkeras, "bioimageio": {"reproducibility_tolerance": [{
            "relative_tolerance": 0.0, "absolute_tolerance": TOLERANCE * output_scale(meta),
            "mismatched_elements_per_million": 100}]}},
    }


# ------------------------------------------------------------------------------------------- export
def default_name(cfg, meta: dict) -> str:
    base = re.sub(r"[^A-Za-z0-9_+\- ()]", "_", f"{cfg.name} ({' '.join(meta['inputs'])} to "
                                                f"{' '.join(meta['targets'])})")[:64]
    return base if len(base) >= 5 else f"islkeras {base}"


def author() -> str:
    """$ISLKERAS_AUTHOR, else the account's full name, else the login name."""
    name = os.environ.get("ISLKERAS_AUTHOR", "").strip()
    if not name:
        try:
            import pwd

            name = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].strip()
        except (ImportError, KeyError):
            name = ""
    return (name or getpass.getuser()).replace("/", "-").replace("\\", "-")


def _invalid(descr) -> str:
    errors = getattr(descr.validation_summary, "errors", None) or []
    return "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors[:3]) or "invalid description"


def _run_parts(run_dir: Path):
    """(SavedModel folder, its metadata, the run's config, the run folder)."""
    from islkeras.models.savedmodel import find_savedmodel, read_meta
    from islkeras.training.run import CONFIG_FILE, run_config_of

    sm = find_savedmodel(run_dir)
    meta = read_meta(sm)
    cfg = run_config_of(run_dir) or run_config_of(sm)
    if cfg is None:
        raise UserError(f"{run_dir}: no {CONFIG_FILE} beside the SavedModel; export the run folder (its data "
                        "gives the package's test tensors)")
    return sm, meta, cfg, (run_dir if (run_dir / CONFIG_FILE).is_file() else sm.parent)


def export(run_dir: Union[str, Path], out: Union[str, Path], name: Optional[str] = None,
           version: Optional[int] = None, overwrite: bool = False) -> tuple[Path, str]:
    """Write the BioImage Model Zoo package of ``run_dir`` to ``out`` (``.zip``); returns (path, message).

    ``name`` defaults to "<config name> (<inputs> to <targets>)"; ``version`` N becomes "N.0.0" (default 1).
    Nothing is left at ``out`` on failure: the package is built in a temporary folder beside it, zipped under
    a temporary name, then renamed.
    """
    from islkeras.export import bioimageio_files as F
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.models.unet import MULTIPLE
    from islkeras.training.run import read_summary

    spec = _spec()
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix.lower() != ".zip":
        raise UserError(f"--out {out}: a BioImage Model Zoo package is a .zip file (e.g. --out model.zip)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the package file to write (e.g. {out / 'model.zip'})")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    sm, meta, cfg, run = _run_parts(run_dir)
    name = name or default_name(cfg, meta)
    if not NAME_RE.match(name):
        raise UserError(f"--name {name!r}: 5 to 128 letters, digits, spaces and _ + - ( )")
    multiple = int(meta.get("multiple", MULTIPLE))
    sample = F.sample_crop(cfg, meta, multiple)
    model = ExportedModel(sm)
    if len(sample["input_names"]) != model.n_inputs:
        raise UserError(f"{sm}: the network takes {model.n_inputs} input planes, the run's data has "
                        f"{len(sample['input_names'])} ({', '.join(sample['input_names'])})")
    if len(sample["target_names"]) != model.n_outputs:
        sample["target_names"] = [f"{meta['targets'][0]}_{i}" for i in range(model.n_outputs)]
    pred = model.predict_raw(sample["input"][None])

    import tensorflow as tf

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp_zip = work.with_name(work.name + ".zip")
    try:
        F.write_files(work, FILES, (INPUT_ID, OUTPUT_ID), model, sample, pred, meta, run / "config.json")
        rdf = build_rdf(name=name, version=f"{1 if version is None else version}.0.0", meta=meta, cfg=cfg,
                        sample=sample, author=author(), tf_version=tf.__version__, multiple=multiple,
                        dataset=Path(cfg.data.root).name if Path(cfg.data.root).name in DATASETS else None)
        (work / FILES["readme"]).write_text(F.readme(rdf, meta, cfg, sample, run, read_summary(run)), "utf-8")
        descr = spec.build_description(rdf, context=spec.ValidationContext(root=work, perform_io_checks=True))
        if isinstance(descr, spec.InvalidDescr):
            raise UserError(f"{run_dir}: the package is not valid bioimage.io format {FORMAT_VERSION}: "
                            f"{_invalid(descr)}")
        spec.save_bioimageio_package(descr, output_path=tmp_zip)
        os.replace(tmp_zip, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        tmp_zip.unlink(missing_ok=True)
    return out, message(out, name, tf.__version__)


def check_command(out: Union[str, Path]) -> str:
    """The command that tests the package: bioimageio.core runs TensorFlow with Keras 3, so without
    TF_USE_LEGACY_KERAS (which islkeras sets for itself)."""
    return f"env -u TF_USE_LEGACY_KERAS bioimageio test {shlex.quote(str(Path(out).resolve()))}"


def message(out: Path, name: str, tf_version: str) -> str:
    return "\n".join([
        f"exported {name} -> {Path(out).resolve()} (bioimage.io model format {FORMAT_VERSION}, "
        f"tensorflow_saved_model_bundle, TensorFlow {tf_version})",
        "Check it: bioimageio.core reproduces the test output from the test input (needs the "
        f"'{EXTRA}' extra; it unpacks the weights into ./bioimageio_unzipped_tf_weights):",
        "  " + check_command(out),
        "Then open it in Fiji with deepImageJ (install model, from a local file), or upload it at "
        "bioimage.io.",
    ])

