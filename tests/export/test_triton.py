"""``islkeras export --format triton``: a Triton model repository whose ``config.pbtxt`` (parsed back with
Triton's own ``ModelConfig`` proto) matches the SavedModel signature, and which ``islkeras serve`` answers
over the KServe V2 protocol like the SavedModel in-process."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner

from islkeras.cli import cli
from testkit import export_tiny, make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders of `islkeras fit` (tiny U-Nets): one input channel, and three."""
    tmp = tmp_path_factory.mktemp("triton")
    one = make_run(tmp / "runs" / "tiny_aiseg" / "20250101-120000", tmp,
                   savedmodel_src=export_tiny(tmp / "sm1", n_in=1))
    three = make_run(tmp / "runs" / "tiny_aiseg" / "20250102-120000", tmp,
                     savedmodel_src=export_tiny(tmp / "sm3", n_in=3, meta={
                         "kind": "isl", "inputs": ["a", "b", "c"], "targets": ["nuclei"], "input_dtype": "uint16",
                         "normalization": {"method": "zscore", "percentiles": [1.0, 99.8]},
                         "target_scale": {"offset": [20.0], "scale": [30.0]}}))
    return one, three


def _config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_command_writes_a_model_repository(runs, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    from islkeras.models.savedmodel import read_meta
    from islkeras.serving.protocol import read_signature_defs

    one, three = runs
    repo = tmp_path / "triton"
    res = CliRunner().invoke(cli, ["export", str(one), "--format", "triton", "--out", str(repo)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sm = repo / "tiny_aiseg" / "1" / "model.savedmodel"
    assert (sm / "saved_model.pb").is_file() and (sm / "variables").is_dir()
    for words in (f"-> {sm}", f"tritonserver --model-repository={repo}", "nvcr.io/nvidia/tritonserver",
                  "curl http://127.0.0.1:8000/v2/models/tiny_aiseg", "tritonclient", "islkeras serve"):
        assert words in res.output, (words, res.output)
    cfg = _config(repo / "tiny_aiseg" / "config.pbtxt")
    assert cfg.name == "tiny_aiseg" and cfg.platform == "tensorflow_savedmodel" and cfg.max_batch_size == 0
    assert cfg.parameters["TF_SIGNATURE_DEF"].string_value == "serving_default"
    sig = read_signature_defs(sm)["serving_default"]  # what the SavedModel really declares
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == \
        [(n, "TYPE_UINT8", [-1, -1, -1, 1]) for n in sig["inputs"]] == [("image", "TYPE_UINT8", [-1, -1, -1, 1])]
    assert sig["inputs"]["image"]["dtype"] == "DT_UINT8"
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output] == \
        [("prediction", "TYPE_FP32", [-1, -1, -1, 1])]
    assert [int(d["size"]) for d in sig["outputs"]["prediction"]["tensor_shape"]["dim"]] == [-1, -1, -1, 1]
    meta = read_meta(sm)
    assert meta["model_name"] == "tiny_aiseg" and meta["model_version"] == 1 and meta["config_name"] == "tiny_aiseg"

    # a second export: version 2, the (possibly hand-edited) configuration kept
    edited = (repo / "tiny_aiseg" / "config.pbtxt").read_text() + "version_policy: { all { } }\n"
    (repo / "tiny_aiseg" / "config.pbtxt").write_text(edited)
    res = CliRunner().invoke(cli, ["export", str(one), "--format", "triton", "--out", str(repo)])
    assert res.exit_code == 0, res.output
    assert (repo / "tiny_aiseg" / "2" / "model.savedmodel" / "saved_model.pb").is_file()
    assert (repo / "tiny_aiseg" / "config.pbtxt").read_text() == edited
    assert _config(repo / "tiny_aiseg" / "config.pbtxt").version_policy.HasField("all")
    # an existing version, then a run with other tensors under the same name: refused, nothing written
    res = CliRunner().invoke(cli, ["export", str(one), "--format", "triton", "--out", str(repo), "--version", "1"])
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(cli, ["export", str(three), "--format", "triton", "--out", str(repo)])
    assert res.exit_code == 1, res.output
    assert "does not declare this run's SavedModel tensors (image TYPE_UINT16 [-1, -1, -1, 3]" in res.output
    assert sorted(p.name for p in (repo / "tiny_aiseg").iterdir()) == ["1", "2", "config.pbtxt"]


def test_export_function_and_serving_the_repository(runs, tmp_path):
    """``export()`` directly (name, version); ``islkeras serve`` on the repository answers tritonclient's
    metadata and infer like the SavedModel in-process, with the tensors config.pbtxt declares."""
    tc = pytest.importorskip("tritonclient.http")
    from islkeras.export.triton import export
    from islkeras.models.savedmodel import ExportedModel
    from islkeras.serving.http import make_server

    _, three = runs
    repo = tmp_path / "triton"
    dst, message = export(three, repo, name="nuclei3", version=4)
    assert dst == repo / "nuclei3" / "4" and f"exported nuclei3 version 4 -> {dst / 'model.savedmodel'}" in message
    with pytest.raises(Exception, match="positive integers"):
        export(three, repo, name="nuclei3", version=0)
    cfg = _config(repo / "nuclei3" / "config.pbtxt")

    srv = make_server(repo, "127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    client = tc.InferenceServerClient("%s:%d" % srv.server_address[:2])
    try:
        meta = client.get_model_metadata("nuclei3")
        assert meta["versions"] == ["4"]
        from tritonclient.grpc import model_config_pb2 as mc

        assert [(t["name"], "TYPE_" + t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]] == \
            [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in list(cfg.input) + list(cfg.output)]
        x = np.random.default_rng(0).integers(0, 65536, (1, 40, 50, 3), dtype=np.uint16)
        inp = tc.InferInput("image", list(x.shape), "UINT16")
        inp.set_data_from_numpy(x)
        got = client.infer("nuclei3", [inp]).as_numpy("prediction")
        model = srv.app.repo.get("nuclei3").get()  # the SavedModel the server loaded, called in-process
        assert isinstance(model, ExportedModel) and model.path.resolve() == (dst / "model.savedmodel").resolve()
        want = model.predict_raw(x)
        assert got.shape == (1, 40, 50, 1) and np.max(np.abs(got - want)) < 1e-5
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()
        th.join(10)
