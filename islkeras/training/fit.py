"""``islkeras fit CONFIG``: records -> tf.data -> model -> callbacks -> ``model.fit`` -> run folder.

Training modes (``loss.kind``):

* ``l1`` / ``l2``: the generator compiled with the pixel loss -- standard Keras ``fit``.
* ``pix2pix``: ``islkeras.training.pix2pix.Pix2Pix`` (PatchGAN discriminator, two optimizers).
* ``perceptual``: ``islkeras.training.perceptual.PerceptualModel`` (frozen VGG19 features).

Validation PCC (per image, then mean/std: ``val_pcc``, ``val_pcc_std``) is computed every epoch; the
best generator (``training.early_stopping.monitor``, checked against what the run logs) is exported to
``<run>/savedmodel`` with a ``serving_default`` signature that takes raw images. Records without val fields
are an error unless ``training.validation`` is false (the best epoch is then chosen on training metrics).
``--resume`` continues an interrupted run from its last finished epoch; a run killed after training (during
the export) is exported without training again. The budget is ``training.epochs * steps_per_epoch`` steps;
``summary.json`` records the steps run (``training.max_minutes`` is a safety cap, reported when it bites).
``training.init_from`` (``--init-from RUN``) fine-tunes: every weight of that run's model is copied in before
training, after checking the architecture and channel counts (``islkeras.training.warmstart``).
TensorFlow is imported inside the functions so ``islkeras --help`` stays fast.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import click

from islkeras.errors import ConfigError, DataError, UserError

LATEST = "__latest__"
BN_RECALIBRATION_STEPS = 20  #: training batches that re-estimate BatchNorm statistics before validation


# ----------------------------------------------------------------------------------------- strategy
# one implementation of strategies and precision: islkeras.training.distribute (re-exported for transfer.py)
from islkeras.training.distribute import get_strategy  # noqa: E402,F401
from islkeras.training.distribute import precision as _precision  # noqa: E402,F401


# ------------------------------------------------------------------------------------------- models
def _adam(tf, lr: float, beta_1: float = 0.9):
    return tf.keras.optimizers.Adam(learning_rate=lr, beta_1=beta_1)


def build_training_model(cfg, n_inputs: int, n_outputs: int):
    """``(model, generator)`` compiled for ``cfg.loss.kind``. Call inside ``strategy.scope()``.

    Building every network here (VGG19 and ImageNet encoders included) makes bad weights settings fail
    before any data is read for training.
    """
    import tensorflow as tf

    from islkeras.training.metrics import pcc_metrics
    from islkeras.models.unet import build_generator

    t, lc = cfg.training, cfg.loss
    generator = build_generator(cfg.model, n_inputs, n_outputs, activation="linear")
    kind = lc.kind
    if kind in ("l1", "l2"):
        from islkeras.training.losses import pixel_loss

        model = generator
        model.compile(optimizer=_adam(tf, t.learning_rate), loss=pixel_loss(kind), metrics=pcc_metrics(),
                      jit_compile=t.jit_compile)
    elif kind == "pix2pix":
        from islkeras.models.patchgan import build_patchgan
        from islkeras.training.pix2pix import Pix2Pix

        disc = build_patchgan(n_inputs, n_outputs, filters=lc.patchgan_filters)
        model = Pix2Pix(generator, disc, l1_lambda=lc.l1_lambda, global_batch_size=t.batch_size, name="pix2pix")
        model.compile(g_optimizer=_adam(tf, t.learning_rate, 0.5),
                      d_optimizer=_adam(tf, lc.discriminator_lr or t.learning_rate, 0.5), jit_compile=t.jit_compile)
    elif kind == "perceptual":
        from islkeras.training.losses import PerceptualLoss
        from islkeras.models.vgg import VGGFeatures
        from islkeras.training.perceptual import PerceptualModel

        feats = VGGFeatures(lc.vgg_layers, lc.vgg_weights, cfg.pipeline.normalization)
        ploss = PerceptualLoss(feats, content=lc.content_weight, pixel=lc.pixel_weight, tv=lc.tv_weight,
                               style=lc.style_weight, pixel_kind=lc.pixel_loss)
        model = PerceptualModel(generator, ploss, global_batch_size=t.batch_size, name="perceptual")
        model.compile(optimizer=_adam(tf, t.learning_rate), jit_compile=t.jit_compile)
    else:
        raise ConfigError(f"loss.kind {kind!r}: expected l1, l2, pix2pix or perceptual")
    # build now (BackupAndRestore needs built variables and optimizer slots to restore into)
    s = 2 * 32
    model(tf.zeros([1, s, s, n_inputs]), training=False)
    if hasattr(model, "build_optimizers"):
        model.build_optimizers()
        if kind == "pix2pix":
            model.discriminator([tf.zeros([1, s, s, n_inputs]), tf.zeros([1, s, s, n_outputs])], training=False)
    else:
        model.optimizer.build(model.trainable_variables)
    return model, generator


# ------------------------------------------------------------------------------------------ helpers
def export_meta(cfg, manifest) -> dict:
    """Metadata stored with the SavedModel: normalisation from the records plus run identity."""
    from islkeras.data.pipeline import normalization_meta

    nm = normalization_meta(cfg, manifest)
    norm = nm.get("normalization")
    if not isinstance(norm, dict):
        norm = {"method": nm["method"], "percentiles": nm.get("percentiles", list(cfg.pipeline.percentiles)),
                "input_dataset": nm.get("input_dataset")}
    meta = {k: v for k, v in nm.items() if k not in ("method", "percentiles", "input_dataset")}
    meta.update({
        "kind": "isl", "normalization": norm, "architecture": cfg.model.architecture,
        "backbone": cfg.model.backbone if cfg.model.architecture == "unet_sm" else None,
        "config_hash": cfg.hash(), "loss": cfg.loss.kind, "name": cfg.name,
    })
    meta.setdefault("inputs", list(cfg.data.inputs))
    meta.setdefault("targets", list(cfg.data.targets))
    return meta


def _channels(manifest, names, what):
    chans = manifest["channels"]
    for c in names:
        if c not in chans:
            raise DataError(f"{what} channel {c!r} is not in the records (channels: {', '.join(chans)}); "
                            f"add it to data.channels and re-run `islkeras convert`")
    return int(sum(int(chans[c]["planes"]) for c in names))


def _check_data(cfg) -> None:
    root = Path(cfg.data.root)
    manifest = Path(cfg.data.records) / "manifest.json"
    if not root.is_dir() and not manifest.is_file():
        raise DataError(f"data.root: no such folder {root} (from {cfg.source}); point data.root at the folder "
                        f"holding your field folders, or pass --data-root")


def logged_metrics(cfg) -> list[str]:
    """The training metrics ``islkeras fit`` logs for ``cfg.loss.kind`` (``val_`` + each on validation)."""
    kind = cfg.loss.kind
    if kind == "pix2pix":
        from islkeras.training.pix2pix import Pix2Pix

        losses = list(Pix2Pix.LOSS_NAMES)
    elif kind == "perceptual":
        from islkeras.training.perceptual import PerceptualModel

        losses = list(PerceptualModel.loss_names(cfg.loss.style_weight))
    else:
        losses = ["loss"]
    return losses + ["pcc", "pcc_std"]


def check_monitor(cfg, monitor: str, logged, has_val: bool) -> str:
    """``monitor`` if the run logs it (``val_<metric>`` or ``<metric>``), without ``val_`` when there is no
    validation; ConfigError naming the key otherwise (a typo would otherwise never improve)."""
    allowed = [f"val_{n}" for n in logged] + list(logged)
    if monitor not in allowed:
        close = difflib.get_close_matches(monitor, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{cfg.source}: training.early_stopping.monitor {monitor!r} is not logged by this run "
                          f"(loss.kind {cfg.loss.kind!r}); use one of {', '.join(allowed)}{hint}")
    return monitor[4:] if not has_val and monitor.startswith("val_") else monitor


def require_validation(cfg, manifest) -> bool:
    """Whether the run validates: the records' val fields, unless ``training.validation`` is false. No val
    fields is a DataError, since the best epoch would silently be chosen on the training data."""
    has_val = manifest.get("counts", {}).get("val", 0) > 0 or any(
        f.get("split") == "val" for f in manifest.get("fields", {}).values())
    if not cfg.training.validation:
        return False
    if not has_val:
        raise DataError(f"the records in {cfg.data.records} have no val fields (data.split of {cfg.source}), so the "
                        f"best epoch would be chosen on training data; add val fields, or set "
                        f"training.validation: false to train without validation")
    return True


def clean_checkpoints(ckpt: Path) -> None:
    """After the export: the BackupAndRestore backup and the weights files go (``state.json`` stays)."""
    shutil.rmtree(ckpt / "backup", ignore_errors=True)
    for p in [*ckpt.glob("best_weights*.h5"), ckpt / "final_weights.h5"]:
        p.unlink(missing_ok=True)


def resolve_run_dir(cfg, run_dir=None, resume=None) -> tuple[Path, bool]:
    """(run folder, resuming?) from ``--run-dir`` / ``--resume [RUN_DIR]``."""
    from islkeras.training import run as R

    if resume == LATEST:
        d = Path(run_dir) if run_dir else R.latest_run_dir(cfg)
    elif resume:
        d = Path(resume)
        if not (d / R.CONFIG_FILE).is_file():
            raise UserError(f"--resume {resume}: not a run folder (no {R.CONFIG_FILE})")
    elif run_dir:
        d = Path(run_dir)
    else:
        return R.new_run_dir(cfg), False
    return d, (d / R.CONFIG_FILE).is_file()


# ---------------------------------------------------------------------------------------------- fit
def fit(cfg, run_dir=None, resume=None, verbose: Optional[int] = None) -> dict:
    """Train ``cfg`` into a run folder; returns the summary (also written to ``summary.json``).

    ``run_dir``: the folder to use (continued if it holds a run); ``resume``: a run folder to continue,
    or ``LATEST`` for the newest run of ``cfg.name``. ``verbose``: Keras progress (default: a progress
    bar on a terminal, one line per epoch otherwise, nothing with ``ISLKERAS_NO_PROGRESS=1``).
    """
    start = time.time()
    from islkeras.training import run as R

    _check_data(cfg)
    run_dir, resuming = resolve_run_dir(cfg, run_dir, resume)
    if resuming and (run_dir / R.SUMMARY_FILE).is_file():
        summary = R.read_summary(run_dir)
        click.echo(f"{run_dir} has already finished: {R.summary_line(summary)}", err=True)
        return summary

    import tensorflow as tf

    from islkeras.data.pipeline import make_dataset
    from islkeras.data.reader import shard_paths
    from islkeras.data.records import ensure_records
    from islkeras.models.savedmodel import export_savedmodel
    from islkeras.training import cluster as C
    from islkeras.training import distribute as D
    from islkeras.training.control import finished_training
    from islkeras.training.warmstart import init_generator, resolve_init_from
    from islkeras.utils import atomic_write_json

    t = cfg.training
    strategy = get_strategy(t)  # first: logical devices and multi-worker collectives need a fresh runtime
    D.check_batch_size(t.batch_size, strategy)
    cfg = D.for_strategy(cfg, strategy)  # what this strategy cannot do is turned off, with a warning (XLA)
    t = cfg.training
    chief = C.is_chief(strategy)
    run_dir = C.agree_run_dir(strategy, run_dir, chief)  # every worker uses the chief's run folder
    save_dir = C.worker_dir(run_dir, chief)  # the run folder, or a worker's temporary folder
    es = t.early_stopping
    logged = logged_metrics(cfg)
    check_monitor(cfg, es.monitor if es else "val_pcc", logged, True)  # a typo fails before any data is read
    manifest = ensure_records(cfg)
    n_in = _channels(manifest, cfg.data.inputs, "input")
    n_out = _channels(manifest, cfg.data.targets, "target")
    has_val = require_validation(cfg, manifest)
    meta = export_meta(cfg, manifest)  # fails now (not after training) if the records lack something
    init_src = resolve_init_from(cfg, n_in, n_out)  # training.init_from: same network? (before any training)

    tf.keras.utils.set_random_seed(t.seed)
    with _precision(t.mixed_precision):
        with strategy.scope():
            model, generator = build_training_model(cfg, n_in, n_out)
            if init_src is not None:  # a resumed run's backup (restored at the start of fit) overrides these
                init_generator(generator, init_src)
        mine = D.file_shard_fields(manifest, "train", strategy)  # multi-worker: this worker's shards' records
        train_ds = D.distribute_dataset(make_dataset(cfg, "train", training=True, manifest=manifest, fields=mine),
                                        strategy, len(shard_paths(cfg, manifest, "train")), sharded_by_file=bool(mine))
        val_ds = D.distribute_dataset(make_dataset(cfg, "val", training=False, manifest=manifest), strategy,
                                      len(shard_paths(cfg, manifest, "val")), training=False) if has_val else None

        if chief:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resuming:
                with contextlib.suppress(UserError):
                    if R.load_run_config(run_dir).hash() != cfg.hash():
                        click.echo(f"islkeras fit: warning: the config differs from the one {run_dir} was started "
                                   f"with; continuing with the new one", err=True)
            R.save_run_config(cfg, run_dir)
        monitor = check_monitor(cfg, es.monitor if es else "val_pcc", logged, val_ds is not None)
        ckpt = run_dir / "ckpt"
        done = finished_training(save_dir / "ckpt" / "state.json")  # killed during the export: export only
        verbose = keras_verbosity(verbose)
        click.echo(f"islkeras fit: {cfg.name} ({cfg.loss.kind}, {cfg.model.architecture}"
                   f"{'/' + cfg.model.backbone if cfg.model.architecture == 'unet_sm' else ''}) -> {run_dir}"
                   f"{' (resuming)' if resuming and not done else ''}{' (training done: exporting)' if done else ''}"
                   f"{'' if strategy is tf.distribute.get_strategy() else ' [' + D.describe(strategy) + ']'}"
                   f"{f' (weights from {init_src.savedmodel})' if init_src is not None else ''}", err=True)
        if done:
            generator.load_weights(str(done[1]))
            outcome = done[0]
        else:
            # BatchNorm re-estimation draws its own iterator of the training stream (same seeds, same crops)
            control, callbacks = training_callbacks(t, generator, run_dir, save_dir, monitor, start, strategy,
                                                    chief, train_ds)
            model.fit(train_ds, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch, validation_data=val_ds,
                      validation_steps=t.validation_steps if val_ds is not None else None,
                      callbacks=callbacks, verbose=verbose)
            outcome = control.summary

    summary = dict(outcome, name=cfg.name, loss=cfg.loss.kind, run_dir=str(run_dir), config_hash=cfg.hash())
    out = export_savedmodel(generator, save_dir / "savedmodel", meta)  # every worker (collective reads)
    C.release_worker_dir(save_dir, chief)
    if chief:
        summary["savedmodel"] = str(out)
        atomic_write_json(run_dir / R.SUMMARY_FILE, summary)
        clean_checkpoints(ckpt)  # finished: the SavedModel holds the result
        click.echo(R.summary_line(summary))
    return summary


def keras_verbosity(verbose: Optional[int]) -> int:
    """Keras' ``verbose``: a progress bar on a terminal, one line per epoch otherwise, none when asked."""
    if verbose is not None:
        return verbose
    return 0 if os.environ.get("ISLKERAS_NO_PROGRESS") == "1" else (1 if sys.stdout.isatty() else 2)


def training_callbacks(t, model, run_dir: Path, save_dir: Path, monitor: str, start: float, strategy, chief: bool,
                       recal_ds):
    """``(control, callbacks)`` shared by ``fit`` and ``transfer``.

    ``TrainingControl`` (early stopping, best weights, LR schedule, time budget, resumable state), the
    strategy's sync callbacks, ``history.csv``, TensorBoard scalars and ``BackupAndRestore``; BatchNorm
    statistics of ``model`` are re-estimated on ``recal_ds`` before each validation, so the best (and
    exported) weights carry statistics that match them.
    """
    import tensorflow as tf

    from islkeras.training import cluster as C
    from islkeras.training import run as R
    from islkeras.training.callbacks import BatchNormRecalibration, EpochTensorBoard, HistoryCSV, TrainingControl

    es = t.early_stopping
    # every worker saves its best weights (reading BatchNorm statistics is collective): workers into
    # their temporary folder, so TrainingControl always writes there (chief=True)
    control = TrainingControl(
        model, save_dir / "ckpt" / "state.json", save_dir / "ckpt" / "best_weights.h5", epochs=t.epochs,
        steps_per_epoch=t.steps_per_epoch, monitor=monitor, mode=es.mode if es else "auto",
        patience=es.patience if es else None, restore_best=es.restore_best_weights if es else False,
        lr_schedule=t.lr_schedule, plateau_patience=max(2, (es.patience if es else 10) // 3),
        max_minutes=t.max_minutes, start_time=start, chief=True)
    callbacks = [
        BatchNormRecalibration(model, recal_ds, steps=BN_RECALIBRATION_STEPS, strategy=strategy),
        control,
        *C.sync_callbacks(strategy, control),
        HistoryCSV(run_dir / R.HISTORY_FILE, chief=chief),
        EpochTensorBoard(run_dir / "tb", chief=chief),
        tf.keras.callbacks.BackupAndRestore(str(run_dir / "ckpt" / "backup")),
    ]
    return control, callbacks


# ---------------------------------------------------------------------------------------------- CLI
@click.command("fit", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--resume", "resume", is_flag=False, flag_value=LATEST, default=None, metavar="[RUN_DIR]",
              help="Continue an interrupted run from its last finished epoch: RUN_DIR, or without a value "
                   "the newest run of this config's name. Put it after CONFIG.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Write the run here instead of <runs_dir>/<name>/<timestamp>; an existing run there is continued.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted path, JSON value), e.g. --set training.epochs=5. Repeatable.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Replace data.root of the config.")
@click.option("--init-from", type=click.Path(), default=None, metavar="RUN|SAVEDMODEL",
              help="Fine-tune: start from every weight (head included) of this run's model (training.init_from); "
                   "the architecture and channel counts must match. Normalisation comes from the new data.")
def fit_command(config, resume, run_dir, sets, data_root, init_from):
    """Train the model of an experiment CONFIG (JSON); writes runs/<name>/<timestamp>/.

    The run folder holds the resolved config, history.csv, TensorBoard logs (tb/), checkpoints (ckpt/),
    the best generator as a SavedModel (savedmodel/) and summary.json. Interrupted runs continue with
    --resume (or by re-running with the same --run-dir). Records are converted first when missing or stale.

    \b
    Examples:
      islkeras fit experiments/aiseg_nuclei_l1.json
      islkeras fit experiments/aiseg_nuclei_l1.json --set training.epochs=5 --set loss.kind=l2
      islkeras fit experiments/hoechst_perceptual.json --data-root /data/my_dic_stacks
      islkeras fit experiments/aiseg_nuclei_l1.json --resume            # newest run of that name
      islkeras fit experiments/aiseg_nuclei_l1.json --init-from runs/aiseg_nuclei_l1/<stamp> \\
          --set training.learning_rate=0.0002 --set training.epochs=2    # fine-tune on new data
    """
    from islkeras.config import load_config, parse_set_option

    overrides = parse_set_option(sets)
    if init_from is not None:
        overrides["training.init_from"] = str(Path(init_from).resolve())
    cfg = load_config(config, overrides=overrides, data_root=data_root)
    fit(cfg, run_dir=run_dir, resume=resume)
