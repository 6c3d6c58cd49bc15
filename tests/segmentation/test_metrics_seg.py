"""Tests for islkeras.segmentation.metrics: instance AP, pixel IoU/accuracy, mask Jaccard from fluorescence."""
from __future__ import annotations


import numpy as np
import pytest
from testkit import require_extra

from islkeras.segmentation.metrics import (
    _n_matches,
    average_precision,
    iou_binary,
    iou_matrix,
    mask_jaccard_from_fluorescence,
    pixel_accuracy,
)



def _cellpose_metrics():
    require_extra("cellpose", "cellpose.metrics")
    from cellpose import metrics

    return metrics


def _squares(shape, boxes, ids=None) -> np.ndarray:
    """Label image with axis-aligned rectangles (y0, x0, h, w), labelled ids (default 1..n)."""
    lab = np.zeros(shape, np.uint16)
    ids = ids or range(1, len(boxes) + 1)
    for k, (y, x, h, w) in zip(ids, boxes):
        lab[y:y + h, x:x + w] = k
    return lab


BOXES = [(5, 5, 10, 10), (5, 30, 10, 10), (30, 5, 12, 8), (30, 30, 8, 14)]


def test_perfect_match_is_one():
    t = _squares((50, 50), BOXES)
    r = average_precision(t, t.copy())
    assert (r.tp, r.fp, r.fn, r.n_true, r.n_pred) == (4, 0, 0, 4, 4)
    assert r.ap == 1.0 and r.precision == 1.0 and r.recall == 1.0


def test_one_nucleus_missing():
    t = _squares((50, 50), BOXES)
    p = _squares((50, 50), BOXES[:3])
    r = average_precision(t, p)
    assert (r.tp, r.fp, r.fn) == (3, 0, 1)
    assert r.ap == pytest.approx(3 / 4)
    # an extra false object on top
    p[45:49, 45:49] = 9
    r = average_precision(t, p)
    assert (r.tp, r.fp, r.fn) == (3, 1, 1)
    assert r.ap == pytest.approx(3 / 5)


def test_shifted_labels_depend_on_threshold():
    t = _squares((50, 50), [(10, 10, 10, 10)])
    p = _squares((50, 50), [(10, 12, 10, 10)])  # 2 px shift: IoU = 80 / 120
    iou, tids, pids = iou_matrix(t, p)
    assert iou.shape == (1, 1) and iou[0, 0] == pytest.approx(80 / 120)
    r50, r75 = average_precision(t, p, [0.5, 0.75])
    assert r50.ap == 1.0
    assert (r75.tp, r75.fp, r75.fn) == (0, 1, 1) and r75.ap == 0.0
    far = _squares((50, 50), [(10, 16, 10, 10)])  # IoU = 40 / 160 < 0.5
    assert average_precision(t, far).ap == 0.0


def test_missing_label_numbers_are_ignored():
    t = _squares((50, 50), BOXES, ids=[1, 5, 9, 200])
    p = _squares((50, 50), BOXES, ids=[3, 2, 1000, 7])
    r = average_precision(t, p)
    assert (r.tp, r.fp, r.fn, r.n_true, r.n_pred) == (4, 0, 0, 4, 4)
    iou, tids, pids = iou_matrix(t, p)
    assert list(tids) == [1, 5, 9, 200] and list(pids) == [2, 3, 7, 1000]
    assert np.allclose(np.sort(iou.max(axis=1)), 1.0)


def test_split_nucleus_counts_one_tp_one_fp():
    t = _squares((30, 30), [(5, 5, 10, 10)])
    p = np.zeros_like(t)
    p[5:15, 5:11] = 1  # 60 % of the nucleus: IoU 0.6
    p[5:15, 11:15] = 2  # 40 %: IoU 0.4
    r = average_precision(t, p)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    assert r.ap == pytest.approx(0.5)


def test_matching_is_one_to_one_and_maximal():
    # true 0 overlaps pred 0 best, but matching (0,1)+(1,0) finds two pairs above 0.3
    ti = np.array([0, 0, 1])
    pj = np.array([0, 1, 0])
    iou = np.array([0.9, 0.4, 0.4])
    assert _n_matches(ti, pj, iou, 0.3) == 2
    assert _n_matches(ti, pj, iou, 0.5) == 1
    assert _n_matches(ti, pj, iou, 0.95) == 0


def test_empty_cases():
    z = np.zeros((20, 20), np.uint16)
    one = _squares((20, 20), [(2, 2, 5, 5)])
    assert average_precision(z, z).ap == 1.0  # nothing to find, nothing found
    r = average_precision(one, z)
    assert (r.tp, r.fp, r.fn) == (0, 0, 1) and r.ap == 0.0
    r = average_precision(z, one)
    assert (r.tp, r.fp, r.fn) == (0, 1, 0) and r.ap == 0.0
    assert iou_binary(z, z) == 1.0  # thesis rule: both empty -> IoU 1
    assert iou_binary(one, z) == 0.0
    assert iou_binary(z, one) == 0.0


def test_iou_binary_and_pixel_accuracy_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True  # 20 px
    b[2:6, 0:5] = True  # 20 px, overlap 10
    assert iou_binary(a, b) == pytest.approx(10 / 30)
    assert pixel_accuracy(a, b) == pytest.approx(80 / 100)
    # label images count as masks (any non-zero is foreground)
    assert iou_binary(a.astype(np.uint16) * 7, b) == pytest.approx(10 / 30)
    assert pixel_accuracy(a, a) == 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        average_precision(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(TypeError, match="integer label image"):
        average_precision(np.zeros((4, 4), float), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="threshold"):
        average_precision(np.zeros((4, 4), int), np.zeros((4, 4), int), 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        iou_binary(np.zeros((4, 4)), np.zeros((5, 4)))


@pytest.mark.data
def test_ap_on_stardist_mask_shifted(stardist_dir):
    import tifffile

    m = tifffile.imread(stardist_dir / "mask2d.tif")
    assert average_precision(m, m).ap == 1.0  # 125 nuclei with ids up to 183: gaps are harmless
    r = average_precision(m, np.roll(m, 3, axis=1))
    assert r.n_true == 125 and 0.8 < r.ap < 1.0


@pytest.mark.data
@pytest.mark.cellpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_matches_cellpose_average_precision_on_renumbered_labels(stardist_dir):
    import tifffile
    from skimage.segmentation import relabel_sequential

    from islkeras.segmentation.classical import segment_classical

    metrics = _cellpose_metrics()
    d = stardist_dir
    true = tifffile.imread(d / "mask2d.tif")
    preds = [segment_classical(tifffile.imread(d / "img2d.tif")), np.roll(true, 3, axis=1),
             np.roll(true, (4, -2), axis=(0, 1)), np.zeros_like(true)]
    ths = [0.5, 0.75, 0.9]
    for pred in preds:
        ours = average_precision(true, pred, ths)
        ap, tp, fp, fn = metrics.average_precision(relabel_sequential(true)[0], relabel_sequential(pred)[0], ths)
        assert [r.tp for r in ours] == list(tp.astype(int))
        assert [r.fp for r in ours] == list(fp.astype(int))
        assert [r.fn for r in ours] == list(fn.astype(int))
        assert np.allclose([r.ap for r in ours], ap, atol=1e-6)
    # and why we renumber: cellpose counts the missing numbers 1..183 of the raw labels as objects
    raw = float(np.ravel(metrics.average_precision(true, true, [0.5])[0])[0])
    assert raw < 0.8 and average_precision(true, true).ap == 1.0


def test_mask_jaccard_from_fluorescence():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    img = np.zeros((96, 96), np.float32)
    for cy, cx in [(20, 20), (20, 70), (70, 30), (65, 72)]:
        img += 100.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 81)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    # same nuclei on another intensity scale (a prediction) -> same masks
    assert mask_jaccard_from_fluorescence(img * 0.01 + 5.0, img) > 0.99
    # a prediction that misses two of the four nuclei
    half = img.copy()
    half[48:, :] = rng.normal(0, 3, (48, 96))
    j = mask_jaccard_from_fluorescence(half, img)
    assert 0.3 < j < 0.7
    from islkeras.segmentation.masks import make_segmenter

    assert mask_jaccard_from_fluorescence(half, img, method=make_segmenter("classical")) == pytest.approx(j)
    with pytest.raises(ValueError, match="unknown method"):
        mask_jaccard_from_fluorescence(img, img, method="magic")
