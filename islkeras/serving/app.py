"""``islkeras serve``: a TensorFlow-Serving-compatible REST server for exported models, without TF Serving.

It serves a model base folder laid out as TF Serving expects (``BASE/<name>/<version>/saved_model.pb``,
written by ``islkeras export``); several models, several versions each. The newest version answers unless
a request names one. Endpoints (the TF Serving REST API, plus a TIFF route):

* ``GET  /v1/models/<name>[/versions/<v>]`` -- version status (``model_version_status``)
* ``GET  /v1/models/<name>[/versions/<v>]/metadata`` -- ``model_spec`` and ``metadata.signature_def`` as
  TF Serving returns them, plus ``metadata.islkeras`` (channels, normalisation, config hash...)
* ``POST /v1/models/<name>[/versions/<v>]:predict`` -- ``{"instances": ...}`` (row) -> ``{"predictions": ...}``
  or ``{"inputs": ...}`` (columnar) -> ``{"outputs": ...}``; optional ``"signature_name"``
* ``POST /v1/models/<name>[/versions/<v>]:predict_tiff`` -- TIFF bytes in, float32 TIFF out (whole field,
  tiled by ``islkeras.inference.predict.predict_field``)
* ``GET  /v1/models`` -- the models and versions found (not in TF Serving)

Robustness: every bad request gets a 4xx with ``{"error": "<what was expected>"}``; a failure inside the
model gets a 500 with its message and the server carries on. Work is bounded: at most
``max_connections`` connections are handled at once (more get 503), at most ``max_concurrent`` model calls
run at once and ``max_queue`` more wait for a slot (more get 503); bodies above ``max_body_mb`` get 413.
Each model version is loaded once (the newest of each model at start, older ones on first use) and the
base folder is rescanned (at most every ``rescan_s`` seconds) so a newly exported version is picked up.

TensorFlow is imported only when the server starts (``islkeras --help`` stays fast).
"""
from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import parse_qs, urlsplit

import click
import numpy as np

DEFAULT_SIGNATURE = "serving_default"
#: signatures of an islkeras SavedModel that the predict route can call, -> ExportedModel method
CALLABLE_SIGNATURES = {"serving_default": "predict_raw", "normalized": "predict_normalized"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ------------------------------------------------------------------------------------------------ errors
class HTTPError(Exception):
    """An error reply: ``status`` and the message that goes into ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def bad_request(msg: str) -> HTTPError:
    return HTTPError(400, msg)


# --------------------------------------------------------------------------------------------- options
@dataclass
class ServeOptions:
    max_concurrent: int = 2  #: model calls running at once
    max_queue: int = 16  #: requests waiting for a model slot; beyond -> 503
    queue_timeout_s: float = 60.0  #: longest wait for a model slot; beyond -> 503
    max_connections: int = 64  #: connections handled at once; beyond -> 503
    max_body_mb: float = 64.0  #: request body limit; beyond -> 413
    preload: str = "latest"  #: "latest" (newest version of each model), "all" or "none"
    rescan_s: float = 2.0  #: rescan the base folder for new versions at most this often
    idle_timeout_s: float = 30.0  #: a keep-alive connection idle (or a body trickling) this long is closed
    access_log: bool = False
    tile: Optional[int] = None  #: TIFF route tiling (None: islkeras.inference.predict's defaults)
    overlap: Optional[int] = None
    batch: Optional[int] = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


# ------------------------------------------------------------------------------------- signature metadata
def _tensor_info_json(info) -> dict:
    """A TensorInfo proto as TF Serving's JSON shows it (int64 sizes as strings, dtype names)."""
    from tensorflow.core.framework import types_pb2

    shape = info.tensor_shape
    return {
        "dtype": types_pb2.DataType.Name(info.dtype),
        "tensor_shape": {
            "dim": [{"size": str(d.size), "name": d.name} for d in shape.dim],
            "unknown_rank": bool(shape.unknown_rank),
        },
        "name": info.name,
    }


def read_signature_defs(savedmodel: Union[str, Path]) -> dict:
    """``{signature_name: {"inputs", "outputs", "method_name"}}`` of the ``serve`` MetaGraph, TF Serving style."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(savedmodel) / "saved_model.pb").read_bytes())
    graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags] or list(sm.meta_graphs)
    if not graphs:
        raise ValueError(f"{savedmodel}: SavedModel has no MetaGraph")
    out = {}
    for name, sig in sorted(graphs[0].signature_def.items()):
        out[name] = {
            "inputs": {k: _tensor_info_json(v) for k, v in sorted(sig.inputs.items())},
            "outputs": {k: _tensor_info_json(v) for k, v in sorted(sig.outputs.items())},
            "method_name": sig.method_name,
        }
    return out


@dataclass
class InputSpec:
    """One signature's single input: name, numpy dtype, shape (None = any)."""

    signature: str
    name: str
    dtype: np.dtype
    shape: tuple
    output: str

    @classmethod
    def from_sigdef(cls, signature: str, sigdef: dict) -> "InputSpec":
        from tensorflow.core.framework import types_pb2
        import tensorflow as tf

        if len(sigdef["inputs"]) != 1 or len(sigdef["outputs"]) != 1:
            raise ValueError(f"signature {signature}: expected one input and one output")
        (name, info), = sigdef["inputs"].items()
        (out_name, _), = sigdef["outputs"].items()
        dtype = np.dtype(tf.as_dtype(types_pb2.DataType.Value(info["dtype"])).as_numpy_dtype)
        shape = tuple(None if int(d["size"]) < 0 else int(d["size"]) for d in info["tensor_shape"]["dim"])
        return cls(signature, name, dtype, shape, out_name)

    def describe(self) -> str:
        dims = ["N", "H", "W", "C"] if len(self.shape) == 4 else [f"d{i}" for i in range(len(self.shape))]
        parts = [f"{d}={s}" if s is not None else d for d, s in zip(dims, self.shape)]
        return f"{self.dtype.name}[{', '.join(parts)}]"


# ------------------------------------------------------------------------------------------------ models
def _is_version(text: str) -> bool:
    """A TF Serving version folder / URL part: ASCII digits only (``str.isdigit`` also accepts "²")."""
    return text.isascii() and text.isdigit()


class ModelVersion:
    """One ``BASE/<name>/<version>/`` folder; the SavedModel loads once, on first use (thread-safe)."""

    RETRY_S = 10.0  #: a failed load is not retried sooner (a flood of requests must not reload it each time)

    def __init__(self, name: str, version: int, path: Path):
        self.name, self.version, self.path = name, version, path
        self._lock = threading.Lock()
        self._model = None
        self.loading = False
        self.error: Optional[str] = None
        self._failed_at = 0.0
        self.sigdefs: dict = {}
        self.specs: dict[str, InputSpec] = {}

    def _load(self):
        from islkeras.models.savedmodel import ExportedModel

        return ExportedModel(self.path)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self):
        """The loaded ``ExportedModel`` (loads it on first call; a failed load is retried next time)."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                if self.error and time.monotonic() - self._failed_at < self.RETRY_S:
                    raise self._load_error()
                self.loading = True
                try:
                    model = self._load()
                    sigdefs = read_signature_defs(self.path)
                    specs = {s: InputSpec.from_sigdef(s, sigdefs[s]) for s in CALLABLE_SIGNATURES if s in sigdefs}
                except Exception as e:  # noqa: BLE001 -- reported as the version's status and a 500
                    self.error, self._failed_at = f"{type(e).__name__}: {str(e)[:1000]}", time.monotonic()
                    sys.stderr.write(f"islkeras serve: loading {self.path} failed: {self.error}\n")
                    raise self._load_error() from None
                finally:
                    self.loading = False
                self.sigdefs, self.specs, self.error = sigdefs, specs, None
                self._model = model
        return self._model

    def _load_error(self) -> HTTPError:
        return HTTPError(500, f"model {self.name} version {self.version} failed to load: {self.error}")

    def load_in_background(self) -> None:
        def load():
            with contextlib.suppress(HTTPError):  # the failure is kept in self.error (status "END")
                self.get()

        if self._model is None and not self.loading and not self._lock.locked():
            threading.Thread(target=load, daemon=True, name=f"load-{self.name}-{self.version}").start()


class ModelRepository:
    """The models of a base folder: ``BASE/<name>/<version>/`` (or ``BASE/<version>/`` for one model)."""

    def __init__(self, base: Union[str, Path], rescan_s: float = 2.0):
        self.base = Path(base).resolve()
        if not self.base.is_dir():
            from islkeras.errors import UserError

            raise UserError(f"{self.base}: no such model base folder (expected BASE/<name>/<version>/saved_model.pb)")
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._scanned = -1e9
        self.refresh(force=True)

    @staticmethod
    def _versions(d: Path) -> dict[int, Path]:
        out = {}
        with contextlib.suppress(OSError):
            for p in d.iterdir():
                if _is_version(p.name) and (p / "saved_model.pb").is_file():
                    out[int(p.name)] = p
        return out

    def _scan(self) -> dict[str, dict[int, Path]]:
        own = self._versions(self.base)
        if own:  # BASE is itself one model's folder
            return {self.base.name: own}
        found = {}
        with contextlib.suppress(OSError):
            for d in sorted(self.base.iterdir()):
                if d.is_dir() and not d.name.startswith("."):
                    v = self._versions(d)
                    if v:
                        found[d.name] = v
        return found

    def refresh(self, force: bool = False) -> None:
        """Rescan the base folder if the last scan is older than ``rescan_s`` (``force``: 0.2 s)."""
        now = time.monotonic()
        if now - self._scanned < (0.2 if force else self.rescan_s):
            return
        found = self._scan()
        with self._lock:
            models = {}
            for name, versions in found.items():
                old = self._models.get(name, {})
                models[name] = {v: old[v] if v in old and old[v].path == p else ModelVersion(name, v, p)
                                for v, p in sorted(versions.items())}
            self._models = models
            self._scanned = now

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> dict[int, ModelVersion]:
        self.refresh()
        with self._lock:
            vs = self._models.get(name)
        if vs is None:
            self.refresh(force=True)
            with self._lock:
                vs = self._models.get(name)
        if not vs:
            known = ", ".join(self.names()) or "none"
            raise HTTPError(404, f"Servable not found for request: Latest({name}); models served: {known}")
        return vs

    def get(self, name: str, version: Optional[int] = None) -> ModelVersion:
        """A version (default: the newest; while a newer version found by a rescan is still loading, in the
        background, the newest loaded one keeps answering)."""
        vs = self.versions(name)
        if version is None:
            newest = vs[max(vs)]
            if newest.loaded:
                return newest
            ready = [mv for v, mv in sorted(vs.items()) if mv.loaded]
            if not ready:
                return newest
            newest.load_in_background()
            return ready[-1]
        if version not in vs:
            self.refresh(force=True)
            vs = self.versions(name)
            if version not in vs:
                raise HTTPError(404, f"Servable not found for request: Specific({name}, {version}); "
                                     f"versions of {name}: {', '.join(map(str, sorted(vs)))}")
        return vs[version]

    def preload(self, which: str = "latest") -> list[ModelVersion]:
        loaded = []
        if which == "none":
            return loaded
        with self._lock:
            models = {n: dict(v) for n, v in self._models.items()}
        for name, vs in models.items():
            for v in (sorted(vs) if which == "all" else [max(vs)]):
                vs[v].get()
                loaded.append(vs[v])
        return loaded


# ------------------------------------------------------------------------------------------- admission
class Busy(HTTPError):
    def __init__(self, msg: str):
        super().__init__(503, msg)


class Admission:
    """At most ``max_concurrent`` model calls at once, at most ``max_queue`` waiting; the rest get 503."""

    def __init__(self, max_concurrent: int, max_queue: int, timeout_s: float):
        self.max_concurrent, self.max_queue, self.timeout_s = max_concurrent, max_queue, timeout_s
        self._sem = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.pending = 0  #: waiting + running

    @contextlib.contextmanager
    def slot(self):
        with self._lock:
            if self.pending >= self.max_concurrent + self.max_queue:
                raise Busy(f"server busy: {self.max_concurrent} predictions running and {self.max_queue} queued "
                           "(--max-concurrent/--max-queue); retry later")
            self.pending += 1
        try:
            if not self._sem.acquire(timeout=self.timeout_s):
                raise Busy(f"server busy: no prediction slot within {self.timeout_s:g} s; retry later")
            try:
                yield
            finally:
                self._sem.release()
        finally:
            with self._lock:
                self.pending -= 1


# ------------------------------------------------------------------------------------- JSON <-> tensors
def _as_array(value: Any, spec: InputSpec, what: str, rank: int) -> np.ndarray:
    """Nested JSON lists -> a numeric ndarray of ``rank`` (not yet cast); 400 with what was expected."""
    expect = f"{what} must be a rank-{rank} array of numbers"
    if isinstance(value, (str, bytes, dict, bool)) or value is None:
        raise bad_request(f"{expect}, got {type(value).__name__}; the input {spec.name!r} is {spec.describe()}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise bad_request(f"{expect} with rows of equal length (a regular tensor): {str(e).splitlines()[0]}") from None
    if arr.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "S": "strings"}.get(arr.dtype.kind, "null, nested objects or numbers "
                                                                        "too large for 64 bits")
        raise bad_request(f"{expect}; found {kind} (input {spec.name!r} is {spec.describe()})")
    if arr.ndim != rank:
        raise bad_request(f"{expect}, got rank {arr.ndim} (shape {list(arr.shape)}); input {spec.name!r} is "
                          f"{spec.describe()}")
    return arr


def _check_and_cast(arr: np.ndarray, spec: InputSpec, multiple: Optional[int]) -> np.ndarray:
    """Check a batch against the signature's input (dims, value range) and cast it to the input dtype."""
    if arr.ndim != len(spec.shape):
        raise bad_request(f"input {spec.name!r}: expected rank {len(spec.shape)} {spec.describe()}, "
                          f"got shape {list(arr.shape)}")
    for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if want is not None and got != want:
            axis = "channel" if i == len(spec.shape) - 1 else f"dimension {i}"
            raise bad_request(f"input {spec.name!r}: expected {want} {axis}{'s' if want != 1 else ''} "
                              f"({spec.describe()}), got shape {list(arr.shape)}")
    if arr.size == 0:
        raise bad_request(f"input {spec.name!r}: empty tensor (shape {list(arr.shape)}); expected {spec.describe()}")
    if multiple and len(spec.shape) == 4 and (arr.shape[1] % multiple or arr.shape[2] % multiple):
        raise bad_request(f"signature {spec.signature!r}: height and width must be multiples of {multiple}, got "
                          f"{arr.shape[1]}x{arr.shape[2]} (serving_default takes any size)")
    dt = spec.dtype
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
                raise bad_request(f"input {spec.name!r} is {dt.name}: expected integers in [{info.min}, {info.max}], "
                                  "got non-integer values")
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise bad_request(f"input {spec.name!r} is {dt.name}: values must be in [{info.min}, {info.max}], got "
                              f"[{lo}, {hi}]")
    elif dt.kind == "f" and arr.dtype.kind == "f" and dt.itemsize < arr.dtype.itemsize:
        finite = np.isfinite(arr)
        if (np.abs(arr[finite]) > np.finfo(dt).max).any():
            raise bad_request(f"input {spec.name!r} is {dt.name}: values beyond its range")
    return arr.astype(dt, copy=False)


_FAST_NAME = rb'"[A-Za-z0-9_./\-]*"'
_FAST_HEAD = re.compile(rb'\A\s*\{\s*(?:"signature_name"\s*:\s*(?P<sig1>' + _FAST_NAME + rb')\s*,\s*)?'
                        rb'"(?P<key>instances|inputs)"\s*:\s*(?:\{\s*(?P<name>' + _FAST_NAME + rb')\s*:\s*)?\Z')
_FAST_TAIL = re.compile(rb'\A\s*(?P<close>\}\s*)?(?:,\s*"signature_name"\s*:\s*(?P<sig2>' + _FAST_NAME + rb')\s*)?'
                        rb'\}\s*\Z')
_NUMBER_CHARS = b"0123456789.+-eE \t\r\n"
_BRACKETS_TO_SPACE = bytes.maketrans(b"[]", b"  ")
#: input dtypes whose every value float64 holds exactly (the fast parser reads numbers as float64)
_FAST_DTYPES = ("uint8", "uint16", "int8", "int16", "int32", "float16", "float32")


def _skeleton_shape(skel: bytes) -> Optional[tuple]:
    """Shape of a regular nested list from its skeleton (brackets and commas only), or None.

    Read off the first element at each depth: the first list of depth k ends at the first run of
    ``rank - k + 1`` closing brackets, and a regular list of n sub-lists of skeleton length L is
    ``n * L + (n - 1) + 2`` long -- a few C-speed ``find`` calls instead of a pass over every bracket. The
    caller compares the whole skeleton with the template of this shape, so an irregular list is still
    caught.
    """
    rank = len(skel) - len(skel.lstrip(b"["))
    if rank == 0 or len(skel) < 2 * rank:
        return None
    shape, inner = [], None
    for k in range(rank, 0, -1):  # depth k = rank (innermost) .. 1 (outermost)
        end = skel.find(b"]" * (rank - k + 1))
        if end < 0:
            return None
        length = end + (rank - k + 1) - (k - 1)  # skeleton length of the first list at depth k
        if inner is None:
            n = length - 1  # "[" + (n - 1) commas + "]"
        else:
            n, rem = divmod(length - 1, inner + 1)
            if rem:
                return None
        if n < 1:
            return None
        shape.append(n)
        inner = length
    return tuple(reversed(shape))


def _json_number_syntax_ok(text: bytes) -> bool:
    """Reject what numpy would read but JSON forbids (``+1``, ``01``, ``.5``, ``5.``, ``-``, ``1e``), vectorised."""
    pad = np.array([32], np.uint8)
    p = np.concatenate((pad, np.frombuffer(text, np.uint8), pad, pad))
    dig = (p >= 48) & (p <= 57)

    def at(ch: str) -> np.ndarray:
        return np.flatnonzero(p == ord(ch))

    i = at("-")
    if i.size and not (dig[i + 1].all() and not dig[i - 1].any()):
        return False
    i = at("+")
    if i.size and not (np.isin(p[i - 1], (69, 101)).all() and dig[i + 1].all()):
        return False
    i = at(".")
    if i.size and not (dig[i - 1].all() and dig[i + 1].all()):
        return False
    for ch in "eE":
        i = at(ch)
        if i.size and not (dig[i - 1].all() and (dig[i + 1] | (p[i + 1] == 43) | (p[i + 1] == 45)).all()):
            return False
    i = at("0")
    i = i[dig[i + 1]]  # a 0 followed by a digit must not start an integer part ("01", "-01")
    if i.size:
        prev = p[i - 1]
        in_exponent = np.isin(prev, (69, 101)) | (np.isin(prev, (43, 45)) & np.isin(p[i - 2], (69, 101)))
        if (~dig[i - 1] & (prev != 46) & ~in_exponent).any():
            return False
    return True


def _fast_predict_body(body: bytes, specs: dict[str, InputSpec]):
    """The common big request -- one numeric tensor as ``{"instances": [...]}`` or ``{"inputs": [...]}`` (or
    ``{"inputs": {"<name>": [...]}}``), optionally with ``signature_name`` -- parsed with numpy instead of
    building a Python object per number (several times faster for a 512 x 512 image). Returns None whenever
    the body is anything else (the json module then parses it and reports what is wrong)."""
    start, end = body.find(b"["), body.rfind(b"]")
    if start < 0 or end < start:
        return None
    head, tail = _FAST_HEAD.match(body[:start]), _FAST_TAIL.match(body[end + 1:])
    if head is None or tail is None or bool(head["name"]) != bool(tail["close"]) or (head["sig1"] and tail["sig2"]):
        return None
    sig = (head["sig1"] or tail["sig2"] or b'"' + DEFAULT_SIGNATURE.encode() + b'"')[1:-1].decode()
    spec = specs.get(sig)
    if spec is None or spec.dtype.name not in _FAST_DTYPES:
        return None
    if head["name"] is not None and head["name"][1:-1].decode() != spec.name:
        return None
    text = body[start:end + 1]
    skel = text.translate(None, _NUMBER_CHARS)
    shape = _skeleton_shape(skel)
    if shape is None or skel != _template(shape, "").encode() or not _json_number_syntax_ok(text):
        return None
    compact = text.translate(None, b" \t\r\n")  # an empty slot ("[]", "[1,]", "[,1]", "1,,2") is not a number
    if b"[]" in compact or b",," in compact or b"[," in compact or b",]" in compact:
        return None
    import warnings

    numbers = text.translate(_BRACKETS_TO_SPACE)
    flat = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (and stops) on a token that is not a number
        if spec.dtype.kind in "iu":  # integer images (uint8/uint16): 3x faster than parsing as float
            try:
                flat = np.fromstring(numbers, dtype=np.int64, sep=",")
            except (ValueError, DeprecationWarning):  # "2.0", "1e3": not integer tokens, read as float below
                flat = None
            else:  # out-of-range tokens saturate: let the float parse see their real value
                if flat.size and (flat.max() == np.iinfo(np.int64).max or flat.min() == np.iinfo(np.int64).min):
                    flat = None
        if flat is None:
            try:
                flat = np.fromstring(numbers, dtype=np.float64, sep=",")
            except (ValueError, DeprecationWarning):
                return None
    if flat.size != int(np.prod(shape)):
        return None
    fmt = "row" if head["key"] == b"instances" else "columnar"
    if fmt == "row" and head["name"] is not None:
        return None
    return fmt, spec, flat.reshape(shape)


def parse_predict_request(body: bytes, specs: dict[str, InputSpec], fast: bool = True) -> tuple[str, InputSpec, np.ndarray]:
    """A ``:predict`` body -> (format "row"/"columnar", input spec, batch array); ``fast``: try numpy first."""
    fast = _fast_predict_body(body, specs) if fast else None
    if fast is not None:
        fmt, spec, arr = fast
        if arr.ndim != len(spec.shape):  # same message as the general path
            rank = len(spec.shape)
            what = f'"instances" (a list of rank-{rank - 1} [H][W][C] images)' if fmt == "row" else '"inputs"'
            _as_array(arr, spec, what, len(spec.shape))
        return fast
    try:
        req = json.loads(body)
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}; expected "
                          '{"instances": [...]} or {"inputs": ...}') from None
    if not isinstance(req, dict):
        raise bad_request('request must be a JSON object: {"instances": [...]} (row) or {"inputs": ...} (columnar)')
    sig = req.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(sig, str) or sig not in specs:
        raise bad_request(f"signature_name {sig!r} is not served; available: {', '.join(sorted(specs))}")
    spec = specs[sig]
    unknown = set(req) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise bad_request(f"unexpected key(s) {', '.join(sorted(unknown))}; expected signature_name and instances "
                          "or inputs")
    if ("instances" in req) == ("inputs" in req):
        raise bad_request('request needs exactly one of "instances" (row format) and "inputs" (columnar format)')
    rank = len(spec.shape)
    if "instances" in req:
        inst = req["instances"]
        if not isinstance(inst, list) or not inst:
            raise bad_request(f'"instances" must be a non-empty list of {spec.name!r} tensors, each '
                              f"{spec.describe().replace('N, ', '')} (rank {rank - 1})")
        if all(isinstance(i, dict) for i in inst):
            for i in inst:
                if set(i) != {spec.name}:
                    raise bad_request(f"each instance object must have exactly the key {spec.name!r}, got "
                                      f"{sorted(i)}")
            inst = [i[spec.name] for i in inst]
        arr = _as_array(inst, spec, f'"instances" (a list of rank-{rank - 1} [H][W][C] images)', rank)
        return "row", spec, arr
    value = req["inputs"]
    if isinstance(value, dict):
        if set(value) != {spec.name}:
            raise bad_request(f'"inputs" object must have exactly the key {spec.name!r}, got {sorted(value)}')
        value = value[spec.name]
    arr = _as_array(value, spec, '"inputs"', rank)
    return "columnar", spec, arr


def _template(shape: tuple, fmt: str) -> str:
    s = fmt
    for d in reversed(shape):
        s = "[" + ",".join([s] * d) + "]"
    return s


def tensor_json(arr: np.ndarray) -> bytes:
    """A numeric ndarray as nested JSON lists, fast: orjson writes the array directly from its buffer
    (shortest repr that round-trips, so float32 values come back bit-identical), about 3x faster than
    formatting through Python floats.

    Non-finite values are written as ``NaN``/``Infinity`` (as TF Serving does) via the json module (orjson
    would write ``null``).
    """
    import orjson

    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.size == 0 or arr.dtype.kind not in "iuf" or \
            (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        return json.dumps(arr.tolist()).encode()
    if arr.dtype == np.float16:  # written via float32 (exact: every float16 is a float32)
        arr = arr.astype(np.float32)
    return orjson.dumps(np.ascontiguousarray(arr), option=orjson.OPT_SERIALIZE_NUMPY)


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


def _server_timing(**seconds: float) -> dict:
    """A ``Server-Timing`` header (milliseconds per stage), shown by browsers' dev tools and read by benchmarks."""
    return {"Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in seconds.items())}


_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<metadata>/metadata)?(?::(?P<verb>[A-Za-z_]+))?/?$"
)


class ServingApp:
    """Request handling without HTTP plumbing: ``handle(method, path, body) -> Reply``."""

    def __init__(self, base: Union[str, Path], options: Optional[ServeOptions] = None):
        self.options = options or ServeOptions()
        self.repo = ModelRepository(base, rescan_s=self.options.rescan_s)
        self.admission = Admission(self.options.max_concurrent, self.options.max_queue, self.options.queue_timeout_s)

    # ---- dispatch
    def handle(self, method: str, target: str, body: bytes = b"") -> Reply:
        url = urlsplit(target)
        path = url.path
        if path.rstrip("/") == "/v1/models":
            if method != "GET":
                raise HTTPError(405, f"{method} {path}: only GET lists the models")
            return self._json(200, self.models_listing())
        m = _ROUTE.match(path)
        if not m:
            raise HTTPError(404, f"no route for {method} {path}; expected /v1/models/<name>[/versions/<v>]"
                                 "[/metadata|:predict|:predict_tiff]")
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
                return self._json(200, self.metadata(name, version))
            return self._json(200, self.status(name, version))
        if method != "POST":
            raise HTTPError(405, f"{method} {path}: expected GET (status, metadata) or POST (:predict)")
        if m["metadata"] or not verb:
            raise HTTPError(405, f"POST {path}: POST goes to /v1/models/<name>[/versions/<v>]:predict or :predict_tiff")
        if verb == "predict":
            return self.predict(name, version, body)
        if verb == "predict_tiff":
            return self.predict_tiff(name, version, body, parse_qs(url.query))
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
    def _version_status(mv: ModelVersion) -> dict:
        if mv.loaded:
            state, code, msg = "AVAILABLE", "OK", ""
        elif mv.loading:
            state, code, msg = "LOADING", "OK", ""
        elif mv.error:
            state, code, msg = "END", "UNKNOWN", mv.error
        else:
            state, code, msg = "START", "OK", "loads on its first request"
        return {"version": str(mv.version), "state": state, "status": {"error_code": code, "error_message": msg}}

    def status(self, name: str, version: Optional[int]) -> dict:
        if version is not None:
            mvs = [self.repo.get(name, version)]
        else:
            mvs = sorted(self.repo.versions(name).values(), key=lambda mv: -mv.version)
        return {"model_version_status": [self._version_status(mv) for mv in mvs]}

    def metadata(self, name: str, version: Optional[int]) -> dict:
        mv = self.repo.get(name, version)
        model = mv.get()
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(mv.version)},
            "metadata": {"signature_def": {"signature_def": mv.sigdefs}, "islkeras": model.meta},
        }

    # ---- POST
    def predict(self, name: str, version: Optional[int], body: bytes) -> Reply:
        mv = self.repo.get(name, version)
        model = mv.get()
        t0 = time.perf_counter()
        fmt, spec, arr = parse_predict_request(body, mv.specs)
        multiple = int(model.meta.get("multiple", 32)) if spec.signature == "normalized" else None
        arr = _check_and_cast(arr, spec, multiple)
        fn = getattr(model, CALLABLE_SIGNATURES[spec.signature])
        t1 = time.perf_counter()
        with self.admission.slot():
            t2 = time.perf_counter()
            y = self._call_model(mv, fn, arr)
        t3 = time.perf_counter()
        key = b"predictions" if fmt == "row" else b"outputs"
        data = b'{"' + key + b'": ' + tensor_json(y) + b"}"
        return Reply(200, "application/json", data, _server_timing(parse=t1 - t0, queue=t2 - t1, model=t3 - t2,
                                                                    encode=time.perf_counter() - t3))

    def predict_tiff(self, name: str, version: Optional[int], body: bytes, query: dict) -> Reply:
        """TIFF bytes -> ``islkeras predict``'s output TIFF for that file (same reader, tiling and writer)."""
        import tempfile

        from islkeras.inference import predict as P

        mv = self.repo.get(name, version)
        model = mv.get()
        if not body:
            raise bad_request("empty body: expected the bytes of a TIFF image")
        o = self.options
        kwargs = {}
        for key, default, lo, hi in (("tile", o.tile or P.DEFAULT_TILE, 32, 8192),
                                     ("overlap", o.overlap if o.overlap is not None else P.DEFAULT_OVERLAP, 0, 8192),
                                     ("batch", o.batch or P.DEFAULT_BATCH, 1, 256)):
            v = _query_int(query, key, lo, hi)
            kwargs[key] = default if v is None else v
        dtype = query.get("dtype", ["float32"])[-1]
        if dtype not in ("float32", "uint16"):
            raise bad_request(f"query parameter dtype={dtype!r}: expected float32 or uint16")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="islkeras-serve-") as tmp:
            src, dst = Path(tmp) / "field.tif", Path(tmp) / "prediction.tif"
            src.write_bytes(body)
            try:
                image = P.read_input(P.InputItem("field", "file", src), P.input_specs(model), model.n_inputs)
            except click.ClickException as e:
                raise bad_request(e.format_message().replace(str(src), "request body") +
                                  f" (expected a TIFF image with {model.n_inputs} input plane(s))") from None
            t1 = time.perf_counter()
            with self.admission.slot():
                t2 = time.perf_counter()
                pred = self._call_model(mv, lambda img: P.predict_field(model, img, **kwargs), image)
            t3 = time.perf_counter()
            P.write_prediction(dst, pred, P.output_names(model.meta), dtype, model.meta.get("kind", "isl"))
            return Reply(200, "image/tiff", dst.read_bytes(), _server_timing(
                parse=t1 - t0, queue=t2 - t1, model=t3 - t2, encode=time.perf_counter() - t3))

    @staticmethod
    def _call_model(mv: ModelVersion, fn, arr):
        try:
            return fn(arr)
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


# ------------------------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "islkeras-serve"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall on keep-alive
    server: "ServingHTTPServer"

    def setup(self):
        self.timeout = self.server.app.options.idle_timeout_s
        self._linger = 0  # bytes of an unread request body to drain before closing (see finish)
        super().setup()

    def finish(self):
        """Lingering close: after an error reply sent before the body was read (413, 411...), stop writing and
        drain what the client is still sending, so its kernel does not reset the connection before it read
        the reply."""
        try:
            super().finish()
        finally:
            if self._linger:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(1.0)
                    left, deadline = self._linger, time.monotonic() + 5.0
                    while left > 0 and time.monotonic() < deadline:
                        chunk = self.connection.recv(min(1 << 16, left))
                        if not chunk:
                            break
                        left -= len(chunk)

    def _content_length(self) -> Optional[int]:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {raw!r}") from None
        return n

    def _too_large(self, n: int) -> HTTPError:
        o = self.server.app.options
        return HTTPError(413, f"request body of {n} bytes exceeds the limit of {o.max_body_bytes} bytes (--max-body-mb "
                              f"{o.max_body_mb:g}); send smaller batches, or whole fields to :predict_tiff")

    def handle_expect_100(self):
        """``Expect: 100-continue`` (curl, for large bodies): refuse a too-large body before it is sent."""
        try:
            n = self._content_length()
            if n is not None and n > self.server.app.options.max_body_bytes:
                raise self._too_large(n)
        except HTTPError as e:
            self._reply(e.status, "application/json", json.dumps({"error": e.message}).encode(), close=True)
            return False
        return super().handle_expect_100()

    def log_message(self, format, *args):  # noqa: A002 -- BaseHTTPRequestHandler's signature
        if self.server.app.options.access_log:
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method...) as JSON too."""
        with contextlib.suppress(OSError):
            self._reply(code, "application/json", json.dumps({"error": message or HTTPStatus(code).phrase}).encode(),
                        close=True)

    def _reply(self, status: int, ctype: str, data: bytes, close: bool = False, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
            if not self._linger and self.command in ("POST", "PUT", "PATCH"):
                self._linger = 1 << 20
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked request bodies are not supported; send a Content-Length")
        n = self._content_length()
        if n is None:
            if self.command == "POST":
                raise HTTPError(411, "POST needs a Content-Length header")
            return b""
        limit = self.server.app.options.max_body_bytes
        if n > limit:
            self._linger = n if n <= max(4 * limit, 16 << 20) else 0  # drain moderately large bodies, drop huge ones
            raise self._too_large(n)
        body = self.rfile.read(n)
        if len(body) != n:
            raise HTTPError(400, f"request body ended after {len(body)} of {n} bytes")
        return body

    def _dispatch(self):
        body_read, headers = False, None
        try:
            body = self._read_body()
            body_read = True
            reply = self.server.app.handle(self.command, self.path, body)
            status, ctype, data, headers = reply.status, reply.content_type, reply.body, reply.headers
        except HTTPError as e:
            status, ctype, data = e.status, "application/json", json.dumps({"error": e.message}).encode()
        except Exception as e:  # noqa: BLE001 -- never let a request take the server down
            traceback.print_exc(file=sys.stderr)
            status, ctype, data = 500, "application/json", json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        self._reply(status, ctype, data, close=not body_read, headers=headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class ServingHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections handled at once (more get a 503 and are closed)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app: ServingApp):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self._connections = threading.BoundedSemaphore(app.options.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            body = json.dumps({"error": f"server busy: {self.app.options.max_connections} connections open "
                                        "(--max-connections); retry later"}).encode()
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(base: Union[str, Path], host: str = "127.0.0.1", port: int = 8501,
                options: Optional[ServeOptions] = None, **kwargs) -> ServingHTTPServer:
    """A ready (bound, models preloaded) server; run it with ``serve_forever()``, stop with ``shutdown()``.

    ``port=0`` picks a free port (see ``server.server_address``). Keyword arguments override ``options``.
    """
    options = options or ServeOptions()
    for k, v in kwargs.items():
        if not hasattr(options, k):
            raise TypeError(f"make_server: unknown option {k!r}")
        setattr(options, k, v)
    app = ServingApp(base, options)
    app.repo.preload(options.preload)
    return ServingHTTPServer((host, port), app)


# ------------------------------------------------------------------------------------------------ CLI
@click.command("serve")
@click.argument("model_base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; loopback by default. 0.0.0.0 opens it to the network (no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True, help="TCP port (0 = any free).")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=2, show_default=True,
              help="Model calls running at once.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a model slot; more get 503.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Connections handled at once; more get 503.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Request body limit in MiB; larger bodies get 413.")
@click.option("--preload", type=click.Choice(["latest", "all", "none"]), default="latest", show_default=True,
              help="Versions loaded at start (others load on their first request).")
@click.option("--tile", type=click.IntRange(min=32), default=None, help=":predict_tiff tile size [default: predict's].")
@click.option("--overlap", type=click.IntRange(min=0), default=None, help=":predict_tiff tile overlap [default: predict's].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help=":predict_tiff tiles per model call.")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def serve_command(model_base: Path, host: str, port: int, max_concurrent: int, max_queue: int, max_connections: int,
                  max_body_mb: float, preload: str, tile, overlap, batch, access_log: bool):
    """Serve the models of MODEL_BASE (MODEL_BASE/<name>/<version>/) over the TF Serving REST API.

    \b
    Endpoints:
      GET  /v1/models/<name>[/versions/<v>]             version status
      GET  /v1/models/<name>[/versions/<v>]/metadata    signatures + islkeras metadata
      POST /v1/models/<name>[/versions/<v>]:predict     {"instances": ...} or {"inputs": ...}
      POST /v1/models/<name>[/versions/<v>]:predict_tiff  TIFF bytes in, float32 TIFF out

    \b
    Examples:
      islkeras serve models/
      curl http://127.0.0.1:8501/v1/models/nuclei
      curl --data-binary @field.tif -o pred.tif http://127.0.0.1:8501/v1/models/nuclei:predict_tiff
    """
    from islkeras.errors import UserError
    from islkeras.utils import keep_large_buffers

    keep_large_buffers()  # MB-sized JSON/TIFF buffers from the heap, not fresh pages each request
    options = ServeOptions(max_concurrent=max_concurrent, max_queue=max_queue, max_connections=max_connections,
                           max_body_mb=max_body_mb, preload=preload, access_log=access_log, tile=tile,
                           overlap=overlap, batch=batch)
    t0 = time.monotonic()
    try:
        server = make_server(model_base, host, port, options)
    except HTTPError as e:
        raise UserError(e.message) from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    repo = server.app.repo
    if not repo.names():
        click.echo(f"warning: no models under {repo.base} yet (expected <name>/<version>/saved_model.pb); "
                   "new exports are picked up while serving", err=True)
    if host not in LOOPBACK:
        click.echo(f"warning: listening on {host}: reachable from other machines, without authentication", err=True)
    for name in repo.names():
        vs = repo.versions(name)
        click.echo(f"model {name}: versions {', '.join(map(str, sorted(vs)))} (newest {max(vs)} serves by default)",
                   err=True)
    click.echo(f"serving {repo.base} on {server.url} (ready in {time.monotonic() - t0:.1f} s; Ctrl-C stops)", err=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        click.echo("stopped", err=True)
