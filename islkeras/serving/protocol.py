"""The TF Serving REST wire format: error replies, the signatures' inputs, JSON bodies <-> tensors.

``HTTPError``/``bad_request`` are the error replies (status + ``{"error": ...}`` message) every part of the
server raises; ``read_signature_defs``/``InputSpec`` describe a SavedModel's signatures as TF Serving shows
them; ``parse_predict_request`` turns a ``:predict`` body (row or columnar, with a numpy fast path) into a
batch and ``tensor_json`` writes the reply tensor. Nothing here knows about HTTP connections.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

DEFAULT_SIGNATURE = "serving_default"
#: signatures of an islkeras SavedModel that the predict route can call, -> ExportedModel method
CALLABLE_SIGNATURES = {"serving_default": "predict_raw", "normalized": "predict_normalized"}


# ------------------------------------------------------------------------------------------------ errors
class HTTPError(Exception):
    """An error reply: ``status`` and the message that goes into ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def bad_request(msg: str) -> HTTPError:
    return HTTPError(400, msg)


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
    elif dt.kind == "f" and arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():  # a NaN/Infinity image would come back as NaN predictions with a 200
            bad = np.argwhere(~finite)[0].tolist()
            raise bad_request(f"input {spec.name!r} is {dt.name}: expected finite numbers, got {arr[tuple(bad)]} at "
                              f"index {bad}")
        if dt.itemsize < arr.dtype.itemsize and (np.abs(arr) > np.finfo(dt).max).any():
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
