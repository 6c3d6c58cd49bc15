"""The Open Inference Protocol (KServe V2), spoken by Triton, KServe and Seldon MLServer, on ``islkeras serve``.

The same models, versions, admission and model calls as the TF Serving routes (``ServingApp``); routes:

* ``GET  /v2`` -- server metadata (name, version, extensions); ``GET /v2/health/live``, ``/v2/health/ready``
  (200 once every model has a loaded version; else 503, and the newest versions start loading)
* ``GET  /v2/models/<name>[/versions/<v>]`` -- model metadata: platform ``tensorflow_savedmodel``, the
  ``serving_default`` signature's inputs and outputs as V2 tensors (``UINT8 [-1, -1, -1, 1]``)
* ``GET  /v2/models/<name>[/versions/<v>]/ready`` -- 200 when that version is loaded (else 503, and it
  starts loading in the background)
* ``POST /v2/models/<name>[/versions/<v>]/infer`` -- inputs as JSON ``data`` (flat or nested) or with the
  binary tensor data extension (``Inference-Header-Content-Length``: the JSON header, then each input's
  ``binary_data_size`` raw little-endian bytes); outputs as JSON or binary (``"binary_data": true`` on a
  requested output, or the request parameter ``binary_data_output``). Request parameter ``signature_name``
  selects the ``normalized`` signature (input ``x``, FP32). ``Content-Encoding: gzip``/``deflate`` bodies are
  accepted (tritonclient's ``request_compression_algorithm``).

Errors are the protocol's ``{"error": "<message>"}`` with a 4xx (bad input, unknown model/version), 503
(busy, not ready) or 500 (the model failed). The input checks are the TF Serving route's
(``protocol._check_and_cast``): rank and channels, integer ranges, finite floats.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from islkeras import __version__
from islkeras.serving.app import Reply, ServingApp, run_sync, server_timing
from islkeras.serving.protocol import (CALLABLE_SIGNATURES, DEFAULT_SIGNATURE, HTTPError, InputSpec, _check_and_cast,
                                       bad_request)
from islkeras.serving.repository import ModelVersion, _is_version

PLATFORM = "tensorflow_savedmodel"
EXTENSIONS = ["binary_tensor_data"]
#: TensorFlow DataType name -> V2 datatype (Triton's model config uses "TYPE_" + this, TYPE_STRING for BYTES)
TF_TO_V2 = {"DT_BOOL": "BOOL", "DT_UINT8": "UINT8", "DT_UINT16": "UINT16", "DT_UINT32": "UINT32",
            "DT_UINT64": "UINT64", "DT_INT8": "INT8", "DT_INT16": "INT16", "DT_INT32": "INT32", "DT_INT64": "INT64",
            "DT_HALF": "FP16", "DT_FLOAT": "FP32", "DT_DOUBLE": "FP64", "DT_BFLOAT16": "BF16", "DT_STRING": "BYTES"}
#: V2 datatype -> numpy dtype (the numeric ones a request may carry)
V2_NUMPY = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
            "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
            "FP32": "float32", "FP64": "float64"}
NUMPY_V2 = {v: k for k, v in V2_NUMPY.items()}


def v2_datatype(dtype: np.dtype) -> str:
    return NUMPY_V2[np.dtype(dtype).name]


def tensors_of(sigdef: dict, which: str) -> list[dict]:
    """A signature's inputs or outputs (``read_signature_defs`` form) as V2 metadata tensors."""
    return [{"name": name, "datatype": TF_TO_V2.get(info["dtype"], info["dtype"]),
             "shape": [int(d["size"]) for d in info["tensor_shape"]["dim"]]}
            for name, info in sigdef[which].items()]


# --------------------------------------------------------------------------------------------- request
@dataclass
class InferRequest:
    id: Optional[str]
    spec: InputSpec
    batch: np.ndarray
    binary_output: bool


def _obj(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _split_body(body: bytes, header_length: Optional[str]) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) by ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise bad_request(f"Inference-Header-Content-Length {header_length!r}: expected the JSON header's size in "
                          f"bytes, 1..{len(body)} (the body's size)")
    return body[:n], body[n:]


def decode_body(body: bytes, encoding: Optional[str], limit: int) -> bytes:
    """A ``Content-Encoding: gzip|deflate`` body decompressed, at most ``limit`` bytes (else 413)."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; expected gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad_request(f"request body is not valid {enc} data: {e}") from None
    if len(out) > limit:
        raise HTTPError(413, f"request body decompresses to more than the limit of {limit} bytes (--max-body-mb)")
    if not d.eof:
        raise bad_request(f"request body is truncated {enc} data")
    return out


def _loads(header: bytes):
    import orjson

    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError:
        pass  # the json module reads NaN/Infinity (rapidjson writes them) and says where the error is
    try:
        return json.loads(header)
    except UnicodeDecodeError as e:
        raise bad_request(f"inference request header is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"malformed JSON in the inference request: {e.msg} at line {e.lineno} column {e.colno}; "
                          'expected {"inputs": [{"name", "shape", "datatype", "data"}]}') from None


def _shape(inp: dict, name: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad_request(f"input {name!r}: \"shape\" must be a list of non-negative integers, got {shape!r}")
    return shape


def _tensor(inp: dict, spec: InputSpec, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One request input -> (array of its shape, new offset into the binary data)."""
    name = spec.name
    shape = _shape(inp, name)
    want = v2_datatype(spec.dtype)
    if inp.get("datatype") != want:
        raise bad_request(f"input {name!r}: datatype {inp.get('datatype')!r} does not match the model's {want} "
                          f"(input {name!r} is {want} {[-1 if s is None else s for s in spec.shape]})")
    params = _obj(inp.get("parameters", {}), f"input {name!r} parameters")
    if any(k.startswith("shared_memory") for k in params):
        raise bad_request(f"input {name!r}: shared memory is not supported here; send the data in the request")
    n = int(np.prod(shape, dtype=np.int64))
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if "data" in inp or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"input {name!r}: binary_data_size must be a byte count, without \"data\"")
        if size != n * spec.dtype.itemsize:
            raise bad_request(f"input {name!r}: binary_data_size {size} does not match shape {shape} of {want} "
                              f"({n * spec.dtype.itemsize} bytes)")
        if offset + size > len(binary):
            raise bad_request(f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes")
        arr = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype.newbyteorder("<")).reshape(shape)
        return arr.astype(spec.dtype, copy=False), offset + size
    if "data" not in inp:
        raise bad_request(f"input {name!r}: needs \"data\" (JSON) or parameters.binary_data_size (binary extension)")
    data = inp["data"]
    if not isinstance(data, list):
        raise bad_request(f"input {name!r}: \"data\" must be a list of numbers, got {type(data).__name__}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise bad_request(f"input {name!r}: \"data\" must be a flat or regular nested list of numbers") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == object:
        raise bad_request(f"input {name!r}: \"data\" must hold numbers for {want}, found {arr.dtype.kind!r} values "
                          "(strings, booleans, null or numbers too large)")
    if arr.size != n:
        raise bad_request(f"input {name!r}: shape {shape} has {n} elements, \"data\" has {arr.size}")
    return arr.reshape(shape), offset


def parse_infer_request(body: bytes, header_length: Optional[str], specs: dict[str, InputSpec],
                        multiple: int) -> InferRequest:
    header, binary = _split_body(body, header_length)
    req = _obj(_loads(header), "the inference request")
    params = _obj(req.get("parameters", {}), "request parameters")
    sig = params.get("signature_name", DEFAULT_SIGNATURE)
    if sig not in specs:
        raise bad_request(f"parameters.signature_name {sig!r} is not served; available: {', '.join(sorted(specs))}")
    spec = specs[sig]
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f'"inputs" must be a non-empty list of tensors; the model takes {spec.name!r} '
                          f"({v2_datatype(spec.dtype)} {[-1 if s is None else s for s in spec.shape]})")
    names = [_obj(i, "each input").get("name") for i in inputs]
    if names != [spec.name]:
        raise bad_request(f"inputs {names}: the model has exactly one input, {spec.name!r}")
    arr, offset = _tensor(inputs[0], spec, memoryview(binary), 0)
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size")
    arr = _check_and_cast(arr, spec, multiple if sig == "normalized" else None)
    binary_out = bool(params.get("binary_data_output", False))
    outputs = req.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not outputs:
            raise bad_request('"outputs" must be a non-empty list of {"name": ...} objects (or left out)')
        for o in outputs:
            o = _obj(o, "each requested output")
            if o.get("name") != spec.output:
                raise bad_request(f"requested output {o.get('name')!r}: the model's output is {spec.output!r}")
            oparams = _obj(o.get("parameters", {}), f"output {spec.output!r} parameters")
            if "classification" in oparams or any(k.startswith("shared_memory") for k in oparams):
                raise bad_request(f"output {spec.output!r}: classification and shared memory are not supported")
            binary_out = bool(oparams.get("binary_data", binary_out))
    rid = req.get("id")
    return InferRequest(rid if isinstance(rid, str) else None, spec, arr, binary_out)


def infer_response(name: str, mv: ModelVersion, req: InferRequest, y: np.ndarray) -> tuple[bytes, dict, str]:
    """(body, headers, content type) of an inference response, binary or JSON as requested."""
    from islkeras.serving.protocol import tensor_json

    y = np.asarray(y)
    out = {"name": req.spec.output, "datatype": v2_datatype(y.dtype), "shape": list(y.shape)}
    head = {"model_name": name, "model_version": str(mv.version)}
    if req.id is not None:
        head["id"] = req.id
    if req.binary_output:
        raw = np.ascontiguousarray(y, dtype=y.dtype.newbyteorder("<")).tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        header = json.dumps(dict(head, outputs=[out])).encode()
        return header + raw, {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"
    prefix = json.dumps(dict(head, outputs=[dict(out, data=0)])).encode()
    cut = prefix.rindex(b"0}]}")  # the data value, written from the numpy buffer
    return prefix[:cut] + tensor_json(y.reshape(-1)) + prefix[cut + 1:], {}, "application/json"


# ------------------------------------------------------------------------------------------------ routes
class KServeV2:
    """The V2 routes on a ``ServingApp`` (its repository, admission and model calls)."""

    def __init__(self, serving: ServingApp):
        self.serving, self.repo = serving, serving.repo

    @staticmethod
    def _json(status: int, obj) -> Reply:
        return Reply(status, "application/json", json.dumps(obj).encode())

    def _version(self, name: str, version: Optional[str]) -> ModelVersion:
        if version is not None and not _is_version(version):
            raise bad_request(f"model version {version!r}: expected a non-negative integer")
        return self.repo.get(name, None if version is None else int(version))

    async def server_metadata(self) -> Reply:
        return self._json(200, {"name": "islkeras", "version": __version__, "extensions": EXTENSIONS})

    async def live(self) -> Reply:
        return self._json(200, {"live": True})

    async def ready(self) -> Reply:
        def check():
            self.repo.refresh()
            waiting = []
            for n in self.repo.names():
                vs = self.repo.versions(n)
                if not any(mv.loaded for mv in vs.values()):
                    newest = vs[max(vs)]
                    newest.load_in_background()
                    waiting.append(f"{n} ({ServingApp.version_state(newest)[0]})")
            return waiting

        waiting = await run_sync(check)
        if waiting:
            return self._json(503, {"ready": False, "error": f"models not loaded yet: {', '.join(waiting)}"})
        return self._json(200, {"ready": True})

    async def model_metadata(self, name: str, version: Optional[str]) -> Reply:
        def meta():
            mv = self._version(name, version)
            mv.get()
            sig = mv.sigdefs[DEFAULT_SIGNATURE]
            versions = [str(mv.version)] if version is not None else \
                [str(v) for v in sorted(self.repo.versions(name), reverse=True)]
            return {"name": name, "versions": versions, "platform": PLATFORM,
                    "inputs": tensors_of(sig, "inputs"), "outputs": tensors_of(sig, "outputs")}

        return self._json(200, await run_sync(meta))

    async def model_ready(self, name: str, version: Optional[str]) -> Reply:
        mv = await run_sync(self._version, name, version)
        if mv.loaded:
            return self._json(200, {"name": name, "ready": True})
        mv.load_in_background()
        state, _, msg = ServingApp.version_state(mv)
        return self._json(503, {"name": name, "ready": False,
                                "error": f"model {name} version {mv.version} is not ready: {state} {msg}".strip()})

    async def infer(self, name: str, version: Optional[str], body: bytes, header_length: Optional[str]) -> Reply:
        def parse():
            mv = self._version(name, version)
            model = mv.get()
            t = time.perf_counter()
            req = parse_infer_request(body, header_length, mv.specs, int(model.meta.get("multiple", 32)))
            return mv, req, getattr(model, CALLABLE_SIGNATURES[req.spec.signature]), time.perf_counter() - t

        mv, req, fn, t_parse = await run_sync(parse)
        y, t_queue, t_model = await self.serving.call_model(mv, fn, req.batch)
        t = time.perf_counter()
        data, headers, ctype = await run_sync(infer_response, name, mv, req, y)
        headers.update(server_timing(parse=t_parse, queue=t_queue, model=t_model, encode=time.perf_counter() - t))
        return Reply(200, ctype, data, headers)
