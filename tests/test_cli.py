"""`islkeras --help` lists every subcommand with a description; each subcommand's --help has examples."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from islkeras.cli import COMMANDS, cli


def test_top_level_help_lists_every_subcommand_fast():
    # the console script must not import TensorFlow just to print help
    code = "import sys; from islkeras.cli import cli; cli.main(['--help'], standalone_mode=False); " \
           "print('TF' if 'tensorflow' in sys.modules else 'noTF')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name, (_, desc) in COMMANDS.items():
        assert name in p.stdout and desc[:30] in p.stdout
    assert p.stdout.strip().endswith("noTF")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help_has_examples(name):
    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "unavailable" not in r.output
    assert "islkeras " + name in r.output, f"`islkeras {name} --help` shows no example"


def test_unknown_config_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"name": "x", "data": {"root": ".", "channels": {}, "inputs": ["a"]}, "trainig": {}}')
    p = subprocess.run([sys.executable, "-m", "islkeras.cli", "fit", str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert "unknown key 'trainig'" in p.stderr and "training" in p.stderr
