"""``islkeras crossval CONFIG --group COLUMN``: leave-one-group-out evaluation (e.g. leave-one-experiment-out).

COLUMN is a column of the split CSV (``data.split.csv``), e.g. ``stratum`` (the experiment a field comes
from). A **fold** holds one value g of that column out:

* **loeo** arm: one model trained with the config's budget on the fields of the *other* groups, whose
  split column is kept for train and val (their ``test`` fields join ``train``: nothing else uses them);
  **all** fields of g are the fold's test split, evaluated as whole fields (``evaluate.evaluate_run``).
* with ``--adapt N``, two more arms on g: its first N fields (sorted by name) become ``train``, the others
  its ``test``. **adapt** fine-tunes the fold's loeo model on them (``training.init_from``), **scratch**
  trains the same network from random weights with the same settings and budget; both score the
  remaining fields of g. Their settings are the config's with ``ADAPT_DEFAULTS`` (a tenth of the learning
  rate, a third of the epochs, no validation: the N fields are all g has to learn from; the other groups'
  fields are in the records as ``val`` but unused) and then ``--adapt-set`` on top.

Nothing is written under ``data.root``: each fold gets a copy of the split CSV with the split column
rewritten (``fold-<g>/fields.csv``, ``adapt-fields.csv``) and its own records converted from it.
Output folder (``--run-dir``, default ``<runs_dir>/<name>/crossval-<COLUMN>-<stamp>``)::

    crossval.csv   one row per fold x field x arm x channel: fold, group, field, arm, channel, pcc, steps
    crossval.md    per fold: mean PCC per arm and the steps run; the mean over folds (each group weighs 1)
    crossval.json  the settings, the per-fold means and the mean over folds
    fold-<g>/      fields.csv records/ loeo/ [adapt-fields.csv adapt-records/ adapt/ scratch/]

Each arm folder is an ``islkeras fit`` run folder (with ``evaluate/test/metrics.csv``). Re-running with the
same ``--run-dir`` continues: finished arms (``summary.json``, ``metrics.csv``) are not trained or
evaluated again, interrupted ones resume; a finished arm trained with a different config is an error.
"""
from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path
from typing import Optional

import click

from islkeras.errors import UserError

ARMS = ("loeo", "adapt", "scratch")
#: adapt/scratch settings on top of the config (then --adapt-set); callables get the config
ADAPT_DEFAULTS = {
    "training.learning_rate": lambda cfg: cfg.training.learning_rate / 10,
    "training.epochs": lambda cfg: max(1, cfg.training.epochs // 3),
    "training.validation": lambda cfg: False,
    "pipeline.balance_by": lambda cfg: None,
}
COLUMNS = ["fold", "group", "field", "arm", "channel", "pcc", "steps"]


# ------------------------------------------------------------------------------------------- folds
def read_groups(cfg, column: str) -> tuple[dict[str, list[str]], dict[str, str], Path, str, str]:
    """(group -> sorted field names, field -> its split, split CSV path, id column, split column) over the
    fields of ``cfg`` (folders matching ``data.fields``). DataError naming the CSV and its columns when
    ``column`` is not one of them."""
    from islkeras.data import tiff
    from islkeras.data.splits import csv_column
    from islkeras.errors import DataError

    if cfg.data.split.csv is None:
        raise UserError(f"--group {column}: crossval groups fields by a column of the split CSV, but "
                        f"data.split.csv of {cfg.source} is not set")
    split_col = cfg.data.split.csv.rsplit(":", 1)[1]
    table, path, id_col = csv_column(cfg, column)
    if column in (split_col, id_col):
        raise UserError(f"--group {column}: that is the {'split' if column == split_col else 'id'} column of "
                        f"{path}; name a column that groups fields, e.g. the experiment")
    splits, _, _ = csv_column(cfg, split_col)
    names = tiff.field_names(cfg.data.root, cfg.data.fields, cfg.data.channels)
    groups: dict[str, list[str]] = {}
    for n in names:
        if not table.get(n):
            raise DataError(f"{path}: no value in column {column!r} for field {n} (--group; id column {id_col!r})")
        groups.setdefault(table[n], []).append(n)
    return {g: sorted(v) for g, v in sorted(groups.items())}, splits, path, id_col, split_col


def loeo_splits(groups: dict, splits: dict, held_out: str) -> dict[str, str]:
    """Field -> split of the loeo arm: all of ``held_out`` is test; the others keep val, the rest is train."""
    out = {}
    for g, names in groups.items():
        for n in names:
            out[n] = "test" if g == held_out else ("val" if splits.get(n) == "val" else "train")
    return out


def adapt_splits(groups: dict, held_out: str, n: int) -> dict[str, str]:
    """Field -> split of the adapt/scratch arms: the first ``n`` fields of ``held_out`` train, the rest test;
    the other groups' fields are val (converted, not used: the arms train without validation)."""
    out = {f: "val" for g, names in groups.items() if g != held_out for f in names}
    for i, f in enumerate(groups[held_out]):
        out[f] = "train" if i < n else "test"
    return out


def write_fold_csv(src: Path, dst: Path, id_col: str, split_col: str, assign: dict[str, str]) -> Path:
    """A copy of the split CSV ``src`` with ``split_col`` set from ``assign`` (other rows unchanged)."""
    from islkeras.utils import atomic_write_text

    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        fid = (row.get(id_col) or "").strip()
        if fid in assign:
            row[split_col] = assign[fid]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, buf.getvalue())
    return dst


def folder_name(group: str) -> str:
    return "fold-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", group) or "_")


# -------------------------------------------------------------------------------------------- arms
def arm_config(config, data_root, sets: dict, extra: dict):
    from islkeras.config import load_config

    return load_config(config, overrides={**sets, **extra}, data_root=data_root)


def run_arm(cfg, run_dir: Path, eval_kw: dict):
    """Train (or continue, or reuse) one arm's run and evaluate whole fields of its test split:
    (fit summary, evaluate's per-image DataFrame)."""
    import pandas as pd

    from islkeras.evaluation.evaluate import EVAL_DIR, evaluate_run
    from islkeras.training.fit import fit
    from islkeras.training.run import read_summary

    done = read_summary(run_dir)
    if done is not None and done.get("config_hash") != cfg.hash():
        raise UserError(f"{run_dir} was trained with a different config than this crossval asks for (changed "
                        f"--set/--adapt-set or config?); use a new --run-dir")
    summary = done if done is not None else fit(cfg, run_dir=run_dir)
    metrics = run_dir / EVAL_DIR / "test" / "metrics.csv"
    if metrics.is_file() and (metrics.parent / "summary.json").is_file():
        return summary, pd.read_csv(metrics)
    return summary, evaluate_run(run_dir, "test", whole_fields=True, **eval_kw)


def arm_rows(k: int, group: str, arm: str, summary: dict, df) -> list[dict]:
    return [{"fold": k, "group": group, "field": r.field, "arm": arm, "channel": r.channel, "pcc": float(r.pcc),
             "steps": summary.get("steps")} for r in df.itertuples()]


# ---------------------------------------------------------------------------------------- summaries
def fold_table(df) -> list[dict]:
    """Per fold: mean PCC per arm (fields x channels), fields scored, steps; loeo also on the fields the
    adapt arm scores (``loeo_rest``), so the three arms compare on the same fields."""
    out = []
    for (k, g), sub in df.groupby(["fold", "group"], sort=True):
        row = {"fold": int(k), "group": g}
        for arm, a in sub.groupby("arm"):
            row[f"{arm}_pcc"] = float(a["pcc"].mean())
            row[f"{arm}_fields"] = int(a["field"].nunique())
            row[f"{arm}_steps"] = None if a["steps"].isna().all() else int(a["steps"].max())
        adapt = sub[sub["arm"] == "adapt"]
        if len(adapt):
            rest = sub[(sub["arm"] == "loeo") & sub["field"].isin(set(adapt["field"]))]
            row["loeo_rest_pcc"] = float(rest["pcc"].mean())
        out.append(row)
    return out


def mean_over_folds(table: list[dict]) -> dict:
    keys = [k for k in ("loeo_pcc", "loeo_rest_pcc", "adapt_pcc", "scratch_pcc") if any(k in r for r in table)]
    return {k: sum(r[k] for r in table if k in r) / sum(1 for r in table if k in r) for k in keys}


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def markdown(table: list[dict], mean: dict, settings: dict) -> str:
    adapt = settings.get("adapt")
    lines = [f"# Cross-validation: {settings['name']}, leave one `{settings['group']}` out", "",
             f"Config `{settings['config']}`; each fold trains on the other groups (budget "
             f"{settings['budget_steps']} steps) and scores whole fields of its group (PCC, mean over fields).", ""]
    head = ["fold", "group", "fields", "loeo PCC", "loeo steps"]
    if adapt:
        lines += [f"With --adapt {adapt}: the first {adapt} field(s) of the group train `adapt` (fine-tuned from "
                  f"the fold's loeo model) and `scratch` (random init), same settings ({settings['adapt_set']}); "
                  f"both, and `loeo (rest)`, score the group's remaining fields.", ""]
        head += ["loeo (rest) PCC", "adapt PCC", "adapt steps", "scratch PCC", "scratch steps"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r["fold"]), str(r["group"]), str(r.get("loeo_fields")), _f(r.get("loeo_pcc")),
                 _f(r.get("loeo_steps"), "{}")]
        if adapt:
            cells += [_f(r.get("loeo_rest_pcc")), _f(r.get("adapt_pcc")), _f(r.get("adapt_steps"), "{}"),
                      _f(r.get("scratch_pcc")), _f(r.get("scratch_steps"), "{}")]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean", f"{len(table)} folds", "", _f(mean.get("loeo_pcc")), ""]
    if adapt:
        cells += [_f(mean.get("loeo_rest_pcc")), _f(mean.get("adapt_pcc")), "", _f(mean.get("scratch_pcc")), ""]
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per field: `crossval.csv`; per arm: `fold-<group>/<arm>/evaluate/test/`.", ""]
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], settings: dict) -> dict:
    import pandas as pd

    from islkeras.utils import atomic_write_json, atomic_write_text

    df = pd.DataFrame(rows, columns=COLUMNS)
    table = fold_table(df) if len(df) else []
    mean = mean_over_folds(table) if table else {}
    atomic_write_text(out / "crossval.csv", df.to_csv(index=False))
    atomic_write_text(out / "crossval.md", markdown(table, mean, settings))
    summary = dict(settings, folds_done=[r["group"] for r in table], per_fold=table, mean=mean)
    atomic_write_json(out / "crossval.json", summary)
    return summary


# --------------------------------------------------------------------------------------------- run
def crossval(config, group: str, adapt: Optional[int] = None, folds: Optional[list[str]] = None,
             run_dir=None, sets: Optional[dict] = None, adapt_sets: Optional[dict] = None,
             data_root: Optional[str] = None, mask_jaccard: bool = False, tile: int = 512,
             batch: int = 4) -> dict:
    """Leave-one-``group``-out over the config file ``config`` (module doc); returns crossval.json's content."""
    sets, adapt_sets = dict(sets or {}), dict(adapt_sets or {})
    base = arm_config(config, data_root, sets, {})
    groups, splits, csv_path, id_col, split_col = read_groups(base, group)
    chosen = list(groups) if not folds else list(dict.fromkeys(folds))
    unknown = [g for g in chosen if g not in groups]
    if unknown:
        raise UserError(f"--folds {','.join(unknown)}: not a value of column {group!r} in {csv_path} "
                        f"(values: {', '.join(groups)})")
    if len(groups) < 2:
        raise UserError(f"--group {group}: {csv_path} has a single value {list(groups)} in that column; "
                        f"leaving it out would leave no training data")
    if adapt is not None and adapt < 1:
        raise UserError(f"--adapt {adapt}: must be >= 1 (fields of the held-out group to fine-tune on)")
    for g in chosen:
        if adapt is not None and len(groups[g]) <= adapt:
            raise UserError(f"--adapt {adapt}: group {g!r} has {len(groups[g])} field(s); at least {adapt + 1} "
                            f"are needed (fine-tune on {adapt}, score the rest)")
        others = [f for h, names in groups.items() if h != g for f in names]
        if base.training.validation and not any(splits.get(f) == "val" for f in others):
            raise UserError(f"fold {g}: the other groups have no val field in column {split_col!r} of {csv_path}; "
                            f"add one, or --set training.validation=false")
    adapt_over = {k: fn(base) for k, fn in ADAPT_DEFAULTS.items()} if adapt is not None else {}
    adapt_over.update(adapt_sets)
    out = Path(run_dir) if run_dir else (Path(base.training.runs_dir) / base.name
                                          / f"crossval-{group}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"name": base.name, "config": str(Path(config).resolve()), "group": group, "split_csv": str(csv_path),
                "folds": chosen, "groups": {g: groups[g] for g in chosen}, "adapt": adapt,
                "adapt_set": adapt_over, "set": sets, "run_dir": str(out),
                "budget_steps": base.training.epochs * base.training.steps_per_epoch,
                "seed": {"pipeline": base.pipeline.seed, "training": base.training.seed}}
    eval_kw = {"mask_jaccard": mask_jaccard, "tile": tile, "batch": batch}
    rows: list[dict] = []
    for k, g in enumerate(chosen, start=1):
        fold = out / folder_name(g)
        note = f"crossval: fold {k} of {len(chosen)} (held out {group}={g}, {len(groups[g])} field(s))"
        fcsv = write_fold_csv(csv_path, fold / "fields.csv", id_col, split_col, loeo_splits(groups, splits, g))
        common = {"data.split.csv": f"{fcsv}:{split_col}", "data.split.id_column": id_col}
        cfg = arm_config(config, data_root, sets, {**common, "data.records": str(fold / "records"),
                                                   "name": f"{base.name}_loeo_{g}"})
        click.echo(f"{note}: loeo", err=True)
        summary, df = run_arm(cfg, fold / "loeo", eval_kw)
        rows += arm_rows(k, g, "loeo", summary, df)
        if adapt is not None:
            acsv = write_fold_csv(csv_path, fold / "adapt-fields.csv", id_col, split_col,
                                  adapt_splits(groups, g, adapt))
            acommon = {**adapt_over, "data.split.csv": f"{acsv}:{split_col}", "data.split.id_column": id_col,
                       "data.records": str(fold / "adapt-records")}
            for arm, init in (("adapt", summary["savedmodel"]), ("scratch", None)):
                click.echo(f"{note}: {arm} on {', '.join(groups[g][:adapt])}", err=True)
                acfg = arm_config(config, data_root, sets, {**acommon, "training.init_from": init,
                                                            "name": f"{base.name}_{arm}_{g}"})
                s, d = run_arm(acfg, fold / arm, eval_kw)
                rows += arm_rows(k, g, arm, s, d)
        result = write_outputs(out, rows, settings)  # after every fold: partial results are readable
    for line in result_lines(result):
        click.echo(line)
    click.echo(f"-> {out / 'crossval.md'}, {out / 'crossval.csv'}, {out / 'crossval.json'}")
    return result


def result_lines(result: dict) -> list[str]:
    out = []
    for r in result["per_fold"]:
        s = f"fold {r['fold']} {result['group']}={r['group']}: loeo PCC {_f(r.get('loeo_pcc'))} ({r.get('loeo_fields')} fields)"
        if "adapt_pcc" in r:
            s += (f"; on the {r.get('adapt_fields')} remaining: loeo {_f(r.get('loeo_rest_pcc'))}, adapt "
                  f"{_f(r.get('adapt_pcc'))}, scratch {_f(r.get('scratch_pcc'))}")
        out.append(s)
    m = result["mean"]
    out.append("mean over folds: " + ", ".join(f"{k[:-4]} PCC {v:.3f}" for k, v in m.items()))
    return out


# --------------------------------------------------------------------------------------------- CLI
@click.command("crossval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--group", required=True, metavar="COLUMN",
              help="Column of the split CSV (data.split.csv) whose values are held out one at a time, e.g. stratum.")
@click.option("--adapt", type=int, default=None, metavar="N",
              help="Then fine-tune each fold's model on the first N fields of its group and score the rest, "
                   "against the same N fields trained from scratch.")
@click.option("--folds", default=None, metavar="G1,G2", help="Only these groups (comma-separated); default all.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default <runs_dir>/<name>/crossval-<COLUMN>-<stamp>); an existing one is continued.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key for every arm. Repeatable.")
@click.option("--adapt-set", "adapt_sets", multiple=True, metavar="KEY=VALUE",
              help="Override a key for the adapt and scratch arms, e.g. --adapt-set training.epochs=2. Repeatable.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Replace data.root of the config.")
@click.option("--mask-jaccard/--no-mask-jaccard", default=False, show_default=True,
              help="Also compute the nucleus-mask Jaccard in each arm's metrics.csv (slower).")
@click.option("--tile", default=512, show_default=True, help="Tile size of whole-field prediction.")
def crossval_command(config, group, adapt, folds, run_dir, sets, adapt_sets, data_root, mask_jaccard, tile):
    """Leave-one-group-out evaluation of an experiment CONFIG, e.g. leave one experiment out.

    For each value g of the split CSV's column COLUMN: train on the other groups' fields (their train
    and val per the split column; their test fields join train) with the config's budget, and evaluate
    whole fields of g. Writes crossval.csv (per fold, field and arm), crossval.md (per fold and mean)
    and crossval.json, plus the fold run folders.

    \b
    Examples:
      islkeras crossval experiments/aiseg_nuclei_l1.json --group stratum
      islkeras crossval experiments/aiseg_nuclei_l1.json --group stratum --adapt 1 --adapt-set training.epochs=2
      islkeras crossval experiments/aiseg_nuclei_l1.json --group stratum --folds SK,YZ --run-dir runs/cv
    """
    from islkeras.config import parse_set_option

    crossval(config, group, adapt=adapt, folds=[f.strip() for f in folds.split(",") if f.strip()] if folds else None,
             run_dir=run_dir, sets=parse_set_option(sets), adapt_sets=parse_set_option(adapt_sets),
             data_root=data_root, mask_jaccard=mask_jaccard, tile=tile)
