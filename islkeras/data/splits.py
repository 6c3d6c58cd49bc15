"""Which split each field goes to (``data.split``: a column of the split CSV, seeded fractions or spatial
bands of every field), and fields grouped by a column of the split CSV (``pipeline.balance_by``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from islkeras.data.manifest import SPLIT_ORDER, split_rank
from islkeras.errors import DataError


@dataclass
class Record:
    """One record to write: a whole field, or one spatial band of it (``region``)."""

    name: str
    field: str
    split: str
    region: Optional[list]  # [y0, y1, x0, x1] or None = whole field


def csv_column(cfg, column: str, rows: Optional[dict] = None) -> tuple[dict[str, str], Path, str]:
    """``{field id: value}`` of one column of the split CSV (``data.split.csv``), its path and id column;
    ``rows`` (if given) receives ``{field id: line number}``. A row with cells but no field id is an error."""
    s = cfg.data.split
    if s.csv is None:
        raise DataError(f"column {column!r} of the split CSV was asked for, but data.split.csv is not set")
    rel = s.csv.rsplit(":", 1)[0]
    path = Path(cfg.data.root) / rel
    if not path.is_file():
        raise DataError(f"split CSV {path} not found (data.split.csv {s.csv!r}, relative to data.root)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        id_col = s.id_column or (cols[0] if cols else None)
        for c in (id_col, column):
            if c not in cols:
                raise DataError(f"{path}: no column {c!r} (columns: {', '.join(cols)})")
        table = {}
        for row in reader:
            fid = (row[id_col] or "").strip()
            if fid:
                table[fid] = (row[column] or "").strip()
                if rows is not None:
                    rows[fid] = reader.line_num
            elif any((v or "").strip() for v in row.values() if isinstance(v, str)):
                raise DataError(f"{path} line {reader.line_num}: no field name in column {id_col!r}")
    return table, path, id_col


def field_groups(cfg, names: list[str], column: str) -> dict[str, list[str]]:
    """Group -> record names by a column of the split CSV (e.g. the experiment or stratum a field comes
    from). Record names of spatial splits (``field@split``) are looked up by their field."""
    table, path, id_col = csv_column(cfg, column)
    out: dict[str, list[str]] = {}
    for n in names:
        fid = n.split("@", 1)[0]
        if not table.get(fid):
            raise DataError(f"{path}: no value in column {column!r} for field {fid} (pipeline.balance_by; "
                            f"id column {id_col!r})")
        out.setdefault(table[fid], []).append(n)
    return out


def assign_splits(cfg, names: list[str]) -> dict[str, str]:
    """Field name -> split for csv and fractions splits (spatial: every field -> "spatial")."""
    s = cfg.data.split
    if s.spatial is not None:
        return {n: "spatial" for n in names}
    if s.csv is not None:
        column = s.csv.rsplit(":", 1)[1]
        rows: dict[str, int] = {}
        table, path, id_col = csv_column(cfg, column, rows)
        missing = [n for n in names if n not in table]
        if missing:
            raise DataError(f"{path}: no row for field(s) {', '.join(missing[:5])} (column {id_col!r})")
        import fnmatch

        absent = [fid for fid in table if fnmatch.fnmatch(fid, cfg.data.fields) and fid not in names]
        if absent:
            raise DataError(
                f"{path} lists field(s) {', '.join(absent[:5])} but {cfg.data.root} has no such folder "
                f"(missing field folder?)"
            )
        for n in names:  # a typo ("valid") or an empty cell must not move a field or drop it silently
            if table[n] not in SPLIT_ORDER:
                got = f"split {table[n]!r}" if table[n] else "an empty split cell"
                raise DataError(f"{path} line {rows[n]} (field {n}): {got} in column {column!r}; expected one of "
                                f"{', '.join(SPLIT_ORDER)} (leave a field out with data.fields)")
        return {n: table[n] for n in names}
    fr = {k: v for k, v in (s.fractions or {}).items()}
    order = sorted(fr, key=split_rank)
    rng = np.random.default_rng(s.seed)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    n = len(names)
    cum = np.cumsum([fr[k] for k in order])
    bounds = [0] + [int(round(c * n)) for c in cum]
    bounds[-1] = n
    counts = [bounds[i + 1] - bounds[i] for i in range(len(order))]
    # every split with a positive fraction gets at least one field when there are enough fields
    if n >= sum(1 for k in order if fr[k] > 0):
        for i, k in enumerate(order):
            if fr[k] > 0 and counts[i] == 0:
                j = int(np.argmax(counts))
                counts[j] -= 1
                counts[i] += 1
    out, pos = {}, 0
    for k, c in zip(order, counts):
        for name in shuffled[pos:pos + c]:
            out[name] = k
        pos += c
    return out


def spatial_records(cfg, fld: str, h: int, w: int) -> list[Record]:
    """The records of one field under a spatial split: one band per split, ``margin`` pixels apart."""
    sp = cfg.data.split.spatial
    order = [k for k in sorted(sp.fractions, key=split_rank) if sp.fractions[k] > 0]
    length = h if sp.axis == "y" else w
    usable = length - sp.margin * (len(order) - 1)
    sizes = [int(np.floor(sp.fractions[k] * usable)) for k in order]
    if usable > 0:
        sizes[-1] = usable - sum(sizes[:-1])
    if usable <= 0 or min(sizes) < 1:
        raise DataError(
            f"field {fld}: {length} px along {sp.axis} is too small for spatial split {sp.fractions} "
            f"with margin {sp.margin}"
        )
    out, start = [], 0
    for k, size in zip(order, sizes):
        a, b = start, start + size
        region = [a, b, 0, w] if sp.axis == "y" else [0, h, a, b]
        out.append(Record(name=f"{fld}@{k}", field=fld, split=k, region=region))
        start = b + sp.margin
    return out

