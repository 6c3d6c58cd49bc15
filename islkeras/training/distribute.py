"""Distribution and precision for training: one place that turns ``training.*`` into TensorFlow's own
machinery (``tf.distribute`` strategies, ``tf.data`` auto-sharding, Keras mixed-precision policies).

Strategy (``training.strategy``, see ``get_strategy``)
    * ``default``: TensorFlow's default strategy (one device: the first GPU if any, else the CPU).
    * ``mirrored``: ``tf.distribute.MirroredStrategy`` over ``training.devices`` (default: every local
      GPU). CPU devices may be named too (``["/cpu:0", "/cpu:1"]``): when the process has fewer logical
      CPUs than named, the physical CPU is split into that many logical devices with
      ``tf.config.set_logical_device_configuration`` -- possible only before TensorFlow's runtime is
      initialised (``configure_logical_cpus``; tests and ``benchmarks/scale.py`` use it).
    * ``multiworker``: ``tf.distribute.MultiWorkerMirroredStrategy`` with the cluster from ``TF_CONFIG``
      (validated first: a missing or malformed ``TF_CONFIG`` is a ``ConfigError`` naming what is wrong).
    * ``auto``: ``multiworker`` when ``TF_CONFIG`` describes a cluster of more than one task, ``mirrored``
      when more than one GPU is visible, else ``default``.

    A process creates each strategy once (``get_strategy`` caches it): a multi-worker strategy can only
    be set up once per process, and several trainings in one process (the transfer experiment) share it.

Model, optimizers and metrics are created inside ``strategy.scope()``; Keras ``fit`` distributes the
datasets. ``distribute_dataset`` sets their auto-shard policy: ``FILE`` when the split has at least as
many TFRecord shards as there are workers, else ``DATA``. ``training.batch_size`` is the *global* batch
(split over all replicas); the custom train steps reduce per-example losses with
``tf.nn.compute_average_loss(global_batch_size=...)`` and compiled models with Keras' own
global-batch reduction, so a step does not depend on the number of replicas.

Chief and workers (``is_chief``, ``agree_run_dir``, ``worker_dir``, ``sync_callbacks``): see
``islkeras.training.cluster``.

Precision (``training.mixed_precision``, see ``precision``)
    ``null`` (float32), ``mixed_float16`` (GPUs) or ``mixed_bfloat16`` (TPUs, recent CPUs with AVX512-BF16
    or AMX). Networks are built under the Keras global policy; their output layers are float32 (the plain
    U-Net's final activation, segmentation-models' wrapped by ``models.unet``, PatchGAN logits), losses are
    computed in float32, and with ``mixed_float16`` every optimizer is a ``LossScaleOptimizer``
    (``maybe_loss_scale``; ``compile`` does it for the generator's, ``Pix2Pix.compile`` for the
    discriminator's). ``training.jit_compile`` passes ``jit_compile`` to ``compile`` (XLA) -- with one replica only
    (``for_strategy``).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional, Sequence

from islkeras.errors import ConfigError, UserError
from islkeras.training.cluster import cluster_size, is_multi_worker, num_workers, parse_tf_config, worker_index

STRATEGIES = ("default", "mirrored", "multiworker", "auto")
PRECISIONS = (None, "mixed_float16", "mixed_bfloat16")
_CACHE: dict = {}


# ------------------------------------------------------------------------------------------ devices
def configure_logical_cpus(n: int, exact: bool = False) -> list[str]:
    """Split the physical CPU into ``n`` logical devices (``/cpu:0`` ... ``/cpu:n-1``); returns their names.

    Must run before TensorFlow's runtime is initialised (before the first op); afterwards it succeeds only
    when the CPU is already split into at least ``n`` devices (exactly ``n`` with ``exact``), else raises
    UserError.
    """
    import tensorflow as tf

    n = int(n)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    have = len(current) if current else 1
    if have < n or (have > n and exact):
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError:
            raise UserError(
                f"cannot split the CPU into {n} logical devices: TensorFlow's runtime is already initialised "
                f"with {have}; set the devices before any TensorFlow op runs (e.g. create the strategy first)"
            ) from None
    return [f"/cpu:{i}" for i in range(n)]


def _device_index(name: str, kind: str) -> Optional[int]:
    s = name.strip().lower()
    for prefix in ("/job:localhost/replica:0/task:0/device:", "/device:", "/"):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    if s.startswith(kind + ":"):
        try:
            return int(s.split(":", 1)[1])
        except ValueError:
            return None
    return None


def _check_devices(devices: Sequence[str]) -> list[str]:
    """Make named CPU devices exist (logical CPUs) and check every name against the local devices."""
    import tensorflow as tf

    devices = list(devices)
    if len(set(d.lower() for d in devices)) != len(devices):
        raise ConfigError(f"training.devices lists a device twice: {devices}")
    cpus = [i for i in (_device_index(d, "cpu") for d in devices) if i is not None]
    if cpus and max(cpus) > 0:
        configure_logical_cpus(max(cpus) + 1)
    local = {d.name.lower() for d in tf.config.list_logical_devices()}
    short = {n.split("device:")[-1] for n in local}
    for d in devices:
        key = d.strip().lower()
        if key not in local and key.lstrip("/").replace("device:", "") not in short:
            avail = ", ".join(sorted(n.split("device:")[-1] for n in local))
            raise ConfigError(f"training.devices: no local device {d!r} (available: {avail})")
    return devices


# ----------------------------------------------------------------------------------------- strategy
def resolve_kind(training_cfg) -> str:
    """``training.strategy`` with ``auto`` resolved (see module doc)."""
    import tensorflow as tf

    kind = training_cfg.strategy
    if kind not in STRATEGIES:
        raise ConfigError(f"training.strategy {kind!r}: expected {', '.join(STRATEGIES)}")
    if kind != "auto":
        return kind
    try:
        tc = parse_tf_config(required=False)
    except ConfigError:
        tc = None
    if cluster_size(tc) > 1:
        return "multiworker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def get_strategy(training_cfg):
    """The ``tf.distribute`` strategy of ``training.strategy`` / ``training.devices`` (module doc).

    Call it before anything else touches TensorFlow's runtime: logical CPU devices and the multi-worker
    collectives can only be configured before it is initialised.
    """
    import tensorflow as tf

    kind = resolve_kind(training_cfg)
    devices = list(training_cfg.devices) if training_cfg.devices else None
    if devices is not None and kind != "mirrored":
        raise ConfigError(f"training.devices is only used with strategy \"mirrored\" (strategy is {kind!r})")
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if devices is not None:
            devices = _check_devices(devices)
        key = ("mirrored", tuple(devices or ()))
        if key not in _CACHE:
            _CACHE[key] = tf.distribute.MirroredStrategy(devices=devices)
        return _CACHE[key]
    # multiworker
    tc = parse_tf_config(required=True)
    key = ("multiworker", json.dumps(tc, sort_keys=True))
    if key not in _CACHE:
        if any(k[0] == "multiworker" for k in _CACHE):
            raise UserError("a different multi-worker cluster was already set up in this process (TF_CONFIG "
                            "changed); start a new process")
        _CACHE[key] = tf.distribute.MultiWorkerMirroredStrategy()
    return _CACHE[key]


def describe(strategy) -> str:
    """One line: strategy class, replicas and workers (for the log)."""
    name = type(strategy).__name__
    if name == "_DefaultDistributionStrategy":
        return "default strategy (1 replica)"
    devs = getattr(strategy.extended, "worker_devices", ())
    w = num_workers(strategy)
    return (f"{name}: {strategy.num_replicas_in_sync} replica(s)"
            + (f" on {w} workers" if w > 1 else "") + (f" ({', '.join(devs)})" if devs and w == 1 else ""))


# -------------------------------------------------------------------------------------------- data
def shard_policy(n_shards: int, n_workers: int):
    """``FILE`` when every worker gets at least one TFRecord shard, else ``DATA``."""
    import tensorflow as tf

    P = tf.data.experimental.AutoShardPolicy
    return P.FILE if n_shards >= n_workers else P.DATA


def cpu_replicas(strategy) -> bool:
    """True when the strategy's replicas are CPU devices (logical CPUs, or CPU-only workers)."""
    devs = getattr(strategy.extended, "worker_devices", ()) or ()
    return bool(devs) and all("CPU" in d.upper() for d in devs)


def _onednn_enabled() -> bool:
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pragma: no cover - other builds
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"


def empty_batches_unsafe(strategy) -> bool:
    """Whether a replica must never get an empty batch: TensorFlow's oneDNN CPU convolutions return a
    wrongly shaped result for an empty batch (TF 2.21), which the last, partial batch of an evaluation
    set gives some replicas when it is split over several CPU replicas."""
    return strategy.num_replicas_in_sync > 1 and cpu_replicas(strategy) and _onednn_enabled()


def for_strategy(cfg, strategy, warn=None):
    """``cfg`` as it can run under ``strategy`` (a changed copy, or ``cfg`` itself), with a warning for every
    change: ``training.jit_compile`` is turned off with more than one replica -- Keras' XLA-compiled train
    step cannot use variables mirrored on other devices (TensorFlow's XLA "tf.Variable on a different
    device" limitation; Keras 3 disables XLA under tf.distribute for the same reason)."""
    if cfg.training.jit_compile and strategy.num_replicas_in_sync > 1:
        import copy

        (warn or _warn)(f"training.jit_compile is turned off: XLA compilation does not work with the "
                        f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__}")
        cfg = copy.deepcopy(cfg)
        cfg.training.jit_compile = False
    return cfg


def _warn(msg: str) -> None:
    import click

    click.echo(f"islkeras: warning: {msg}", err=True)


def check_batch_size(batch_size: int, strategy) -> None:
    """The global batch must split evenly over the replicas (every replica gets the same share)."""
    n = strategy.num_replicas_in_sync
    if int(batch_size) % n:
        raise ConfigError(f"training.batch_size {batch_size} (the global batch) must be a multiple of the "
                          f"{n} replicas of the strategy ({describe(strategy)})")


def file_shard_fields(manifest: dict, split: str, strategy, fields: Optional[Sequence[str]] = None
                      ) -> Optional[list[str]]:
    """Sharding by file for the *training* pipeline, done here: the records (of ``fields``, default the
    whole split) in this worker's TFRecord shards -- shards ``i, i + W, ...`` of the shards holding them --
    when there are at least as many such shards as workers; ``None`` otherwise (single worker, or too few
    shards: then ``DATA`` sharding). Pass the result as ``make_dataset(fields=...)`` and
    ``sharded_by_file=True`` to ``distribute_dataset``.

    TensorFlow's own ``FILE`` auto-shard policy cannot shard the training pipeline: its random crops are
    keyed by a ``Dataset.enumerate`` counter, a source that is not a file."""
    if not is_multi_worker(strategy):
        return None
    wanted = set(fields) if fields is not None else {n for n, f in manifest["fields"].items() if f["split"] == split}
    shards = [s for s in manifest["shards"] if s["split"] == split and wanted & set(s.get("records", []))]
    w = num_workers(strategy)
    if len(shards) < w:
        return None
    mine = shards[worker_index(strategy)::w]
    return sorted(wanted & {r for s in mine for r in s["records"]})


def distribute_dataset(ds, strategy, n_shards: int, training: bool = True, sharded_by_file: bool = False):
    """``ds`` prepared for ``strategy``; Keras ``fit`` then distributes it (every step takes one *global*
    batch, split over the replicas).

    * Multi-worker: auto-shard policy ``FILE`` when there are at least as many TFRecord shards as workers,
      else ``DATA`` (``shard_policy``); ``OFF`` when the dataset was already sharded by file
      (``file_shard_fields``). Single-worker strategies need no sharding (``OFF``).
    * Evaluation sets on several CPU replicas (``empty_batches_unsafe``): every batch is cut to a multiple
      of the number of replicas (only the last, partial batch changes: at most ``replicas - 1`` crops of a
      pass are left out) and sharded by ``DATA`` (by ``FILE`` workers could run out of batches at different
      steps), so no replica is ever given an empty batch.
    """
    import tensorflow as tf

    P = tf.data.experimental.AutoShardPolicy
    opts = tf.data.Options()
    policy = P.OFF
    if is_multi_worker(strategy) and not sharded_by_file:
        policy = shard_policy(n_shards, num_workers(strategy))
    if not training and empty_batches_unsafe(strategy):
        n = strategy.num_replicas_in_sync

        def cut(*el):
            keep = tf.shape(tf.nest.flatten(el)[0])[0] // n * n
            return tf.nest.map_structure(lambda a: a[:keep], el if len(el) > 1 else el[0])

        ds = ds.map(cut).filter(lambda *el: tf.shape(tf.nest.flatten(el)[0])[0] > 0)
        if policy != P.OFF:
            policy = P.DATA
    opts.experimental_distribute.auto_shard_policy = policy
    return ds.with_options(opts)


# ------------------------------------------------------------------------------------------ precision
@contextlib.contextmanager
def precision(policy: Optional[str]) -> Iterator[None]:
    """Keras global dtype policy ``policy`` inside the block (``None``: unchanged, float32)."""
    import tensorflow as tf

    if policy not in PRECISIONS:
        raise ConfigError(f"training.mixed_precision {policy!r}: expected null, mixed_float16 or mixed_bfloat16")
    if not policy:
        yield
        return
    old = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(old)


def needs_loss_scaling(policy=None) -> bool:
    import tensorflow as tf

    name = policy if isinstance(policy, str) else (policy or tf.keras.mixed_precision.global_policy()).name
    return name == "mixed_float16"


def maybe_loss_scale(optimizer, policy=None):
    """``optimizer`` wrapped in a dynamic ``LossScaleOptimizer`` when the policy is ``mixed_float16``
    (float16 gradients underflow without it); unchanged otherwise or when already wrapped."""
    import tensorflow as tf

    lso = tf.keras.mixed_precision.LossScaleOptimizer
    if needs_loss_scaling(policy) and not isinstance(optimizer, lso):
        return lso(optimizer)
    return optimizer

