"""`islkeras predict --workers N / --dask ADDRESS` (islkeras.inference.distributed): fields on a Dask cluster
of worker processes on 127.0.0.1, against the serial path; a worker killed mid-write; bad addresses."""
from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest

from testkit import export_tiny, require_extra

pytestmark = pytest.mark.dask

GOOD = [f"f{i}" for i in range(4)]


@pytest.fixture(autouse=True)
def _dask_installed():
    require_extra("dask", "distributed")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny SavedModel, 4 synthetic 96x96 fields and a corrupt TIFF; the serial CLI's outputs."""
    import tifffile
    from click.testing import CliRunner

    from islkeras.cli import cli

    base = tmp_path_factory.mktemp("dask")
    model = export_tiny(base / "savedmodel")
    src = base / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in GOOD:
        tifffile.imwrite(src / f"{name}.tif", rng.integers(0, 255, (96, 96), dtype=np.uint8))
    (src / "broken.tif").write_bytes(b"II*\x00garbage")
    res = CliRunner().invoke(cli, ["predict", str(model), str(src), "--out", str(base / "serial"), "--tile", "64",
                                   "--overlap", "16"])
    assert res.exit_code == 1, res.output
    serial = {n: tifffile.imread(base / "serial" / f"{n}_prediction.tif") for n in GOOD}
    assert all(a.shape == (96, 96) and a.dtype == np.float32 and a.std() > 0 for a in serial.values())
    return {"base": base, "model": model, "src": src, "serial": serial, "serial_output": res.output}


def _errors(text):
    return sorted(ln for ln in text.splitlines() if ln.startswith("error:"))


def _assert_same_as_serial(case, out):
    import tifffile

    assert sorted(p.name for p in out.iterdir()) == [f"{n}_prediction.tif" for n in GOOD]  # no .tmp, no markers
    for n in GOOD:
        with tifffile.TiffFile(out / f"{n}_prediction.tif") as t:  # complete ImageJ TIFFs
            assert t.is_imagej and t.imagej_metadata["Labels"] == "nuclei"
            got = t.asarray()
        assert got.shape == (96, 96)
        assert np.abs(got - case["serial"][n]).max() < 1e-4, n


@pytest.mark.slow  # starts its own 2-process cluster: 35-40 s on 2 loaded cores
def test_workers_cli_matches_serial_and_reports_the_bad_field(case):
    """--workers 2: a LocalCluster of 2 processes on loopback; same files and the same per-field errors,
    summary and exit code as the serial path."""
    from click.testing import CliRunner

    from islkeras.cli import cli

    out = case["base"] / "w2"
    res = CliRunner().invoke(cli, ["predict", str(case["model"]), str(case["src"]), "--out", str(out),
                                   "--tile", "64", "--overlap", "16", "--workers", "2"])
    assert res.exit_code == 1, res.output
    assert "predicted 4 of 5 input(s)" in res.output and "1 of 5 input(s) failed" in res.output
    errors = _errors(res.output)
    assert len(errors) == 1 and "broken.tif" in errors[0] and "unreadable or truncated TIFF" in errors[0]
    assert errors == _errors(case["serial_output"])
    _assert_same_as_serial(case, out)


KILLER = r'''
import os, signal
from pathlib import Path
import islkeras.inference.fields as F

_real = F.write_prediction

def write_prediction(path, *args, **kwargs):
    path = Path(path)
    marker = Path(MARKER)
    if path.name == "f1_prediction.tif" and not marker.exists():
        marker.write_text(str(os.getpid()))
        # half a file under write_prediction's temporary name, then the worker dies without cleaning up
        (path.parent / f".{path.name}.killed.tmp").write_bytes(b"II*\x00 half a TIFF")
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(path, *args, **kwargs)

F.write_prediction = write_prediction
'''


@pytest.fixture(scope="module")
def client():
    from islkeras.inference.distributed import local_cluster

    with local_cluster(2) as c:
        yield c


def test_a_worker_is_not_a_scheduler(client):
    from islkeras.errors import UserError
    from islkeras.inference.distributed import connect

    client.wait_for_workers(2, timeout=60)
    worker = next(iter(client.scheduler_info()["workers"]))
    with pytest.raises(UserError, match="is not a Dask scheduler .*a Worker"):
        with connect(worker, timeout=2):
            pass
    with connect(client.scheduler.address, timeout=5) as c:  # the scheduler itself is fine
        assert len(c.scheduler_info()["workers"]) == 2


def test_killed_worker_loses_no_finished_output(case, client):
    """One of the 2 workers is SIGKILLed while writing f1 (a half-written temporary file left behind): its
    field is retried on a worker, every field is written once and complete, nothing partial is left."""
    from islkeras.inference.distributed import run_fields
    from islkeras.inference.fields import FieldSettings, find_inputs, input_specs, output_names
    from islkeras.inference.distributed import model_info

    em = model_info(case["model"])
    specs = input_specs(em)
    items = [it for it in find_inputs([case["src"]], specs) if it.name in GOOD]
    out = case["base"] / "killed"
    marker = case["base"] / "killed.marker"
    settings = FieldSettings(out=out, specs=specs, labels=tuple(output_names(em.meta)), tile=64, overlap=16)
    client.run(exec, KILLER, {"MARKER": str(marker)})
    pids = set(client.run(os.getpid).values())
    seen = []
    results = run_fields(client, em.path, items, [it.name for it in items], settings,
                         lambda item, res: seen.append(res.name))
    assert marker.is_file() and int(marker.read_text()) in pids  # a worker really died mid-field
    assert [r.ok for r in results] == [True] * 4 and sorted(seen) == GOOD
    _assert_same_as_serial(case, out)
    # each worker process loaded the SavedModel once, however many fields it predicted
    loaded = client.run(lambda: sorted(__import__("islkeras.inference.distributed", fromlist=["_MODELS"])._MODELS))
    assert all(v in ([], [str(em.path)]) for v in loaded.values()) and [str(em.path)] in loaded.values()


def test_dask_address_cli_with_relative_paths(case, client, monkeypatch):
    """--dask ADDRESS: the CLI connects to the running cluster; paths relative to the client's working folder
    reach workers that run elsewhere (here: another working folder) as absolute paths."""
    from click.testing import CliRunner

    from islkeras.cli import cli

    monkeypatch.chdir(case["base"])
    assert set(client.run(os.getcwd).values()) != {str(case["base"])}
    res = CliRunner().invoke(cli, ["predict", "savedmodel", "in", "--out", "via_address", "--tile", "64",
                                   "--overlap", "16", "--dask", client.scheduler.address])
    assert res.exit_code == 1, res.output
    assert "predicted 4 of 5 input(s) -> via_address" in res.output
    assert "1 of 5 input(s) failed: in/broken.tif" in res.output  # the summary names the path as given
    _assert_same_as_serial(case, case["base"] / "via_address")


def test_retry_of_a_written_field_does_not_rewrite_it(case, tmp_path):
    """The task of a field already written in this run (its marker exists) returns without writing."""
    from islkeras.inference.distributed import model_info, predict_task
    from islkeras.inference.fields import FieldSettings, find_inputs, input_specs, output_names

    em = model_info(case["model"])
    specs = input_specs(em)
    item = next(it for it in find_inputs([case["src"]], specs) if it.name == "f0")
    settings = FieldSettings(out=tmp_path, specs=specs, labels=tuple(output_names(em.meta)), tile=64, overlap=16)
    first = predict_task(str(em.path), item, "f0", settings, "tok")
    assert first.ok and (tmp_path / ".islkeras-predict-tok" / "f0.done").is_file()
    before = os.stat(tmp_path / "f0_prediction.tif")
    again = predict_task(str(em.path), item, "f0", settings, "tok")
    after = os.stat(tmp_path / "f0_prediction.tif")
    assert again.ok and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    other_run = predict_task(str(em.path), item, "f0", settings, "tok2")  # another run writes it anew
    assert other_run.ok and os.stat(tmp_path / "f0_prediction.tif").st_ino != before.st_ino


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _predict(case, out, *extra):
    from click.testing import CliRunner

    from islkeras.cli import cli

    return CliRunner().invoke(cli, ["predict", str(case["model"]), str(case["src"]), "--out", str(out), *extra])


def test_scheduler_that_does_not_answer_is_one_line(case, tmp_path):
    import time

    port = _free_port()
    t0 = time.monotonic()
    res = _predict(case, tmp_path / "out", "--dask", f"tcp://127.0.0.1:{port}", "--dask-timeout", "1")
    assert time.monotonic() - t0 < 8
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"Error: --dask tcp://127.0.0.1:{port}: no Dask scheduler answered within 1 s (")
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder

    # something answers, but not in Dask's protocol (an HTTP server, a proxy)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def http():
        for _ in range(4):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 8)

    threading.Thread(target=http, daemon=True).start()
    try:
        res = _predict(case, tmp_path / "out", "--dask", f"tcp://127.0.0.1:{srv.getsockname()[1]}",
                       "--dask-timeout", "2")
    finally:
        srv.close()
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "no Dask scheduler answered within 2 s (something answers there, not in Dask's protocol" in res.output
    assert not (tmp_path / "out").exists()

    res = _predict(case, tmp_path / "out", "--dask", "nonsense")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "--dask nonsense: not a usable scheduler address, expected e.g. tcp://HOST:8786" in res.output


def test_bad_option_combinations_and_missing_extra(case, tmp_path, monkeypatch):
    res = _predict(case, tmp_path / "out", "--dask", "tcp://127.0.0.1:1", "--workers", "2")
    assert res.exit_code == 1 and "give one of them" in res.output
    res = _predict(case, tmp_path / "out", "--workers", "-1")
    assert res.exit_code == 1 and "--workers -1: must be >= 0" in res.output
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)  # `import distributed` -> ImportError
    res = _predict(case, tmp_path / "out", "--workers", "2")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "pip install 'islkeras[dask]'" in res.output
    assert not (tmp_path / "out").exists()
