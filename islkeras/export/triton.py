"""``islkeras export --format triton``: a run's SavedModel as a Triton Inference Server model repository entry.

Layout (what ``tritonserver --model-repository OUT`` loads)::

    OUT/<name>/config.pbtxt                       platform "tensorflow_savedmodel", inputs/outputs
    OUT/<name>/<version>/model.savedmodel/        the run's SavedModel (saved_model.pb, variables/, assets/)

``config.pbtxt`` declares the ``serving_default`` signature as the SavedModel holds it (read from
``saved_model.pb``): input ``image`` of the training input's dtype, output ``prediction`` (FP32), both with
dims ``[-1, -1, -1, C]`` and ``max_batch_size: 0`` -- the batch is the first dim, and height and width are
free, because normalisation and padding to a multiple of 32 happen inside the graph (Triton's dynamic
batcher could only batch images of one size). ``TF_SIGNATURE_DEF`` names the signature. A later export of
the same model adds a version folder and keeps an existing ``config.pbtxt`` (your edits: instance groups,
``version_policy``...) as long as it declares the same tensors; a different signature is refused unless
``--overwrite``. Every version folder appears whole (written under a temporary name, then renamed).

Triton's TensorFlow backend ships in the ``nvcr.io/nvidia/tritonserver:<yy.mm>-py3`` images up to 25.02
(deprecated from 25.03). ``islkeras serve OUT`` serves the same folder over the same protocol (KServe V2).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional, Union

from islkeras import __version__
from islkeras.errors import UserError
from islkeras.export.serving import model_name, run_config_info, version_dir

SIGNATURE = "serving_default"
PLATFORM = "tensorflow_savedmodel"
SAVEDMODEL_DIR = "model.savedmodel"
#: TensorFlow DataType name -> Triton model config data type
TF_TO_TRITON = {"DT_BOOL": "TYPE_BOOL", "DT_UINT8": "TYPE_UINT8", "DT_UINT16": "TYPE_UINT16",
                "DT_UINT32": "TYPE_UINT32", "DT_UINT64": "TYPE_UINT64", "DT_INT8": "TYPE_INT8",
                "DT_INT16": "TYPE_INT16", "DT_INT32": "TYPE_INT32", "DT_INT64": "TYPE_INT64", "DT_HALF": "TYPE_FP16",
                "DT_FLOAT": "TYPE_FP32", "DT_DOUBLE": "TYPE_FP64", "DT_BFLOAT16": "TYPE_BF16",
                "DT_STRING": "TYPE_STRING"}


def signature_tensors(savedmodel: Union[str, Path], signature: str = SIGNATURE) -> tuple[list, list]:
    """``(inputs, outputs)`` of a signature of the ``serve`` MetaGraph: lists of (name, TF dtype, dims)."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(savedmodel) / "saved_model.pb").read_bytes())
    graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags] or list(sm.meta_graphs)
    if not graphs or signature not in graphs[0].signature_def:
        raise UserError(f"{savedmodel}: SavedModel has no {signature!r} signature to serve")
    sig = graphs[0].signature_def[signature]

    def tensors(infos):
        return [(name, types_pb2.DataType.Name(info.dtype), [int(d.size) for d in info.tensor_shape.dim])
                for name, info in sorted(infos.items())]

    return tensors(sig.inputs), tensors(sig.outputs)


def _io_block(inputs: list, outputs: list) -> str:
    def block(key, tensors):
        items = []
        for name, dtype, dims in tensors:
            if dtype not in TF_TO_TRITON:
                raise UserError(f"tensor {name!r}: TensorFlow dtype {dtype} has no Triton data type")
            items.append(f'  {{\n    name: "{name}"\n    data_type: {TF_TO_TRITON[dtype]}\n'
                         f'    dims: [ {", ".join(map(str, dims))} ]\n  }}')
        return f"{key} [\n" + ",\n".join(items) + "\n]\n"

    return block("input", inputs) + block("output", outputs)


def config_pbtxt(name: str, inputs: list, outputs: list, meta: dict) -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    what = "probabilities" if meta.get("kind") == "segmentation" else "predictions on the target's intensity scale"
    return (f"# Triton model configuration, written by islkeras {__version__} (islkeras export --format triton).\n"
            f"# serving_default: raw {meta.get('input_dtype', '')} images, NHWC, any height and width -> float32\n"
            f"# {what}; normalisation and padding happen inside the graph.\n"
            f'name: "{name}"\nplatform: "{PLATFORM}"\nmax_batch_size: 0\n'
            + _io_block(inputs, outputs) +
            f'parameters: {{\n  key: "TF_SIGNATURE_DEF"\n  value: {{ string_value: "{SIGNATURE}" }}\n}}\n'
            "# Triton serves the newest version; to serve every exported version, add:\n"
            "# version_policy: { all { } }\n")


def _squash(text: str) -> str:
    """pbtxt without comments and whitespace (to compare declarations however they are laid out)."""
    return re.sub(r"\s+", "", re.sub(r"#[^\n]*", "", text))


def triton_commands(repo: Union[str, Path], name: str, http_port: int = 8000) -> dict[str, str]:
    """Shell commands that serve and query the repository (absolute paths)."""
    base, q = Path(repo).resolve(), shlex.quote
    url = f"http://127.0.0.1:{http_port}/v2/models/{name}"
    client = ("import numpy as np, tritonclient.http as t; c = t.InferenceServerClient('127.0.0.1:%d'); "
              "x = t.InferInput('image', [1, 512, 512, 1], 'UINT8'); "
              "x.set_data_from_numpy(np.zeros((1, 512, 512, 1), np.uint8)); "
              "print(c.infer('%s', [x]).as_numpy('prediction').shape)" % (http_port, name))
    return {
        "tritonserver": f"tritonserver --model-repository={q(str(base))}",
        "docker": (f"docker run --rm -p 127.0.0.1:{http_port}:8000 -v {q(str(base))}:/models "
                   "nvcr.io/nvidia/tritonserver:25.02-py3 tritonserver --model-repository=/models"),
        "islkeras serve": f"islkeras serve {q(str(base))} --port {http_port}",
        "curl": f"curl {url}",
        "tritonclient": f"python -c {q(client)}",
    }


def export(run_dir: Union[str, Path], out: Union[str, Path], name: Optional[str] = None,
           version: Optional[int] = None, overwrite: bool = False) -> tuple[Path, str]:
    """Add the run's SavedModel to the Triton model repository ``out``; returns (version folder, message)."""
    from islkeras.models.savedmodel import copy_savedmodel, find_savedmodel, read_meta
    from islkeras.utils import atomic_dir, atomic_write_text

    run_dir, out = Path(run_dir), Path(out)
    src = find_savedmodel(run_dir)
    meta = read_meta(src)
    info = run_config_info(run_dir) or run_config_info(src.parent)
    name = model_name(run_dir, src, meta, name)
    model_dir = out / name
    version, dst = version_dir(model_dir, version, overwrite, lowest=1, rule="Triton versions are positive integers")
    inputs, outputs = signature_tensors(src)
    config, cfg_file = config_pbtxt(name, inputs, outputs, meta), model_dir / "config.pbtxt"
    if cfg_file.is_file() and not overwrite:
        have = cfg_file.read_text()
        if _squash(_io_block(inputs, outputs)) not in _squash(have) or f'name:"{name}"' not in _squash(have):
            mine = ", ".join(f"{n} {TF_TO_TRITON.get(d, d)} {dims}" for n, d, dims in inputs + outputs)
            raise UserError(f"{cfg_file} does not declare this run's SavedModel tensors ({mine}) for model {name!r}; "
                            "export under another --name, or --overwrite to replace the configuration")
    else:
        atomic_write_text(cfg_file, config)
    extra = {"model_name": name, "model_version": version}
    if info is not None:
        extra.update(config_name=info["name"], config_hash=info["hash"])
    with atomic_dir(dst) as tmp:
        copy_savedmodel(src, tmp / SAVEDMODEL_DIR, extra_meta=extra)
    cmds = triton_commands(out, name)
    message = "\n".join([
        f"exported {name} version {version} -> {dst / SAVEDMODEL_DIR}",
        f"  (Triton model repository {out.resolve()}; model configuration {cfg_file})",
        "", "Serve with Triton (its TensorFlow backend: images up to 25.02; HTTP on port 8000):",
        "  " + cmds["tritonserver"], "  or with docker:", "  " + cmds["docker"],
        "Serve without Triton (the same KServe V2 protocol, plus TF Serving's REST API):",
        "  " + cmds["islkeras serve"],
        "Then:", "  " + cmds["curl"], "  " + cmds["tritonclient"],
    ])
    return dst, message
