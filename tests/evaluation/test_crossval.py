"""``islkeras crossval --group stratum`` (islkeras.evaluation.crossval) on the real aiseg data, two folds of
a tiny model: what each fold trains and tests on, the tables agreeing with each arm's evaluate output, the
--adapt arms, resuming, and bad options as one-line errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from islkeras.errors import DataError, UserError

from testkit import AISEG_CFG, small_overrides  # noqa: F401  (tests/testkit.py)

FOLDS = ["SK", "YZ"]  # the two smallest experiments of aiseg-nuclei (3 fields each)
CROP = 256  #: the test data: the SK and YZ fields of aiseg-nuclei, their top-left 256 x 256 pixels


@pytest.fixture(scope="module")
def mini_root(aiseg_dir, tmp_path_factory) -> Path:
    """The 6 fields of SK and YZ cropped to 256 x 256 (conversion and whole-field evaluation 16x cheaper) and
    their rows of fields.csv, in a temporary data root (nothing is written next to the shared data)."""
    import tifffile

    root = tmp_path_factory.mktemp("mini") / "aiseg"
    with open(aiseg_dir / "fields.csv", newline="") as f:
        reader = csv.DictReader(f)
        cols, rows = reader.fieldnames, [r for r in reader if r["stratum"] in FOLDS]
    for r in rows:
        for name in ("brightfield", "nuclei", "mask"):
            img = tifffile.imread(aiseg_dir / r["fov"] / f"{name}.tif")
            (root / r["fov"]).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / r["fov"] / f"{name}.tif", img[:CROP, :CROP])
    with open(root / "fields.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return root


def _sets(base: Path, root: Path) -> dict:
    return small_overrides(base, **{
        "data.root": str(root), "data.fields": "fov_*", "training.epochs": 1, "training.steps_per_epoch": 2, "training.validation_steps": 1,
        "training.mixed_precision": None, "training.early_stopping.patience": 100})


def _groups(root) -> dict:
    out: dict = {}
    with open(root / "fields.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["stratum"], []).append(row["fov"])
    return {g: sorted(v) for g, v in out.items()}


@pytest.fixture(scope="module")
def cv(mini_root, tmp_path_factory):
    from islkeras.evaluation.crossval import crossval

    base = tmp_path_factory.mktemp("cv")
    out = base / "cv"
    result = crossval(str(AISEG_CFG), "stratum", adapt=1, folds=FOLDS, run_dir=out, sets=_sets(base, mini_root),
                      adapt_sets={"training.steps_per_epoch": 1})
    return out, result, base


def _manifest_splits(records: Path) -> dict:
    m = json.loads((records / "manifest.json").read_text())
    out: dict = {}
    for name, f in m["fields"].items():
        out.setdefault(f["split"], set()).add(f["field"])
    return out


@pytest.mark.slow
def test_each_fold_trains_without_its_group_and_tests_on_all_of_it(cv, mini_root):
    from islkeras.training.run import load_run_config

    out, result, _ = cv
    groups = _groups(mini_root)
    assert result["folds"] == FOLDS and result["folds_done"] == FOLDS
    for g in FOLDS:
        fold = out / f"fold-{g}"
        cfg = load_run_config(fold / "loeo")
        assert Path(cfg.data.records) == fold / "records"  # records of its own, from its own split CSV
        assert cfg.data.split.csv == f"{fold / 'fields.csv'}:split"
        s = _manifest_splits(fold / "records")
        assert s["test"] == set(groups[g])
        assert not (s["train"] | s["val"]) & set(groups[g])
        assert s["train"] | s["val"] | s["test"] == {f for v in groups.values() for f in v}
        assert s["val"] and all(g not in f for f in s["val"])
    # nothing was written next to the shared data
    assert not (mini_root / "records").exists() and not list(mini_root.glob("fold-*"))


@pytest.mark.slow
def test_tables_agree_with_each_arms_evaluation(cv, mini_root):
    from islkeras.training.run import read_summary

    out, result, _ = cv
    groups = _groups(mini_root)
    df = pd.read_csv(out / "crossval.csv")
    assert list(df.columns) == ["fold", "group", "field", "arm", "channel", "pcc", "steps"]
    md = (out / "crossval.md").read_text()
    means = []
    for k, g in enumerate(FOLDS, start=1):
        for arm in ("loeo", "adapt", "scratch"):
            run = out / f"fold-{g}" / arm
            ev = pd.read_csv(run / "evaluate" / "test" / "metrics.csv").set_index("field")["pcc"]
            rows = df[(df.group == g) & (df.arm == arm)].set_index("field")
            assert (rows["fold"] == k).all()
            assert sorted(rows.index) == (groups[g] if arm == "loeo" else groups[g][1:])  # 1 adapt field left out
            pd.testing.assert_series_equal(rows["pcc"].sort_index(), ev.sort_index(), check_names=False, rtol=1e-9)
            assert (rows["steps"] == read_summary(run)["steps"]).all()
        fold = next(r for r in result["per_fold"] if r["group"] == g)
        loeo = df[(df.group == g) & (df.arm == "loeo")]
        assert fold["loeo_pcc"] == pytest.approx(loeo["pcc"].mean())
        assert fold["loeo_rest_pcc"] == pytest.approx(loeo[loeo.field != groups[g][0]]["pcc"].mean())
        assert (fold["loeo_steps"], fold["adapt_steps"], fold["scratch_steps"]) == (2, 1, 1)
        row = next(line for line in md.splitlines() if line.startswith(f"| {k} | {g} |"))
        assert f"| {fold['loeo_pcc']:.3f} |" in row and f"| {fold['adapt_pcc']:.3f} |" in row
        means.append(fold["loeo_pcc"])
    assert result["mean"]["loeo_pcc"] == pytest.approx(sum(means) / len(means))
    assert f"| {result['mean']['loeo_pcc']:.3f} |" in next(x for x in md.splitlines() if x.startswith("| mean"))
    assert json.loads((out / "crossval.json").read_text())["mean"] == pytest.approx(result["mean"])


@pytest.mark.slow
def test_adapt_fine_tunes_the_folds_model_on_the_first_fields(cv, mini_root):
    from islkeras.training.run import load_run_config

    out, result, _ = cv
    groups = _groups(mini_root)
    for g in FOLDS:
        fold = out / f"fold-{g}"
        a, s = load_run_config(fold / "adapt"), load_run_config(fold / "scratch")
        assert a.training.init_from == str(fold / "loeo" / "savedmodel") and s.training.init_from is None
        base = load_run_config(fold / "loeo").training
        assert a.training.learning_rate == pytest.approx(base.learning_rate / 10) == s.training.learning_rate
        assert a.training.validation is False and a.training.steps_per_epoch == 1
        sp = _manifest_splits(fold / "adapt-records")
        assert sp["train"] == {groups[g][0]} and sp["test"] == set(groups[g][1:])


@pytest.mark.slow
def test_rerun_with_the_same_run_dir_reuses_finished_folds(cv, mini_root, monkeypatch):
    import islkeras.training.fit as F
    from islkeras.evaluation.crossval import crossval

    out, result, base = cv
    root = mini_root
    before = (out / "crossval.csv").read_text()
    monkeypatch.setattr(F, "fit", lambda *a, **k: pytest.fail("a finished arm was trained again"))
    again = crossval(str(AISEG_CFG), "stratum", adapt=1, folds=FOLDS, run_dir=out, sets=_sets(base, root),
                     adapt_sets={"training.steps_per_epoch": 1})
    assert (out / "crossval.csv").read_text() == before and again["mean"] == result["mean"]
    with pytest.raises(UserError, match="different config"):  # another budget: not silently the old runs
        crossval(str(AISEG_CFG), "stratum", folds=FOLDS[:1], run_dir=out,
                 sets={**_sets(base, root), "training.steps_per_epoch": 3})


def test_bad_options_are_one_line_errors_before_training(aiseg_dir, tmp_path):
    from click.testing import CliRunner

    from islkeras.evaluation.crossval import crossval, crossval_command

    sets = _sets(tmp_path, aiseg_dir)  # the shared data itself: nothing is trained or written
    with pytest.raises(DataError) as e:
        crossval(str(AISEG_CFG), "strata", sets=sets, run_dir=tmp_path / "x")
    msg = str(e.value)
    assert str(aiseg_dir / "fields.csv") in msg and "no column 'strata'" in msg and "stratum" in msg
    assert "columns: fov, " in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"--folds XX: not a value of column 'stratum' .*values: MA, SK, TK, YZ"):
        crossval(str(AISEG_CFG), "stratum", folds=["SK", "XX"], sets=sets, run_dir=tmp_path / "x")
    with pytest.raises(UserError, match=r"--adapt 3: group 'SK' has 3 field\(s\)"):
        crossval(str(AISEG_CFG), "stratum", adapt=3, folds=["SK"], sets=sets, run_dir=tmp_path / "x")
    with pytest.raises(UserError, match="split column"):
        crossval(str(AISEG_CFG), "split", sets=sets, run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    r = CliRunner().invoke(crossval_command, [str(AISEG_CFG), "--group", "strata", *args])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no column 'strata'" in r.output


def test_fold_split_assignments():
    from islkeras.evaluation.crossval import adapt_splits, loeo_splits

    groups = {"A": ["a1", "a2", "a3"], "B": ["b1", "b2"], "C": ["c1"]}
    splits = {"a1": "train", "a2": "val", "a3": "test", "b1": "test", "b2": "val", "c1": "train"}
    assert loeo_splits(groups, splits, "B") == {"a1": "train", "a2": "val", "a3": "train", "b1": "test",
                                                "b2": "test", "c1": "train"}
    assert adapt_splits(groups, "A", 2) == {"a1": "train", "a2": "train", "a3": "test", "b1": "val", "b2": "val",
                                            "c1": "val"}
