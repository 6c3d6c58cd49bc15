"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`, which puts this folder on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def emit(result: dict, out: Optional[str], indent: int = 2) -> None:
    """Print the result as JSON on stdout and, with ``--out FILE``, also write it there."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
