"""The ISL model a transfer starts from: checking it (:func:`resolve_isl`, :func:`check_compatible`), taking
its normalisation and architecture (:func:`adopt_isl_settings`), and the segmentation network built from it
with the ISL weights copied layer by layer (:func:`build_segmentation_model`; see
``islkeras.segmentation.transfer``'s module doc)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from islkeras.errors import UserError

NONE_WORDS = ("none", "null", "scratch", "")


# ------------------------------------------------------------------------------------- the ISL source
@dataclass
class IslSource:
    """An ISL SavedModel checked for transfer: its folder, metadata and (when found) its run config."""

    savedmodel: Path
    meta: dict
    run_cfg: object = None  #: ExperimentConfig of the ISL run, or None (a SavedModel without its run folder)
    _exported: object = field(default=None, repr=False, compare=False)

    def exported(self):
        """The SavedModel as an ``islkeras.models.savedmodel.ExportedModel``, loaded on first use only."""
        if self._exported is None:
            from islkeras.models.savedmodel import ExportedModel

            self._exported = ExportedModel(self.savedmodel)
        return self._exported


def resolve_isl(path) -> Optional[IslSource]:
    """Check that ``path`` (run folder or SavedModel) is an islkeras ISL model; ``None`` for from-scratch.

    Raises UserError naming the path when it is missing, holds no ``saved_model.pb``, has no islkeras
    metadata or is not an ISL model (e.g. a segmentation model).
    """
    if path is None or str(path).strip().lower() in NONE_WORDS:
        return None
    from islkeras.models.savedmodel import META_FILE, find_savedmodel, read_meta

    p = Path(path)
    if not p.exists():
        raise UserError(f"transfer.isl_run: {p} does not exist (give an ISL run folder or its savedmodel/, "
                        f"or null to train from scratch)")
    try:
        sm = find_savedmodel(p)
    except UserError as e:
        raise UserError(f"transfer.isl_run: {e}") from None
    if not (sm / "assets" / META_FILE).is_file():
        raise UserError(f"transfer.isl_run: {sm} is a SavedModel but not an islkeras export (no assets/{META_FILE}); "
                        f"export it with `islkeras fit`")
    try:
        meta = read_meta(sm)
    except (UserError, ValueError) as e:
        raise UserError(f"transfer.isl_run: {e}") from None
    if meta.get("kind") != "isl":
        raise UserError(f"transfer.isl_run: {sm} holds a {meta.get('kind')!r} model, not an ISL model "
                        f"(kind 'isl', trained by `islkeras fit`)")
    run_cfg = None
    if (sm.parent / "config.json").is_file() or (sm / "config.json").is_file():
        from islkeras.training.run import load_run_config

        try:
            run_cfg = load_run_config(sm if (sm / "config.json").is_file() else sm.parent)
        except UserError:
            run_cfg = None
    return IslSource(sm, meta, run_cfg)


def _isl_model_cfg(cfg, isl: IslSource):
    """The model section for a transfer from ``isl``: the ISL run's (falls back to cfg.model if unknown)."""
    if isl.run_cfg is not None:
        return copy.deepcopy(isl.run_cfg.model)
    arch = isl.meta.get("architecture")
    mc = copy.deepcopy(cfg.model)
    if arch is not None and arch != mc.architecture:
        raise UserError(f"transfer.isl_run: {isl.savedmodel} is a {arch!r} model without its run config.json; "
                        f"set model.architecture (and the rest of the model section) to the ISL run's")
    if arch == "unet_sm" and isl.meta.get("backbone"):
        mc.backbone = isl.meta["backbone"]
    return mc


def check_compatible(cfg, isl: IslSource, n_inputs: int) -> None:
    """The transfer data's inputs must be what the ISL model was trained on."""
    meta = isl.meta
    if list(meta.get("inputs", [])) != list(cfg.data.inputs):
        raise UserError(f"transfer.isl_run: the ISL model takes inputs {meta.get('inputs')}, the config's "
                        f"data.inputs are {cfg.data.inputs}")
    if int(meta.get("n_inputs", n_inputs)) != int(n_inputs):
        raise UserError(f"transfer.isl_run: the ISL model takes {meta.get('n_inputs')} input plane(s), the "
                        f"records' inputs {cfg.data.inputs} have {n_inputs}")


def adopt_isl_settings(cfg, isl: IslSource) -> list[str]:
    """Set cfg's normalisation and model section to the ISL model's; returns notes on what changed."""
    notes = []
    norm = isl.meta.get("normalization", {})
    method, pct = norm.get("method"), norm.get("percentiles")
    if method and method != cfg.pipeline.normalization:
        notes.append(f"pipeline.normalization {cfg.pipeline.normalization!r} -> {method!r} (the ISL model's)")
        cfg.pipeline.normalization = method
    if pct and list(pct) != list(cfg.pipeline.percentiles):
        cfg.pipeline.percentiles = [float(v) for v in pct]
    mc = _isl_model_cfg(cfg, isl)
    if mc != cfg.model:
        notes.append(f"model section -> the ISL run's ({mc.architecture}"
                     f"{'/' + mc.backbone if mc.architecture == 'unet_sm' else ''})")
        cfg.model = mc
    return notes


# ------------------------------------------------------------------------------------------ the model
# one implementation of the layer-by-layer copy and the loading: islkeras.training.warmstart (init_from uses it)
from islkeras.training.warmstart import flat_layers as _flat_layers  # noqa: E402,F401
from islkeras.training.warmstart import load_generator as load_isl_keras  # noqa: E402
from islkeras.training.warmstart import weight_layers  # noqa: E402,F401


def copy_isl_weights(seg_model, isl_model, init: str = "all_but_head") -> dict:
    """Copy ``isl_model``'s weights into ``seg_model`` layer by layer (see the module doc of
    ``islkeras.segmentation.transfer``); the head only with ``init`` all/all_calibrated and equal shapes.

    Returns ``{"copied": [names], "skipped": [names]}``; UserError when the architectures differ.
    """
    from islkeras.training.warmstart import copy_weights

    return copy_weights(seg_model, isl_model, skip_head=init not in ("all", "all_calibrated"), where="transfer")


def build_segmentation_model(cfg, isl_savedmodel=None, n_inputs: Optional[int] = None, n_outputs: int = 1,
                             init: Optional[str] = None):
    """The segmentation network (sigmoid output) -- from scratch, or initialised from an ISL SavedModel.

    ``isl_savedmodel``: ISL run folder / SavedModel path (or an ``IslSource``), or None for from-scratch
    (``cfg.model``). ``init``: ``all_but_head`` / ``all`` (default ``cfg.transfer.init``). ``n_inputs``
    defaults to the ISL model's input planes, else ``len(cfg.data.inputs)``. Returns the Keras model;
    ``model.transfer_info`` tells what was copied.
    """
    from islkeras.models.unet import build_generator

    init = init or (cfg.transfer.init if cfg.transfer is not None else "all_but_head")
    isl = isl_savedmodel if isinstance(isl_savedmodel, IslSource) else resolve_isl(isl_savedmodel)
    if isl is None:
        model = build_generator(cfg.model, int(n_inputs or len(cfg.data.inputs)), n_outputs, activation="sigmoid")
        model.transfer_info = {"isl_run": None, "init": "scratch", "copied": [], "skipped": []}
        return model
    n_in = int(n_inputs or isl.meta.get("n_inputs") or len(cfg.data.inputs))
    if int(isl.meta.get("n_inputs", n_in)) != n_in:
        raise UserError(f"transfer.isl_run: the ISL model takes {isl.meta.get('n_inputs')} input plane(s), "
                        f"the data has {n_in}")
    model_cfg = _isl_model_cfg(cfg, isl)
    model = build_generator(model_cfg, n_in, n_outputs, activation="sigmoid")
    try:
        isl_model = load_isl_keras(isl.savedmodel)
    except Exception as e:  # a corrupt or non-Keras SavedModel
        raise UserError(f"transfer.isl_run: {isl.savedmodel} could not be loaded as a Keras model: "
                        f"{type(e).__name__}: {str(e)[:200]}") from None
    info = copy_isl_weights(model, isl_model, init)
    model.transfer_info = {"isl_run": str(isl.savedmodel), "init": init, **info}
    del isl_model
    return model
