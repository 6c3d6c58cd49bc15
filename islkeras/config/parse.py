"""JSON -> typed dataclasses, generically: type conversion with key paths in errors, ``${VAR}`` paths, ``--set``."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

from islkeras.errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: JSON scalar types of the config: accepted Python types and their name in errors
_SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}


def expand_path(value: str, base_dir: Union[str, Path]) -> str:
    """Expand ``${VAR}``/``${VAR:-default}`` and ``~``, then resolve against base_dir."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if os.environ.get(var) is None and default is None:
            raise ConfigError(f"environment variable {var} is not set (used in path {value!r})")
        return os.environ.get(var, default)

    p = Path(os.path.expanduser(_ENV.sub(sub, value)))
    return str(Path(os.path.normpath(p if p.is_absolute() else Path(base_dir) / p)))


def _is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("internal"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Convert a JSON value to the annotated type, raising ConfigError with the key path."""
    origin = typing.get_origin(tp)
    where = f"{source}: {path}"
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed, expected {_type_name(tp)}")
        objects = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(objects) == 1:  # an object: its own error (unknown key...) is the one
            return _convert(value, objects[0], path, source)
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, source)
            except ConfigError:  # try the next type of the union
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)[:60]}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {json.dumps(value)} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {json.dumps(value)[:60]}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {json.dumps(value)[:60]}")
        if origin is not dict:
            return _from_dict(tp, value, path, source)
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{path}.{k}", source) for k, v in value.items()}
    if tp in _SCALARS:  # a bool is not accepted as a number
        types, what = _SCALARS[tp]
        if not isinstance(value, types) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{where}: expected {what}, got {json.dumps(value)[:60]}")
        return float(value) if tp is float else value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _from_dict(cls: type, data: dict, path: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not _is_internal(f)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(filter(None, [path, close[0]]))!r}?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key {'.'.join(filter(None, [path, key]))!r}{hint} "
                              f"(valid keys: {valid})")
    kwargs = {}
    for name, f in fields.items():
        sub = ".".join(filter(None, [path, name]))
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {sub!r}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not _is_internal(f)
                and not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def parse_set_option(items: typing.Iterable[str]) -> dict:
    """Parse CLI ``--set key.path=JSON`` items (a value that is not JSON is taken as a string)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
