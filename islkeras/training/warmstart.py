"""Start a network from the weights of a trained islkeras model: ``training.init_from`` (fine-tuning) and the
layer-by-layer copy the segmentation transfer (``islkeras.segmentation.isl_source``) builds on.

``training.init_from`` (CLI ``islkeras fit CONFIG --init-from RUN``) names a run folder or a SavedModel of
``islkeras fit``. Before any data is read for training, :func:`resolve_init_from` checks that the config
builds the same network: the model section (architecture, backbone and decoder filters, or filters and
depth of the plain U-Net) and the input/output channel counts; a mismatch is one line naming both. Then
:func:`init_generator` copies every weight, the head included, into the new generator (BatchNorm moving
statistics too). Normalisation is not taken from the source: the new run derives it from its own records,
as every run does. pix2pix: only the generator is initialised (the discriminator starts fresh).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from islkeras.errors import UserError

KEY = "training.init_from"


# ------------------------------------------------------------------------------------------- layers
def flat_layers(model) -> list:
    """Layers in order with nested models expanded (so a wrapped segmentation-models U-Net pairs up)."""
    import tensorflow as tf

    out = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            out.extend(flat_layers(layer))
        else:
            out.append(layer)
    return out


def weight_layers(model) -> list:
    """Layers that carry weights, in order; the last one is the head (``final_conv``)."""
    return [lay for lay in flat_layers(model) if lay.weights]


def load_generator(savedmodel):
    """An exported generator as a Keras model (the training metrics saved with it are not restored)."""
    import tensorflow as tf

    from islkeras.training.metrics import PCC

    return tf.keras.models.load_model(str(savedmodel), compile=False, custom_objects={"PCC": PCC})


# ------------------------------------------------------------------------------------- the source
@dataclass
class InitSource:
    """A checked ``training.init_from``: the SavedModel, its metadata and (when beside it) its run config."""

    path: str  #: as given
    savedmodel: Path
    meta: dict
    run_cfg: object = None


def describe_model(mc, n_in: int, n_out: int) -> str:
    """``unet_sm/resnet18 (decoder 256-128-64-32-16) with 1 input(s) -> 1 output(s)``."""
    if mc is None:
        return f"? with {n_in} input(s) -> {n_out} output(s)"
    if mc.architecture == "unet_sm":
        arch = f"unet_sm/{mc.backbone} (decoder {'-'.join(str(f) for f in mc.decoder_filters)})"
    else:
        arch = f"unet ({mc.unet_filters} filters, depth {mc.unet_depth})"
    return f"{arch} with {n_in} input(s) -> {n_out} output(s)"


def _model_key(mc) -> tuple:
    if mc.architecture == "unet_sm":
        return ("unet_sm", mc.backbone, tuple(mc.decoder_filters))
    return ("unet", mc.unet_filters, mc.unet_depth)


def resolve_init_from(cfg, n_in: int, n_out: int) -> Optional[InitSource]:
    """Check ``cfg.training.init_from`` against the network ``cfg`` builds; None when it is not set.

    UserError (one line, naming the source and both networks) when the path is not an islkeras ISL model,
    or its architecture or channel counts differ from the config's.
    """
    path = cfg.training.init_from
    if path is None:
        return None
    from islkeras.models.savedmodel import find_savedmodel, read_meta
    from islkeras.training.run import run_config_of

    try:
        sm = find_savedmodel(path)
        meta = read_meta(sm)
    except UserError as e:
        raise UserError(f"{KEY}: {e}") from None
    if meta.get("kind") != "isl":
        raise UserError(f"{KEY} {sm}: a {meta.get('kind')!r} model, not an ISL model trained by `islkeras fit`")
    try:
        run_cfg = run_config_of(sm)
    except UserError:
        run_cfg = None
    src_mc = run_cfg.model if run_cfg is not None else None
    src_in, src_out = int(meta.get("n_inputs", -1)), int(meta.get("n_outputs", -1))
    same_arch = (_model_key(src_mc) == _model_key(cfg.model) if src_mc is not None
                 else meta.get("architecture") == cfg.model.architecture
                 and (cfg.model.architecture != "unet_sm" or meta.get("backbone") == cfg.model.backbone))
    if not same_arch or (src_in, src_out) != (int(n_in), int(n_out)):
        if src_mc is None:
            mine = describe_model(cfg.model, n_in, n_out)
            theirs = f"{meta.get('architecture')}/{meta.get('backbone')} with {src_in} input(s) -> {src_out} output(s)"
        else:
            mine, theirs = describe_model(cfg.model, n_in, n_out), describe_model(src_mc, src_in, src_out)
        raise UserError(f"{KEY} {sm}: model {theirs}, the config {cfg.source} builds {mine}; "
                        f"set the model section (and data.inputs/targets) to the source run's")
    return InitSource(str(path), sm, meta, run_cfg)


def copy_weights(dst_model, src_model, skip_head: bool = False, where: str = KEY) -> dict:
    """Copy ``src_model``'s weights into ``dst_model`` layer by layer; ``skip_head``: not the last one.

    The head may differ in shape (it is then skipped); any other difference is a UserError naming the first
    mismatching layer. Returns ``{"copied": [names], "skipped": [names]}``.
    """
    src, dst = weight_layers(src_model), weight_layers(dst_model)
    if len(src) != len(dst):
        raise UserError(f"{where}: the source model has {len(src)} layers with weights, the new model "
                        f"{len(dst)}: not the same architecture")
    copied, skipped = [], []
    for i, (a, b) in enumerate(zip(src, dst)):
        wa, wb = a.get_weights(), b.get_weights()
        shapes_a, shapes_b = [w.shape for w in wa], [w.shape for w in wb]
        head = i == len(src) - 1
        if type(a).__name__ != type(b).__name__ or (shapes_a != shapes_b and not head):
            raise UserError(f"{where}: layer {i} differs between the source model ({a.name}: {type(a).__name__} "
                            f"{shapes_a}) and the new model ({b.name}: {type(b).__name__} {shapes_b})")
        if head and (skip_head or shapes_a != shapes_b):
            skipped.append(b.name)
            continue
        b.set_weights(wa)
        copied.append(b.name)
    return {"copied": copied, "skipped": skipped}


def init_generator(generator, source: InitSource) -> dict:
    """Every weight of ``source`` (head included) into ``generator``; the copy report."""
    try:
        src_model = load_generator(source.savedmodel)
    except Exception as e:  # a corrupt or non-Keras SavedModel
        raise UserError(f"{KEY} {source.savedmodel}: could not be loaded as a Keras model: "
                        f"{type(e).__name__}: {str(e)[:200]}") from None
    info = copy_weights(generator, src_model)
    del src_model
    if info["skipped"]:
        raise UserError(f"{KEY} {source.savedmodel}: the head {info['skipped'][0]} differs in shape from the "
                        f"new model's; init_from copies every weight, so the outputs must match")
    return info
