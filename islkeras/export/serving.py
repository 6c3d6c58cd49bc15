"""``islkeras export --format tfserving``: a run's SavedModel -> ``MODEL_BASE/<name>/<version>/`` (TF Serving's layout).

The SavedModel written by ``fit``/``transfer`` (see ``islkeras.models.savedmodel``) already carries the
``serving_default`` signature (raw images in, float32 predictions out on the target's scale) and the
``assets/islkeras.json`` metadata; exporting copies it atomically into a numbered version folder and adds
the run's config name and hash to the metadata. The same folder is served by
``tensorflow_model_server`` / the ``tensorflow/serving`` docker image and by ``islkeras serve``.

No TensorFlow import here: copying and reading JSON is all it takes.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Optional, Union

import click

from islkeras.errors import UserError

#: TF Serving model names end up in URLs (``/v1/models/<name>``): keep them to a URL-safe alphabet
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def existing_versions(model_dir: Union[str, Path]) -> list[int]:
    """Numeric version folders of ``model_dir`` (TF Serving ignores anything else), ascending."""
    d = Path(model_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def next_version(model_dir: Union[str, Path]) -> int:
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def run_config_info(run_dir: Union[str, Path]) -> Optional[dict]:
    """``{"name", "hash"}`` of a run folder's ``config.json`` (None when ``run_dir`` is a bare SavedModel).

    The hash is ``ExperimentConfig.hash()`` of the resolved config the run saved: sha256 of its JSON with
    sorted keys (``config.json`` is ``cfg.to_dict()``), first 16 hex digits.
    """
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: not a readable run config ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise UserError(f"{f}: run config lacks a 'name'")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": data["name"], "hash": digest}


def model_name(run_dir: Path, src: Path, meta: dict, name: Optional[str] = None) -> str:
    """The served model's name: ``name``, else the run config's name, else the SavedModel metadata's; checked
    against ``NAME_RE`` (it becomes part of the URL). Shared by the TF Serving and Triton layouts."""
    if name is None:
        info = run_config_info(run_dir) or run_config_info(src.parent)
        name = info["name"] if info is not None else (meta.get("config_name") or meta.get("name")
                                                      or meta.get("model_name"))
        if not name:
            raise UserError(f"{run_dir}: no config.json beside the SavedModel (nor a name in its metadata) to take "
                            "the model name from; pass --name")
    if not NAME_RE.match(name):
        raise UserError(f"model name {name!r}: use letters, digits, '_', '.', '-' (it becomes part of the URL)")
    return name


def version_dir(model_dir: Path, version: Optional[int], overwrite: bool, lowest: int = 0,
                rule: str = "versions are non-negative integers") -> tuple[int, Path]:
    """``(version, model_dir/<version>)``: ``version`` or the next free one; an existing version folder is an
    error unless ``overwrite``. Shared by the TF Serving and Triton layouts (Triton: ``lowest`` 1)."""
    version = next_version(model_dir) if version is None else version
    if version < lowest:
        raise UserError(f"--version {version}: {rule}")
    dst = model_dir / str(version)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists (versions there: {existing_versions(model_dir)}); "
                        "pass another --version, or --overwrite to replace it")
    return version, dst


def export_model(run_dir: Union[str, Path], model_base: Union[str, Path], name: Optional[str] = None,
                 version: Optional[int] = None, overwrite: bool = False) -> Path:
    """Copy the run's SavedModel to ``model_base/<name>/<version>/`` and return that folder.

    ``name`` defaults to the run config's name, ``version`` to the highest existing version + 1 (1 for a
    new model). An existing version is only replaced with ``overwrite``.
    """
    from islkeras.models.savedmodel import copy_savedmodel, find_savedmodel, read_meta

    run_dir = Path(run_dir)
    src = find_savedmodel(run_dir)
    meta = read_meta(src)
    info = run_config_info(run_dir) or run_config_info(src.parent)
    name = model_name(run_dir, src, meta, name)
    model_dir = Path(model_base) / name
    version, dst = version_dir(model_dir, version, overwrite)
    if src.resolve() == dst.resolve():
        raise UserError(f"{src} is already {dst}")
    extra = {"model_name": name, "model_version": version}
    if info is not None:
        if meta.get("config_hash") not in (None, info["hash"]):
            click.echo(f"warning: {src} metadata says config_hash {meta['config_hash']}, the run's config.json "
                       f"hashes to {info['hash']}; keeping the run's", err=True)
        extra.update(config_name=info["name"], config_hash=info["hash"])
    return copy_savedmodel(src, dst, extra_meta=extra)


def serving_commands(model_base: Union[str, Path], name: str, version: int, port: int = 8501) -> dict[str, str]:
    """Shell commands that inspect and serve ``model_base/<name>/<version>/`` (absolute paths)."""
    base = Path(model_base).resolve()
    mdir = base / name
    q = shlex.quote
    return {
        "inspect": f"saved_model_cli show --all --dir {q(str(mdir / str(version)))}",
        "tensorflow_model_server": (f"tensorflow_model_server --rest_api_port={port} --model_name={q(name)} "
                                    f"--model_base_path={q(str(mdir))}"),
        "docker": (f"docker run --rm -p {port}:8501 -v {q(str(mdir))}:/models/{q(name)} "
                   f"-e MODEL_NAME={q(name)} tensorflow/serving"),
        "islkeras serve": f"islkeras serve {q(str(base))} --port {port}",
        "curl": f"curl http://127.0.0.1:{port}/v1/models/{q(name)}",
    }


def export(run_dir: Union[str, Path], out: Union[str, Path], name: Optional[str] = None,
           version: Optional[int] = None, overwrite: bool = False) -> tuple[Path, str]:
    """``islkeras export --format tfserving``: :func:`export_model` plus what to run next (the message)."""
    dst = export_model(run_dir, out, name=name, version=version, overwrite=overwrite)
    name, version = dst.parent.name, int(dst.name)
    cmds = serving_commands(out, name, version)
    message = "\n".join([
        f"exported {name} version {version} -> {dst}",
        "", "Inspect the signatures:\n  " + cmds["inspect"],
        "Serve with TensorFlow Serving (REST on port 8501):\n  " + cmds["tensorflow_model_server"],
        "  or with docker:\n  " + cmds["docker"],
        "Serve without TensorFlow Serving (all models under the base folder):\n  " + cmds["islkeras serve"],
        "Then:\n  " + cmds["curl"],
    ])
    return dst, message
