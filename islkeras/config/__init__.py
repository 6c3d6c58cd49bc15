"""Experiment configuration: one JSON file -> typed, validated dataclasses.

Every section is a dataclass; unknown or misspelt keys are rejected with the file, the key path and the
closest valid key. Paths are resolved against the config file's folder after expanding environment
variables written as ``${VAR}`` or ``${VAR:-default}`` (the shipped configs use
``${ISLKERAS_DATA:-../../shared/data}`` so the data root can be moved with one variable).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from islkeras.config.parse import expand_path, parse_set_option, to_dict  # noqa: F401  (public API)
from islkeras.config.parse import _from_dict
from islkeras.config.sections import *  # noqa: F401,F403  (public API)
from islkeras.config.sections import ExperimentConfig
from islkeras.config.validate import resolve_paths, validate
from islkeras.errors import ConfigError  # noqa: F401  (re-exported)


def from_dict(data: dict, base_dir: Union[str, Path] = ".", source: str = "<dict>",
              overrides: Optional[dict] = None) -> ExperimentConfig:
    """Build a validated config from a dict. ``overrides`` maps dotted keys to values (CLI ``--set``)."""
    data = json.loads(json.dumps(data))  # deep copy, JSON types only
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    for dotted, value in (overrides or {}).items():
        node, *parents, last = [data, *dotted.split(".")]
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                at = ".".join(parents[:i + 1])
                raise ConfigError(f"--set {dotted}: {at} is {json.dumps(node)[:40]} in {source}, not an object; "
                                  f"set {at} as a whole, e.g. --set '{at}={{\"{last}\": ...}}'")
        node[last] = value
    cfg = _from_dict(ExperimentConfig, data, "", source)
    cfg.base_dir = str(Path(base_dir).resolve())
    cfg.source = source
    resolve_paths(cfg)
    validate(cfg)
    return cfg


def load_config(path: Union[str, Path], overrides: Optional[dict] = None,
                data_root: Optional[str] = None) -> ExperimentConfig:
    """Read, parse and validate an experiment JSON file.

    ``data_root`` (CLI ``--data-root``) replaces ``data.root``; ``overrides`` maps dotted keys to values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    overrides = dict(overrides or {})
    if data_root is not None:
        overrides["data.root"] = str(Path(data_root).resolve())
    return from_dict(data, base_dir=path.parent, source=str(path), overrides=overrides)


