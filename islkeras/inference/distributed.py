"""Many fields on a Dask cluster: ``islkeras predict ... --dask ADDRESS`` or ``--workers N`` (extra ``[dask]``).

One Dask task per field runs :func:`islkeras.inference.fields.predict_one`, the same body as the serial loop
(read, predict, write atomically), on a worker: each worker process loads the SavedModel once (``_MODELS``)
and writes its fields itself, so only a small :class:`FieldResult` travels back. The driver reports each
field as it finishes (progress bar, the serial path's messages).

Failures: a field that cannot be predicted comes back as ``ok=False`` with its one-line message. A worker
that dies loses only the field it was predicting: the scheduler reschedules its tasks on the other workers
(after ``distributed.scheduler.allowed-failures`` deaths with one task, 3 by default, that field is reported
as failed). Outputs are written under a temporary name and renamed, so a file under the final name is
complete; a task finishing a field touches ``<out>/.islkeras-predict-<token>/<name>.done``, and a retry of
a field whose output and marker exist returns without writing it again. The driver removes the markers and
any temporary file a killed worker left behind when the run ends.

``--dask ADDRESS``: the scheduler is asked for its identity first (``timeout`` seconds), so an address where
no scheduler answers is one line, before anything is written. Workers need islkeras installed and the
model, the inputs and ``--out`` on a shared filesystem under the same paths (relative paths are made
absolute here). ``--workers N``: a ``LocalCluster`` of N processes with one thread each on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

from islkeras.errors import UserError
from islkeras.inference.fields import FieldResult, FieldSettings, InputItem, failure_message, predict_one

__all__ = ["model_info", "predict_task", "connect", "local_cluster", "run_fields", "predict_on_dask"]

EXTRA_HINT = "pip install 'islkeras[dask]'"
RETRIES = 1  #: retries of a task that raised (predict_one does not raise; this covers the worker side around it)
MARKERS = ".islkeras-predict-"

#: per worker process: SavedModel path -> ExportedModel, loaded by the first field that needs it
_MODELS: dict = {}


def model_info(path) -> SimpleNamespace:
    """The SavedModel's folder and metadata without loading it (the driver of a Dask run needs no TF)."""
    from islkeras.models.savedmodel import find_savedmodel, read_meta

    sm = find_savedmodel(path).absolute()
    meta = read_meta(sm)
    return SimpleNamespace(path=sm, meta=meta, n_inputs=int(meta["n_inputs"]))


def _model(path: str):
    em = _MODELS.get(path)
    if em is None:
        from islkeras.models.savedmodel import ExportedModel

        em = _MODELS[path] = ExportedModel(path)
    return em


def predict_task(model_path: str, item: InputItem, name: str, settings: FieldSettings, token: str) -> FieldResult:
    """The Dask task of one field (runs on a worker)."""
    marker = Path(settings.out) / f"{MARKERS}{token}" / f"{name}.done"
    if marker.is_file() and settings.target(name).exists():
        return FieldResult(name, True, "")  # a retry of a field already written in this run: not rewritten
    try:
        em = _model(model_path)
    except Exception as e:
        return FieldResult(name, False, failure_message(item, e))
    res = predict_one(em, item, name, settings)
    if res.ok:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return res


# ------------------------------------------------------------------------------------------ clusters
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _probe(address: str, timeout: float) -> None:
    """Ask ``address`` for its identity; a UserError naming the address unless a Dask scheduler answers."""
    from distributed.comm import connect as dask_connect
    from distributed.security import Security

    async def ask():
        comm = await dask_connect(address, timeout=timeout, **Security().get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    where = f"--dask {address}"
    try:
        reply = asyncio.run(asyncio.wait_for(ask(), timeout + 1.0))
    except (OSError, asyncio.TimeoutError) as e:
        raise UserError(f"{where}: no Dask scheduler answered within {timeout:g} s ({_first_line(e)})") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: not a usable scheduler address, expected e.g. tcp://HOST:8786 "
                        f"({_first_line(e)})") from None
    except Exception as e:  # something answers there, in another protocol (HTTP, a proxy...)
        raise UserError(f"{where}: no Dask scheduler answered within {timeout:g} s (something answers there, "
                        f"not in Dask's protocol: {_first_line(e)})") from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        what = f"it answers as a {kind}" if kind else "its reply names no Dask server type"
        raise UserError(f"{where}: that is not a Dask scheduler ({what}); give the address `dask scheduler` "
                        "prints")


def _require_distributed():
    try:
        import distributed
    except ImportError as e:
        raise UserError(f"--dask/--workers need Dask distributed: {EXTRA_HINT} ({e})") from None
    return distributed


@contextmanager
def connect(address: str, timeout: float = 10.0):
    """A ``distributed.Client`` of the scheduler at ``address`` (closed on exit); UserError if none answers."""
    distributed = _require_distributed()
    _probe(address, timeout)
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except Exception as e:
        raise UserError(f"--dask {address}: could not connect a client ({_first_line(e)})") from None
    try:
        yield client
    finally:
        client.close()


def _worker_env(workers: int) -> dict:
    """TensorFlow's op threads per local worker: this machine's cores shared out (not N x all cores), unless
    TF_NUM_INTRAOP_THREADS is set already."""
    if "TF_NUM_INTRAOP_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"TF_NUM_INTRAOP_THREADS": str(max(1, cores // max(1, workers)))}


@contextmanager
def local_cluster(workers: int):
    """A ``Client`` of a ``LocalCluster`` of ``workers`` processes, one thread each, on 127.0.0.1."""
    distributed = _require_distributed()
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, env=_worker_env(workers),
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


# -------------------------------------------------------------------------------------------- a run
def _lost_message(item: InputItem, exc: BaseException) -> str:
    if type(exc).__name__ == "KilledWorker":
        return (f"{item.path}: its Dask worker died each time it predicted it (out of memory? see the worker's "
                "log; distributed.scheduler.allowed-failures sets how often it is retried)")
    if type(exc).__name__ in ("CancelledError", "FutureCancelledError"):
        return f"{item.path}: its Dask task was cancelled (scheduler lost? {_first_line(exc)})"
    return failure_message(item, exc)


def _remove_stale_temporaries(out: Path, names: Sequence[str]) -> None:
    for name in names:  # the temporary names of fields.write_prediction (TIFF) and of the streamed OME-Zarr
        base = os.path.join(glob.escape(str(out)), f".{glob.escape(name)}_prediction")
        for tmp in glob.glob(base + ".tif.*.tmp") + glob.glob(base + ".ome.zarr.*.partial"):  # left by a killed worker
            try:
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.unlink(tmp)
            except OSError:
                pass


def run_fields(client, model_path, items: Sequence[InputItem], names: Sequence[str], settings: FieldSettings,
               report: Callable[[InputItem, FieldResult], None], send: Optional[Sequence[InputItem]] = None,
               retries: int = RETRIES) -> list[FieldResult]:
    """Predict ``items`` on ``client``'s workers, one task per field; ``report(item, result)`` as each one
    finishes (``send``: the items as the workers see them, e.g. with absolute paths). Returns the results in
    input order."""
    from distributed import as_completed

    from islkeras.utils import progress

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    marks = out / f"{MARKERS}{token}"
    marks.mkdir()
    futures: dict = {}
    results: dict[int, FieldResult] = {}
    try:
        for i, (item, name) in enumerate(zip(send or items, names)):
            fut = client.submit(predict_task, str(model_path), item, name, settings, token,
                                key=f"islkeras-predict-{token}-{i}", retries=retries)
            futures[fut] = i
        bar = progress(total=len(futures), desc="predict", unit="field")
        for fut in as_completed(list(futures), loop=client.loop):
            i = futures[fut]
            try:
                res = fut.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # the task itself was lost: its worker died too often, cancelled...
                res = FieldResult(names[i], False, _lost_message(items[i], e))
            fut.release()
            results[i] = res
            report(items[i], res)
            bar.update(1)
        bar.close()
    finally:
        pending = [f for f, i in futures.items() if i not in results]
        if pending:
            client.cancel(pending)
        shutil.rmtree(marks, ignore_errors=True)
        _remove_stale_temporaries(out, names)
    return [results[i] for i in range(len(futures))]


def predict_on_dask(model_path, items: Sequence[InputItem], names: Sequence[str], settings: FieldSettings,
                    report: Callable[[InputItem, FieldResult], None], address: Optional[str] = None,
                    workers: int = 0, timeout: float = 10.0) -> list[FieldResult]:
    """``islkeras predict --dask ADDRESS`` (a running cluster) or ``--workers N`` (a local one)."""
    if address:  # remote workers have another working directory: every path they see is absolute
        send = [replace(it, path=it.path.absolute(), root=it.root.absolute() if it.root else None) for it in items]
        settings = replace(settings, out=Path(settings.out).absolute())
        with connect(address, timeout) as client:
            return run_fields(client, Path(model_path).absolute(), items, names, settings, report, send=send)
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 worker for a local Dask cluster")
    with local_cluster(workers) as client:
        return run_fields(client, model_path, items, names, settings, report)
