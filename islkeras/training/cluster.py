"""The cluster of a multi-worker training: ``TF_CONFIG`` parsed and checked, which process is the chief,
and what chief and workers agree on (run folder, stopping) through collectives.

Chief and workers (``is_chief``, ``agree_run_dir``, ``worker_dir``, ``sync_callbacks``)
    The chief (``TF_CONFIG`` task type ``chief``, or worker 0 when the cluster has no chief; any process
    of a single-worker strategy) writes the run folder. Every worker must nevertheless *save* what the
    chief saves (reading a ``SyncOnRead`` variable such as BatchNorm's moving statistics is a collective
    operation under multi-worker training), so the other workers save into a temporary folder that is
    removed at the end. ``agree_run_dir`` broadcasts the chief's run folder so every worker reads the same
    checkpoints when resuming (the run folder must then be on a file system all workers share).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from islkeras.errors import ConfigError, UserError

_PATH_BYTES = 4096  #: longest run-folder path agree_run_dir can broadcast (UTF-8 bytes)


# ------------------------------------------------------------------------------------------ TF_CONFIG
def parse_tf_config(raw: Optional[str] = None, required: bool = True) -> Optional[dict]:
    """``TF_CONFIG`` (or ``raw``) parsed and checked: ``{"cluster": {type: [host:port, ...]}, "task":
    {"type": ..., "index": i}}``. ``None`` when unset and not ``required``; ``ConfigError`` otherwise."""
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if not raw or not raw.strip():
        if not required:
            return None
        raise ConfigError(
            'training.strategy "multiworker" needs the TF_CONFIG environment variable, e.g. '
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
            '"index": 0}}\' on the first machine (index 1 on the second); see docs/distributed.md')
    try:
        tc = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e})") from None
    if not isinstance(tc, dict):
        raise ConfigError("TF_CONFIG must be a JSON object with \"cluster\" and \"task\"")
    cluster, task = tc.get("cluster"), tc.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError('TF_CONFIG has no "cluster" object (e.g. {"worker": ["host1:port", "host2:port"]})')
    for kind, addrs in cluster.items():
        if kind not in ("chief", "worker", "evaluator", "ps"):
            raise ConfigError(f"TF_CONFIG cluster: unknown task type {kind!r} (expected chief, worker)")
        if kind == "ps":
            raise ConfigError("TF_CONFIG cluster has \"ps\" tasks: parameter-server training is not supported; "
                              "use chief/worker tasks (MultiWorkerMirroredStrategy)")
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) and ":" in a for a in addrs):
            raise ConfigError(f"TF_CONFIG cluster.{kind} must be a non-empty list of \"host:port\" strings")
    if "chief" in cluster and len(cluster["chief"]) != 1:
        raise ConfigError("TF_CONFIG cluster.chief must list exactly one address")
    if not isinstance(task, dict) or "type" not in task:
        raise ConfigError('TF_CONFIG has no "task" object (e.g. {"type": "worker", "index": 0})')
    ttype = task["type"]
    if ttype not in cluster:
        raise ConfigError(f"TF_CONFIG task.type {ttype!r} is not in the cluster ({', '.join(cluster)})")
    try:
        index = int(task.get("index", 0))
    except (TypeError, ValueError):
        raise ConfigError(f"TF_CONFIG task.index must be an integer, got {task.get('index')!r}") from None
    if not 0 <= index < len(cluster[ttype]):
        raise ConfigError(f"TF_CONFIG task.index {index} is out of range: cluster.{ttype} has "
                          f"{len(cluster[ttype])} address(es)")
    return {"cluster": cluster, "task": {"type": ttype, "index": index}}


def cluster_size(tf_config: Optional[dict]) -> int:
    """Number of training tasks (chief + workers) of a parsed ``TF_CONFIG`` (1 without one)."""
    if not tf_config:
        return 1
    c = tf_config["cluster"]
    return len(c.get("chief", [])) + len(c.get("worker", []))


def _chief_from_tf_config(tf_config: Optional[dict]) -> bool:
    if not tf_config:
        return True
    ttype, index = tf_config["task"]["type"], tf_config["task"]["index"]
    if ttype == "chief":
        return True
    return ttype == "worker" and index == 0 and "chief" not in tf_config["cluster"]


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        getattr(strategy.extended, "_in_multi_worker_mode", lambda: True)()


def is_chief(strategy=None) -> bool:
    """Whether this process writes the run folder: always with a single-worker strategy; under multi-worker
    training the ``TF_CONFIG`` task ``chief``, or ``worker`` 0 when the cluster has no chief.

    Without ``strategy``, ``TF_CONFIG`` alone decides (an unparsable one counts as chief)."""
    if strategy is not None and not is_multi_worker(strategy):
        return True
    try:
        return _chief_from_tf_config(parse_tf_config(required=False))
    except ConfigError:
        return True


def num_workers(strategy) -> int:
    if not is_multi_worker(strategy):
        return 1
    return int(strategy.extended._num_workers)


def worker_index(strategy) -> int:
    """This worker's place in the cluster: 0 for the chief, then the workers in order (0 alone)."""
    if not is_multi_worker(strategy):
        return 0
    tc = parse_tf_config()
    ttype, index = tc["task"]["type"], tc["task"]["index"]
    if ttype == "chief":
        return 0
    return index + (1 if "chief" in tc["cluster"] else 0)


# ---------------------------------------------------------------------------------- chief / workers
def _allreduce_sum(strategy, value):
    """Sum of one tensor per worker (each worker contributes ``value`` once, whatever its replicas)."""
    import tensorflow as tf

    local = max(1, strategy.num_replicas_in_sync // max(1, num_workers(strategy)))
    per_replica = strategy.run(lambda: tf.identity(value))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return total // local if total.dtype.is_integer else total / local


def broadcast_text(strategy, text: Optional[str], chief: bool) -> str:
    """The chief's ``text`` on every worker (a collective: every worker must call it)."""
    import numpy as np
    import tensorflow as tf

    data = np.zeros(_PATH_BYTES, np.int32)
    if chief:
        raw = (text or "").encode("utf-8")
        if len(raw) > _PATH_BYTES:
            raise UserError(f"run folder path longer than {_PATH_BYTES} bytes: {text[:80]}...")
        data[:len(raw)] = np.frombuffer(raw, np.uint8)
    total = _allreduce_sum(strategy, tf.constant(data)).numpy()
    return bytes(total[total > 0].astype(np.uint8).tolist()).decode("utf-8")


def any_worker(strategy, flag: bool) -> bool:
    """True on every worker when ``flag`` is true on at least one (collective under multi-worker)."""
    import tensorflow as tf

    if not is_multi_worker(strategy):
        return bool(flag)
    return int(_allreduce_sum(strategy, tf.constant(int(bool(flag)), tf.int32)).numpy()) > 0


def agree_run_dir(strategy, run_dir: Path, chief: bool) -> Path:
    """Every worker gets the chief's run folder (identity without multi-worker training)."""
    if not is_multi_worker(strategy):
        return Path(run_dir)
    return Path(broadcast_text(strategy, str(run_dir), chief))


def worker_dir(run_dir: Path, chief: bool,
               carry: Sequence[str] = ("ckpt/state.json", "ckpt/best_weights*.h5", "ckpt/final_weights.h5")) -> Path:
    """Where this process saves: the run folder on the chief; on the other workers a new temporary folder
    (removed by ``release_worker_dir``, or at exit) that starts with copies of the chief's ``carry`` files
    (glob patterns) -- the training state of a resumed run -- so early stopping, the best weights and a
    finished training (``islkeras.training.control``) follow the chief's."""
    if chief:
        return Path(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix="islkeras-worker-"))
    atexit.register(shutil.rmtree, str(tmp), True)
    for pattern in carry:
        for src in Path(run_dir).glob(pattern):
            if src.is_file():
                dst = tmp / src.relative_to(run_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    return tmp


def release_worker_dir(path: Path, chief: bool) -> None:
    """Remove a worker's temporary folder (nothing on the chief)."""
    if not chief:
        shutil.rmtree(path, ignore_errors=True)


def sync_callbacks(strategy, control=None) -> list:
    """A Keras callback keeping workers in step where their decisions could differ (multi-worker only):

    * after every epoch, training stops on every worker when it stops on one (``max_minutes`` is measured
      by each worker's own clock, and a worker that stopped alone would leave the others waiting). The
      learning-rate schedules depend on steps and (all-reduced) validation metrics only, so they agree.

    Put it right after ``TrainingControl`` (``control``) in the callback list: ``[callback]``, or ``[]``
    without multi-worker training."""
    if not is_multi_worker(strategy):
        return []
    import tensorflow as tf

    class SyncWorkers(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            stop = any_worker(strategy, bool(self.model.stop_training))
            if stop and not self.model.stop_training and control is not None:
                control.summary.setdefault("stopped", "max_minutes")  # another worker's clock ran out
            self.model.stop_training = stop

    return [SyncWorkers()]
