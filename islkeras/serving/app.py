"""``islkeras serve``'s TF Serving routes and the work limits both protocols share: ``ServingApp``.

``islkeras serve`` is a TensorFlow-Serving-compatible REST server for exported models, without TF Serving,
that also speaks the Open Inference Protocol (KServe V2, ``islkeras.serving.kserve``) on the same port.

It serves a model base folder laid out as TF Serving expects (``BASE/<name>/<version>/saved_model.pb``,
written by ``islkeras export``) or a Triton model repository (``BASE/<name>/<version>/model.savedmodel/``,
``islkeras export --format triton``); several models, several versions each. The newest version answers
unless a request names one. Endpoints (the TF Serving REST API, plus a TIFF route):

* ``GET  /v1/models/<name>[/versions/<v>]`` -- version status (``model_version_status``)
* ``GET  /v1/models/<name>[/versions/<v>]/metadata`` -- ``model_spec`` and ``metadata.signature_def`` as
  TF Serving returns them, plus ``metadata.islkeras`` (channels, normalisation, config hash...)
* ``POST /v1/models/<name>[/versions/<v>]:predict`` -- ``{"instances": ...}`` (row) -> ``{"predictions": ...}``
  or ``{"inputs": ...}`` (columnar) -> ``{"outputs": ...}``; optional ``"signature_name"``
* ``POST /v1/models/<name>[/versions/<v>]:predict_tiff`` -- TIFF bytes in, float32 TIFF out (whole field,
  tiled by ``islkeras.inference.tiling.predict_field``)
* ``GET  /v1/models`` -- the models and versions found (not in TF Serving)

Robustness: every bad request gets a 4xx with ``{"error": "<what was expected>"}``; a failure inside the
model gets a 500 with its message and the server carries on. Work is bounded: at most ``max_concurrent``
model calls run at once and ``max_queue`` more wait for a slot (more, or a wait beyond ``queue_timeout_s``,
get 503); the HTTP layer (``islkeras.serving.http``) caps connections, body sizes and the time a request may
take to arrive. Each model version is loaded once (the newest of each model at start, older ones on first
use, newer exports found by a rescan in the background).

The parts: ``islkeras.serving.protocol`` (the TF Serving wire format), ``islkeras.serving.repository`` (the
models and their versions), this module (routes and admission, without HTTP plumbing: ``await
ServingApp.handle(method, target, body) -> Reply``; blocking work -- parsing, loading, the model -- runs in
worker threads, the event loop only waits), ``islkeras.serving.kserve`` (the V2 protocol on the same
repository and admission), ``islkeras.serving.asgi`` (the Starlette app) and ``islkeras.serving.http``
(uvicorn, ``make_server`` and the command). TensorFlow is imported only when the server starts.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
import click

from islkeras.serving.protocol import (CALLABLE_SIGNATURES, HTTPError, _check_and_cast, bad_request,
                                       parse_predict_request, tensor_json)
from islkeras.serving.repository import ModelRepository, ModelVersion, _is_version


# --------------------------------------------------------------------------------------------- options
@dataclass
class ServeOptions:
    max_concurrent: int = 2  #: model calls running at once
    max_queue: int = 16  #: requests waiting for a model slot; beyond -> 503
    queue_timeout_s: float = 60.0  #: longest wait for a model slot; beyond -> 503
    max_connections: int = 256  #: connections open at once (an idle one costs no thread); beyond -> 503
    max_body_mb: float = 64.0  #: request body limit; beyond -> 413
    request_timeout_s: float = 60.0  #: a request's headers and body must arrive within this; beyond -> 408
    idle_timeout_s: float = 30.0  #: a connection without a request in progress is closed after this
    preload: str = "latest"  #: "latest" (newest version of each model), "all" or "none"
    rescan_s: float = 2.0  #: rescan the base folder for new versions at most this often
    access_log: bool = False
    tile: Optional[int] = None  #: TIFF route tiling (None: islkeras.inference.tiling's defaults)
    overlap: Optional[int] = None
    batch: Optional[int] = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


# ------------------------------------------------------------------------------------------- admission
class Busy(HTTPError):
    def __init__(self, msg: str):
        super().__init__(503, msg)


class Admission:
    """At most ``max_concurrent`` model calls at once, at most ``max_queue`` waiting; the rest get 503.

    Used on the server's event loop (``async with admission.slot():``), so the count needs no lock and a
    waiting request holds no thread.
    """

    def __init__(self, max_concurrent: int, max_queue: int, timeout_s: float):
        self.max_concurrent, self.max_queue, self.timeout_s = max_concurrent, max_queue, timeout_s
        self._sem: Optional[asyncio.Semaphore] = None  # made on first use, in the server's loop
        self.pending = 0  #: waiting + running

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.pending >= self.max_concurrent + self.max_queue:
            raise Busy(f"server busy: {self.max_concurrent} predictions running and {self.max_queue} queued "
                       "(--max-concurrent/--max-queue); retry later")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrent)
        self.pending += 1
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._sem.acquire()
            except TimeoutError:
                raise Busy(f"server busy: no prediction slot within {self.timeout_s:g} s; retry later") from None
            try:
                yield
            finally:
                self._sem.release()
        finally:
            self.pending -= 1


async def run_sync(fn, *args):
    """``fn(*args)`` in a worker thread (parsing, loading, TensorFlow): the event loop keeps serving."""
    return await anyio.to_thread.run_sync(fn, *args)


# ---------------------------------------------------------------------------------------------- TIFF route
def _query_int(query: dict, key: str, lo: int, hi: int) -> Optional[int]:
    if key not in query:
        return None
    raw = query[key][-1]
    try:
        v = int(raw)
    except ValueError:
        raise bad_request(f"query parameter {key}={raw!r}: expected an integer") from None
    if not lo <= v <= hi:
        raise bad_request(f"query parameter {key}={v}: expected {lo} <= {key} <= {hi}")
    return v


# ------------------------------------------------------------------------------------------------ the app
@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: Optional[dict] = None


def server_timing(**seconds: float) -> dict:
    """A ``Server-Timing`` header (milliseconds per stage), shown by browsers' dev tools and read by benchmarks."""
    return {"Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in seconds.items())}


_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<metadata>/metadata)?(?::(?P<verb>[A-Za-z_]+))?/?$"
)


class ServingApp:
    """The TF Serving routes without HTTP plumbing (``await handle(method, target, body) -> Reply``), and the
    repository, admission and model calls the KServe V2 routes share."""

    def __init__(self, base: Union[str, Path], options: Optional[ServeOptions] = None):
        self.options = options or ServeOptions()
        self.repo = ModelRepository(base, rescan_s=self.options.rescan_s)
        self.admission = Admission(self.options.max_concurrent, self.options.max_queue, self.options.queue_timeout_s)

    # ---- dispatch
    async def handle(self, method: str, target: str, body: bytes = b"") -> Reply:
        url = urlsplit(target)
        path = url.path
        if path.rstrip("/") == "/v1/models":
            if method != "GET":
                raise HTTPError(405, f"{method} {path}: only GET lists the models")
            return self._json(200, await run_sync(self.models_listing))
        m = _ROUTE.match(path)
        if not m:
            raise HTTPError(404, f"no route for {method} {path}; expected /v1/models/<name>[/versions/<v>]"
                                 "[/metadata|:predict|:predict_tiff] (TF Serving) or /v2/... (KServe V2)")
        name, verb = m["name"], m["verb"]
        if m["label"] is not None:
            raise HTTPError(404, f"version labels are not configured here (label {m['label']!r}); use "
                                 f"/v1/models/{name}/versions/<v> or the newest version")
        version = None
        if m["version"] is not None:
            if not _is_version(m["version"]):
                raise bad_request(f"version {m['version']!r}: expected a non-negative integer")
            version = int(m["version"])
        if method == "GET":
            if verb:
                raise HTTPError(405, f"GET {path}: :{verb} needs POST")
            if m["metadata"]:
                return self._json(200, await run_sync(self.metadata, name, version))
            return self._json(200, await run_sync(self.status, name, version))
        if method != "POST":
            raise HTTPError(405, f"{method} {path}: expected GET (status, metadata) or POST (:predict)")
        if m["metadata"] or not verb:
            raise HTTPError(405, f"POST {path}: POST goes to /v1/models/<name>[/versions/<v>]:predict or :predict_tiff")
        if verb == "predict":
            return await self.predict(name, version, body)
        if verb == "predict_tiff":
            return await self.predict_tiff(name, version, body, parse_qs(url.query))
        if verb in ("classify", "regress"):
            raise bad_request(f":{verb} is not supported: the islkeras signatures are predict signatures; use :predict")
        raise HTTPError(404, f"unknown verb :{verb}; expected :predict or :predict_tiff")

    @staticmethod
    def _json(status: int, obj) -> Reply:
        return Reply(status, "application/json", json.dumps(obj, indent=1).encode())

    # ---- GET
    def models_listing(self) -> dict:
        self.repo.refresh()
        return {"models": [{"name": n, "versions": [str(v) for v in sorted(self.repo.versions(n), reverse=True)]}
                           for n in self.repo.names()]}

    @staticmethod
    def version_state(mv: ModelVersion) -> tuple[str, str, str]:
        """(TF Serving state, error code, message) of a version."""
        if mv.loaded:
            return "AVAILABLE", "OK", ""
        if mv.loading:
            return "LOADING", "OK", ""
        if mv.error:
            return "END", "UNKNOWN", mv.error
        return "START", "OK", "loads on its first request"

    def status(self, name: str, version: Optional[int]) -> dict:
        if version is not None:
            mvs = [self.repo.get(name, version)]
        else:
            mvs = sorted(self.repo.versions(name).values(), key=lambda mv: -mv.version)
        out = []
        for mv in mvs:
            state, code, msg = self.version_state(mv)
            out.append({"version": str(mv.version), "state": state,
                        "status": {"error_code": code, "error_message": msg}})
        return {"model_version_status": out}

    def metadata(self, name: str, version: Optional[int]) -> dict:
        mv = self.repo.get(name, version)
        model = mv.get()
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(mv.version)},
            "metadata": {"signature_def": {"signature_def": mv.sigdefs}, "islkeras": model.meta},
        }

    # ---- POST
    async def predict(self, name: str, version: Optional[int], body: bytes) -> Reply:
        def parse():
            mv = self.repo.get(name, version)
            model = mv.get()
            t = time.perf_counter()
            fmt, spec, arr = parse_predict_request(body, mv.specs)
            multiple = int(model.meta.get("multiple", 32)) if spec.signature == "normalized" else None
            arr = _check_and_cast(arr, spec, multiple)
            return mv, fmt, getattr(model, CALLABLE_SIGNATURES[spec.signature]), arr, time.perf_counter() - t

        mv, fmt, fn, arr, t_parse = await run_sync(parse)
        y, t_queue, t_model = await self.call_model(mv, fn, arr)
        t = time.perf_counter()
        key = b"predictions" if fmt == "row" else b"outputs"
        data = await run_sync(lambda: b'{"' + key + b'": ' + tensor_json(y) + b"}")
        return Reply(200, "application/json", data, server_timing(parse=t_parse, queue=t_queue, model=t_model,
                                                                   encode=time.perf_counter() - t))

    async def predict_tiff(self, name: str, version: Optional[int], body: bytes, query: dict) -> Reply:
        """TIFF bytes -> ``islkeras predict``'s output TIFF for that file (same reader, tiling and writer)."""
        import tempfile

        from islkeras.inference import fields as F
        from islkeras.inference import tiling as T

        o = self.options
        kwargs = {}
        for key, default, lo, hi in (("tile", o.tile or T.DEFAULT_TILE, 32, 8192),
                                     ("overlap", o.overlap if o.overlap is not None else T.DEFAULT_OVERLAP, 0, 8192),
                                     ("batch", o.batch or T.DEFAULT_BATCH, 1, 256)):
            v = _query_int(query, key, lo, hi)
            kwargs[key] = default if v is None else v
        dtype = query.get("dtype", ["float32"])[-1]
        if dtype not in ("float32", "uint16"):
            raise bad_request(f"query parameter dtype={dtype!r}: expected float32 or uint16")
        with tempfile.TemporaryDirectory(prefix="islkeras-serve-") as tmp:
            src, dst = Path(tmp) / "field.tif", Path(tmp) / "prediction.tif"

            def read():
                mv = self.repo.get(name, version)
                model = mv.get()
                if not body:
                    raise bad_request("empty body: expected the bytes of a TIFF image")
                t = time.perf_counter()
                src.write_bytes(body)
                try:
                    image = F.read_input(F.InputItem("field", "file", src), F.input_specs(model), model.n_inputs)
                except click.ClickException as e:
                    raise bad_request(e.format_message().replace(str(src), "request body") +
                                      f" (expected a TIFF image with {model.n_inputs} input plane(s))") from None
                return mv, model, image, time.perf_counter() - t

            def write(pred):
                F.write_prediction(dst, pred, F.output_names(model.meta), dtype, model.meta.get("kind", "isl"))
                return dst.read_bytes()

            mv, model, image, t_parse = await run_sync(read)
            pred, t_queue, t_model = await self.call_model(mv, lambda img: T.predict_field(model, img, **kwargs), image)
            t = time.perf_counter()
            data = await run_sync(write, pred)
        return Reply(200, "image/tiff", data, server_timing(parse=t_parse, queue=t_queue, model=t_model,
                                                             encode=time.perf_counter() - t))

    # ---- the model call both protocols go through
    async def call_model(self, mv: ModelVersion, fn, *args):
        """``fn(*args)`` in a worker thread once admission gives a slot -> (result, queue s, model s)."""
        t0 = time.perf_counter()
        async with self.admission.slot():
            t1 = time.perf_counter()
            y = await run_sync(self._call_model, mv, fn, *args)
        return y, t1 - t0, time.perf_counter() - t1

    @staticmethod
    def _call_model(mv: ModelVersion, fn, *args):
        try:
            return fn(*args)
        except HTTPError:
            raise
        except click.ClickException as e:  # islkeras UserError/DataError: the request's fault (e.g. tile sizes)
            raise bad_request(e.format_message()) from None
        except Exception as e:  # noqa: BLE001 -- a failure inside the model is a 500, not a crash
            raise _model_failure(mv, e) from None


def _model_failure(mv: ModelVersion, e: Exception) -> HTTPError:
    msg = str(e).strip()
    if len(msg) > 2000:
        msg = msg[:2000] + " ..."
    sys.stderr.write(f"islkeras serve: model {mv.name} v{mv.version} failed: {type(e).__name__}: {msg[:500]}\n")
    return HTTPError(500, f"model {mv.name} version {mv.version} failed: {type(e).__name__}: {msg}")
