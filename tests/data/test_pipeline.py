"""tf.data pipeline from the records (islkeras.data.pipeline)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from islkeras.config import from_dict, load_config
from islkeras.data import records
from islkeras.data.normalize import offset_scale
from islkeras.data.pipeline import _field_params, eval_steps, make_dataset, normalization_meta
from islkeras.data.reader import split_names
from islkeras.errors import DataError


# --------------------------------------------------------------------------- asymmetric pattern data
def write_pattern(root: Path, n_fields=1, h=96, w=128, sizes=None):
    """inp = a seeded random permutation of 1..H*W, + 10000*i (uint16, every pixel unique, so a crop's values
    give its position; no affine relation between fields), tgt = 3*inp + 5 (float32),
    mask = 1 in a 40x40 top-left corner (uint8)."""
    for i in range(n_fields):
        hh, ww = sizes[i] if sizes else (h, w)
        perm = np.random.default_rng(i).permutation(hh * ww).reshape(hh, ww)
        inp = (perm + 1 + 10000 * i).astype(np.uint16)
        d = root / f"f{i}"
        d.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(d / "inp.tif", inp)
        tifffile.imwrite(d / "tgt.tif", (3.0 * inp + 5).astype(np.float32))
        mask = np.zeros((hh, ww), np.uint8)
        mask[:40, :40] = 1
        tifffile.imwrite(d / "mask.tif", mask)


def pattern_cfg(tmp_path, n_fields=1, pipeline=None, sizes=None, fractions=None, h=96, w=128, split=None):
    root = tmp_path / "data"
    if not root.exists():
        write_pattern(root, n_fields, h=h, w=w, sizes=sizes)
    pipe = {"crop_size": 32, "crops_per_field": 4, "shuffle_buffer": 16, "seed": 7}
    pipe.update(pipeline or {})
    d = {"name": "pattern",
         "data": {"root": str(root), "fields": "f*",
                  "channels": {"inp": {"file": "inp.tif"}, "tgt": {"file": "tgt.tif"}, "mask": {"file": "mask.tif"}},
                  "inputs": ["inp"], "targets": ["tgt"], "masks": ["mask"],
                  "split": split or {"fractions": fractions or {"train": 1.0}}, "records": str(tmp_path / "rec"),
                  "shard_size": 2},
         "pipeline": pipe, "training": {"batch_size": 8}}
    cfg = from_dict(d, base_dir=tmp_path, source="test")
    return cfg, records.convert(cfg)


def symmetries(block):
    return [np.fliplr(np.rot90(block, k % 4)) if k >= 4 else np.rot90(block, k % 4) for k in range(8)]


def locate(raw, field):
    """(y0, x0, symmetry index) of a crop of the pattern field, or AssertionError."""
    r = np.rint(raw).astype(np.int64)
    np.testing.assert_allclose(raw, r, atol=2e-3)  # normalisation inverted exactly -> integral pixel values
    h, w = field.shape
    flat = field.ravel()
    order = np.argsort(flat)
    pos = order[np.clip(np.searchsorted(flat[order], r), 0, flat.size - 1)]
    assert np.array_equal(flat[pos], r), "values not in the field"
    yy, xx = np.divmod(pos, w)
    cs = raw.shape[0]
    y0, x0 = int(yy.min()), int(xx.min())
    assert yy.max() - y0 == cs - 1 and xx.max() - x0 == cs - 1
    block = field[y0:y0 + cs, x0:x0 + cs]
    hits = [k for k, t in enumerate(symmetries(block)) if np.array_equal(t, r)]
    assert len(hits) == 1, "crop is not a rotated/flipped block of the field"
    return y0, x0, hits[0]


def _field(cfg, name, ch="inp"):
    return tifffile.imread(Path(cfg.data.root) / name / f"{ch}.tif").astype(np.int64)


# --------------------------------------------------------------------------------------- training
def test_crops_same_symmetry_for_input_and_target_all_8_occur(tmp_path):
    cfg, m = pattern_cfg(tmp_path)
    field = _field(cfg, "f0")
    f64 = field.astype(np.float64)
    mean, std = f64.mean(), f64.std()
    tgt = 3.0 * f64 + 5
    tmean, tstd = tgt.mean(), tgt.std()
    seen, positions = set(), set()
    for x, y in make_dataset(cfg, "train", True, m).take(20):
        assert x.shape == (8, 32, 32, 1) and y.shape == (8, 32, 32, 1)
        for xi, yi in zip(x.numpy()[..., 0], y.numpy()[..., 0]):
            # z-score of the crop uses the whole field's statistics (numpy, float64)
            y0, x0, k = locate(xi.astype(np.float64) * std + mean, field)
            seen.add(k)
            positions.add((y0, x0))
            expect = symmetries(field[y0:y0 + 32, x0:x0 + 32])[k]
            np.testing.assert_allclose(xi, (expect - mean) / std, atol=1e-5)
            # the target got exactly the same rotation/flip
            np.testing.assert_allclose(yi, (3.0 * expect + 5 - tmean) / tstd, atol=1e-5)
    assert seen == set(range(8))
    assert len(positions) > 100  # random positions, any offset in the field


def test_no_augment_keeps_orientation_and_covers_the_field(tmp_path):
    cfg, m = pattern_cfg(tmp_path, pipeline={"augment": False, "crop_size": 64})
    field = _field(cfg, "f0")
    ys, xs = set(), set()
    for x, _ in make_dataset(cfg, "train", True, m).take(30):
        for xi in x.numpy()[..., 0]:
            s = m["fields"]["f0"]["stats"]["inp"]
            y0, x0, k = locate(xi.astype(np.float64) * s["std"][0] + s["mean"][0], field)
            assert k == 0
            ys.add(y0), xs.add(x0)
    assert min(ys) == 0 and max(ys) == 96 - 64 and min(xs) == 0 and max(xs) == 128 - 64


def test_seed_makes_it_reproducible(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=3)
    a = [x.numpy() for x, _ in make_dataset(cfg, "train", True, m).take(4)]
    b = [x.numpy() for x, _ in make_dataset(cfg, "train", True, m).take(4)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    cfg.pipeline.seed = 8
    c = [x.numpy() for x, _ in make_dataset(cfg, "train", True, m).take(4)]
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("method", ["minmax", "percentile", "dataset"])
def test_normalisation_methods(tmp_path, method):
    cfg, m = pattern_cfg(tmp_path, n_fields=2, pipeline={"normalization": method, "percentiles": [2.0, 98.0]})
    fields = {n: _field(cfg, n).astype(np.float64) for n in ("f0", "f1")}
    if method == "dataset":  # mean of the train fields' means and stds
        off = np.mean([f.mean() for f in fields.values()])
        sc = np.mean([f.std() for f in fields.values()])
        params = {n: (off, sc) for n in fields}
    elif method == "minmax":
        params = {n: (f.min(), f.max() - f.min()) for n, f in fields.items()}
    else:
        params = {n: (np.percentile(f, 2), np.percentile(f, 98) - np.percentile(f, 2)) for n, f in fields.items()}
    found = set()
    for x, _ in make_dataset(cfg, "train", True, m).take(3):
        for xi in x.numpy()[..., 0]:
            ok = []
            for n, (o, s) in params.items():
                raw = xi.astype(np.float64) * s + o
                if np.abs(raw - np.rint(raw)).max() < 2e-2 and fields[n].min() <= np.rint(raw).min() <= np.rint(raw).max() <= fields[n].max():
                    try:
                        locate(raw, fields[n].astype(np.int64))
                    except AssertionError:
                        continue
                    ok.append(n)
            assert len(ok) == 1
            found.add(ok[0])
    assert found == {"f0", "f1"}


def test_drop_empty_and_mask_targets(tmp_path):
    cfg, m = pattern_cfg(tmp_path, pipeline={"drop_empty": True, "empty_fraction": 0.05})
    n = 0
    for _, y in make_dataset(cfg, "train", True, m, targets=["mask"]).take(10):
        yv = y.numpy()
        assert set(np.unique(yv)) <= {0.0, 1.0}
        assert (yv.reshape(8, -1).mean(1) >= 0.05).all()
        n += 8
    cfg.pipeline.drop_empty = False
    fr = np.concatenate([y.numpy().reshape(8, -1).mean(1) for _, y in
                         make_dataset(cfg, "train", True, m, targets=["mask"]).take(10)])
    assert (fr < 0.05).any()  # without the filter empty crops do occur
    # drop_empty on a target channel uses its stored (Otsu) threshold
    cfg.pipeline.drop_empty = True
    thr = m["fields"]["f0"]["stats"]["tgt"]["threshold"][0]
    s = m["fields"]["f0"]["stats"]["tgt"]
    for _, y in make_dataset(cfg, "train", True, m).take(5):
        raw = y.numpy() * s["std"][0] + s["mean"][0]
        assert ((raw > thr).reshape(8, -1).mean(1) >= 0.05).all()


def test_crops_per_field_and_batch_shapes(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=2, pipeline={"crops_per_field": 1, "crop_size": 96})
    ds = make_dataset(cfg, "train", True, m, batch_size=3)
    assert ds.element_spec[0].shape.as_list() == [3, 96, 96, 1]
    x, y = next(iter(ds))
    assert x.shape == (3, 96, 96, 1)


# ------------------------------------------------------------------------------------------- eval
def test_eval_grid_is_deterministic_and_exact(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=3, fractions={"train": 0.34, "val": 0.66},
                         pipeline={"eval_mode": "grid"}, sizes=[(96, 128), (100, 70), (64, 64)])
    val = split_names(m, "val")
    ds = make_dataset(cfg, "val", False, m, batch_size=5, with_names=True)
    got = [(x.numpy(), y.numpy(), [n.decode() for n in names.numpy()]) for x, y, names in ds]
    again = [x.numpy() for x, _ in make_dataset(cfg, "val", False, m, batch_size=5)]
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), np.concatenate(again))
    xs = np.concatenate([g[0] for g in got])
    names = sum((g[2] for g in got), [])
    expected, exp_names = [], []
    for n in val:
        f = _field(cfg, n).astype(np.float64)
        h, w = f.shape
        ny, nx = h // 32, w // 32
        oy, ox = (h - ny * 32) // 2, (w - nx * 32) // 2
        z = (f - f.mean()) / f.std()
        for i in range(ny):
            for j in range(nx):
                expected.append(z[oy + 32 * i: oy + 32 * i + 32, ox + 32 * j: ox + 32 * j + 32, None])
                exp_names.append(n)
    np.testing.assert_allclose(xs, np.stack(expected), atol=1e-5)
    assert names == exp_names
    assert eval_steps(cfg, m, "val", 5) == len(got)


def test_eval_whole_fields(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=2, fractions={"val": 1.0}, pipeline={"eval_mode": "whole"},
                         sizes=[(100, 70), (64, 96)])
    out = [(x.numpy(), n.numpy()[0].decode()) for x, _, n in make_dataset(cfg, "val", False, m, with_names=True)]
    assert [o[0].shape for o in out] == [(1, 96, 64, 1), (1, 64, 96, 1)]  # batch 1: sizes differ
    for x, n in out:
        f = _field(cfg, n).astype(np.float64)
        np.testing.assert_allclose(x[0, ..., 0], ((f - f.mean()) / f.std())[:x.shape[1], :x.shape[2]], atol=1e-5)


def test_field_smaller_than_crop_is_a_clear_error(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=2, sizes=[(96, 128), (40, 200)])
    cfg.pipeline.crop_size = 64
    with pytest.raises(DataError, match=r"smaller than pipeline.crop_size 64: f1 \(40x200\)"):
        make_dataset(cfg, "train", True, m)
    with pytest.raises(DataError, match=r"split 'test' has no records"):
        make_dataset(cfg, "test", False, m)


# --------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def aiseg(aiseg_dir, tmp_path_factory, experiments_dir):
    out = tmp_path_factory.mktemp("aiseg_pipe")
    # the tests below check per-field z-scoring: pin it (the shipped config may choose another method)
    cfg = load_config(experiments_dir / "aiseg_nuclei_l1.json",
                      overrides={"data.records": str(out), "data.root": str(aiseg_dir),
                                 "pipeline.normalization": "zscore", "pipeline.crop_size": 256,
                                 "training.batch_size": 4})
    return cfg, records.convert(cfg, workers=2)


def test_aiseg_training_crop_uses_its_field_statistics(aiseg, aiseg_dir):
    cfg, m = aiseg
    cfg.pipeline.augment = False
    x, y = next(iter(make_dataset(cfg, "train", True, m)))
    assert x.shape == (4, 256, 256, 1) and y.shape == (4, 256, 256, 1)
    for xi, yi in zip(x.numpy()[..., 0], y.numpy()[..., 0]):
        hits = []
        for n in split_names(m, "train"):
            f = tifffile.imread(aiseg_dir / n / "brightfield.tif").astype(np.float64)
            raw = xi * f.std() + f.mean()
            if np.abs(raw - np.rint(raw)).max() > 1e-2:
                continue
            r = np.rint(raw)
            cand = f[:-255, :-255] == r[0, 0]
            for dy, dx in [(0, 1), (1, 0), (17, 33), (100, 7), (255, 255), (128, 200), (5, 250)]:
                cand &= f[dy:dy + 1024 - 255, dx:dx + 1024 - 255] == r[dy, dx]
            for y0, x0 in zip(*np.nonzero(cand)):
                if np.array_equal(f[y0:y0 + 256, x0:x0 + 256], r):
                    hits.append((n, y0, x0))
        assert len(hits) == 1
        n, y0, x0 = hits[0]
        t = tifffile.imread(aiseg_dir / n / "nuclei.tif").astype(np.float64)
        np.testing.assert_allclose(yi, (t[y0:y0 + 256, x0:x0 + 256] - t.mean()) / t.std(), atol=1e-4)


def test_aiseg_whole_val_fields_and_mask_targets(aiseg, aiseg_dir):
    cfg, m = aiseg
    for x, y, names in make_dataset(cfg, "val", False, m, with_names=True):
        assert x.shape == (4, 1024, 1024, 1)
        for xi, n in zip(x.numpy(), names.numpy()):
            f = tifffile.imread(aiseg_dir / n.decode() / "brightfield.tif").astype(np.float64)
            np.testing.assert_allclose(xi[..., 0], (f - f.mean()) / f.std(), atol=1e-4)
    x, y = next(iter(make_dataset(cfg, "train", True, m, targets=["mask"])))
    assert set(np.unique(y.numpy())) <= {0.0, 1.0} and y.numpy().max() == 1.0


def test_normalization_meta(aiseg, aiseg_dir):
    cfg, m = aiseg
    meta = normalization_meta(cfg, m)
    train = split_names(m, "train")
    nuc = [tifffile.imread(aiseg_dir / n / "nuclei.tif").astype(np.float64) for n in train]
    assert meta["method"] == "zscore" and meta["inputs"] == ["brightfield"] and meta["targets"] == ["nuclei"]
    assert meta["input_planes"] == 1 and meta["input_dtype"] == "uint8" and meta["input_dataset"] is None
    np.testing.assert_allclose(meta["target_scale"]["offset"], [np.mean([a.mean() for a in nuc])], rtol=1e-5)
    np.testing.assert_allclose(meta["target_scale"]["scale"], [np.mean([a.std() for a in nuc])], rtol=1e-5)
    cfg.pipeline.normalization = "dataset"
    meta = normalization_meta(cfg, m, targets=["mask"])
    bf = [tifffile.imread(aiseg_dir / n / "brightfield.tif").astype(np.float64) for n in train]
    np.testing.assert_allclose(meta["input_dataset"]["offset"], [np.mean([a.mean() for a in bf])], rtol=1e-5)
    assert meta["target_scale"] == {"offset": [0.0], "scale": [1.0]} and meta["target_masks"] == ["mask"]
    cfg.pipeline.normalization = "zscore"
    off, sc = offset_scale(m["fields"][train[0]]["stats"]["brightfield"], "zscore")
    np.testing.assert_allclose([off[0], sc[0]], [bf[0].mean(), bf[0].std()], rtol=1e-6)


def test_neurons_bands(neurons_dir, tmp_path, experiments_dir):
    cfg = load_config(experiments_dir / "isl_neurons_hoechst_l1.json",
                      overrides={"data.records": str(tmp_path / "rec"), "data.root": str(neurons_dir)})
    m = records.convert(cfg)
    x, y = next(iter(make_dataset(cfg, "train", True, m)))
    assert x.shape == (4, 128, 128, 3) and y.shape == (4, 128, 128, 1)
    tiles = sum(x.shape[0] for x, _ in make_dataset(cfg, "val", False, m))
    assert tiles == (144 // 128) * (1024 // 128)


def test_dihedral_matches_rot90_then_flip():
    import tensorflow as tf

    from islkeras.data.pipeline import dihedral

    a = np.arange(3 * 5 * 2).reshape(3, 5, 2).astype(np.uint16)
    for k in range(8):
        ref = tf.image.rot90(a, k % 4)
        ref = tf.image.flip_left_right(ref) if k >= 4 else ref
        np.testing.assert_array_equal(dihedral(tf, tf.constant(a), tf.constant(k)).numpy(), ref.numpy())


def test_fields_filter(tmp_path):
    cfg, m = pattern_cfg(tmp_path, n_fields=3, fractions={"train": 1.0}, pipeline={"eval_mode": "whole"})
    got = [n.decode() for _, _, names in make_dataset(cfg, "train", False, m, batch_size=1, with_names=True,
                                                      fields=["f2", "f0"]) for n in names.numpy()]
    assert got == ["f0", "f2"]
    fields = {n: _field(cfg, n) for n in ("f0", "f1", "f2")}
    for x, _ in make_dataset(cfg, "train", True, m, fields=["f1"]).take(2):
        s = m["fields"]["f1"]["stats"]["inp"]
        for xi in x.numpy()[..., 0]:
            locate(xi.astype(np.float64) * s["std"][0] + s["mean"][0], fields["f1"])
    with pytest.raises(DataError, match="fields f7: not records of split 'train'"):
        make_dataset(cfg, "train", True, m, fields=["f7"])


def test_balance_by_samples_groups_equally(tmp_path):
    """3 fields in group A, 1 in group B: balanced, B gives about half the crops (a quarter without)."""
    root = tmp_path / "data"
    write_pattern(root, 4, h=64, w=64)  # values of field i: 10000*i + 1..4096, so raw // 10000 is the field
    (root / "fields.csv").write_text("fov,split,group\nf0,train,A\nf1,train,A\nf2,train,A\nf3,train,B\n")
    split = {"csv": "fields.csv:split"}

    def fields_seen(balance_by):
        cfg, m = pattern_cfg(tmp_path, 4, split=split, h=64, w=64,
                             pipeline={"normalization": "dataset", "balance_by": balance_by})
        xo, xs = (float(a[0][0]) for a in _field_params(cfg, m, ["f0"], ["inp"], ["tgt"])[:2])  # same for all
        out = []
        for x, _ in make_dataset(cfg, "train", True, m).take(50):
            raw = np.rint(x.numpy()[..., 0] * xs + xo)
            out += [int(r.min()) // 10000 for r in raw]
        return np.bincount(out, minlength=4) / len(out)

    plain, balanced = fields_seen(None), fields_seen("group")
    assert plain[3] < 0.35 and 0.4 < balanced[3] < 0.6, (plain, balanced)
    assert (balanced[:3] > 0.08).all()  # every field of the larger group is still drawn
    cfg, m = pattern_cfg(tmp_path, 4, split=split, h=64, w=64, pipeline={"balance_by": "stain"})
    with pytest.raises(DataError, match="no column 'stain'"):
        make_dataset(cfg, "train", True, m)
