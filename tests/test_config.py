"""Experiment configs: typed parsing, validation with helpful messages, path resolution."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from islkeras.config import ConfigError, expand_path, from_dict, load_config

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.json"))


def _demo(tmp_path: Path) -> dict:
    return json.loads((Path(__file__).resolve().parents[1] / "experiments" / "demo.json").read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path, monkeypatch):
    # Thesis configs point at user data folders that do not exist here; parsing must still work.
    cfg = load_config(path)
    assert cfg.name and cfg.data.inputs
    assert Path(cfg.data.root).is_absolute() and Path(cfg.training.runs_dir).is_absolute()


def test_misspelt_key_names_file_path_and_closest_key(tmp_path):
    d = _demo(tmp_path)
    d["training"]["learnig_rate"] = 0.1
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg and "training.learnig_rate" in msg and "training.learning_rate" in msg


def test_wrong_types_and_literals_are_rejected(tmp_path):
    d = _demo(tmp_path)
    d["loss"]["kind"] = "perceptul"
    with pytest.raises(ConfigError, match=r"loss.kind.*did you mean 'perceptual'"):
        from_dict(d, tmp_path, "x.json")
    d = _demo(tmp_path)
    d["training"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match="training.epochs: expected an integer"):
        from_dict(d, tmp_path, "x.json")
    d = _demo(tmp_path)
    d["data"]["targets"] = ["nucleii"]
    with pytest.raises(ConfigError, match=r"data.targets\[0\].*'nucleii'.*did you mean 'nuclei'"):
        from_dict(d, tmp_path, "x.json")


def test_split_and_pipeline_validation(tmp_path):
    d = _demo(tmp_path)
    d["data"]["split"] = {"fractions": {"train": 0.5, "val": 0.2}}
    with pytest.raises(ConfigError, match="sum to 1"):
        from_dict(d, tmp_path, "x.json")
    d["data"]["split"] = {"csv": "fields.csv"}
    with pytest.raises(ConfigError, match="fields.csv:column"):
        from_dict(d, tmp_path, "x.json")
    d = _demo(tmp_path)
    d["pipeline"]["crop_size"] = 100
    with pytest.raises(ConfigError, match="multiple of 32"):
        from_dict(d, tmp_path, "x.json")
    d = _demo(tmp_path)
    d["pipeline"]["percentiles"] = [1.0, 99.7]
    with pytest.raises(ConfigError, match="stored percentiles"):
        from_dict(d, tmp_path, "x.json")
    d = _demo(tmp_path)
    d["data"]["split"] = {"fractions": {"train": 1.0}}
    d["pipeline"]["balance_by"] = "stratum"
    with pytest.raises(ConfigError, match="balance_by 'stratum' names a column of the split CSV"):
        from_dict(d, tmp_path, "x.json")


def test_set_through_null_or_scalar_and_non_object_top_level_are_one_line_errors(tmp_path):
    from islkeras.config import parse_set_option

    d = _demo(tmp_path)
    d["training"]["early_stopping"] = None
    f = tmp_path / "c.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides=parse_set_option(["training.early_stopping.patience=5"]))
    assert str(e.value) == (f"--set training.early_stopping.patience: training.early_stopping is null in {f}, not an "
                            "object; set training.early_stopping as a whole, e.g. --set "
                            "'training.early_stopping={\"patience\": ...}'")
    with pytest.raises(ConfigError, match=r"^--set data.root.x: data.root is \"\.\./demo/data\" in .*, not an object"):
        load_config(f, overrides={"data.root.x": 1})
    # the whole object works, and re-enables early stopping
    cfg = load_config(f, overrides=parse_set_option(['training.early_stopping={"patience": 5}']))
    assert cfg.training.early_stopping.patience == 5 and cfg.training.early_stopping.monitor == "val_pcc"
    f.write_text(json.dumps([d]))
    with pytest.raises(ConfigError, match=f"^{f}: the top level must be a JSON object$"):
        load_config(f, data_root=str(tmp_path))


def test_missing_weights_file_fails_at_load(tmp_path):
    d = _demo(tmp_path)
    d["model"] = {"architecture": "unet_sm", "encoder_weights": "nowhere/densenet.h5"}
    with pytest.raises(ConfigError, match="no weights file at .*nowhere/densenet.h5"):
        from_dict(d, tmp_path, "x.json")


def test_relative_paths_resolve_against_config_folder_and_env(tmp_path, monkeypatch):
    sub = tmp_path / "exp"
    sub.mkdir()
    d = _demo(tmp_path)
    d["data"]["root"] = "${MY_DATA:-../data}/set"
    f = sub / "c.json"
    f.write_text(json.dumps(d))
    monkeypatch.delenv("MY_DATA", raising=False)
    assert load_config(f).data.root == str(tmp_path / "data" / "set")
    monkeypatch.setenv("MY_DATA", "/elsewhere")
    assert load_config(f).data.root == "/elsewhere/set"
    assert load_config(f, data_root=str(tmp_path / "x")).data.root == str(tmp_path / "x")
    with pytest.raises(ConfigError, match="NOT_SET_VAR"):
        expand_path("${NOT_SET_VAR}/a", tmp_path)


def test_roundtrip_saved_config_is_equal(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "aiseg_nuclei_l1.json")
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again.to_dict() == cfg.to_dict() and again.hash() == cfg.hash()


def test_keras3_already_imported_gives_one_line_error():
    code = "import tensorflow as tf; tf.keras.layers; import islkeras"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_USE_LEGACY_KERAS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    assert "tf-keras" in p.stderr and "import islkeras before tensorflow" in p.stderr


def test_import_selects_legacy_keras():
    code = ("import islkeras, os, tensorflow as tf; "
            "print(os.environ['TF_USE_LEGACY_KERAS'], os.environ['SM_FRAMEWORK'], tf.keras.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "tf.keras", "tf_keras.api._v2.keras"]


def test_config_channel_and_time_keys(tmp_path):
    base = {"name": "c", "data": {"root": "d", "inputs": ["bf"], "targets": ["bf"],
                                  "channels": {"bf": {"file": "{field}.czi", "channel": "TL", "time": 2}}}}
    cfg = from_dict(base, tmp_path, "c.json")
    assert (cfg.data.channels["bf"].channel, cfg.data.channels["bf"].time) == ("TL", 2)
    assert cfg.to_dict()["data"]["channels"]["bf"] == {"file": "{field}.czi", "planes": "all", "projection": "none",
                                                       "channel": "TL", "time": 2}
    base["data"]["channels"]["bf"] = {"file": "x.tif", "channel": 1}
    assert from_dict(base, tmp_path, "c.json").data.channels["bf"].channel == 1
    # unset keys are left out of the saved config, so configs written before them keep their hashes
    base["data"]["channels"]["bf"] = {"file": "x.tif"}
    assert from_dict(base, tmp_path, "c.json").to_dict()["data"]["channels"]["bf"] == {
        "file": "x.tif", "planes": "all", "projection": "none"}
    for bad, match in (({"chanel": "TL"}, r"unknown key 'data.channels.bf.chanel'; did you mean "
                                          r"'data.channels.bf.channel'"),
                       ({"time": -1}, r"data.channels.bf: time and a channel index must be >= 0"),
                       ({"channel": -2}, r"data.channels.bf: time and a channel index must be >= 0"),
                       ({"channel": ["a"]}, r"data.channels.bf.channel: expected str or int or null"),
                       ({"time": "1"}, r"data.channels.bf.time: expected an integer")):
        base["data"]["channels"]["bf"] = dict({"file": "x.tif"}, **bad)
        with pytest.raises(ConfigError, match=match):
            from_dict(base, tmp_path, "c.json")
