"""Metrics (SPEC §8): scikit-learn agreement, brute-force F1-max and both PRO variants."""

from __future__ import annotations

import math
from bisect import bisect

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from musc_pipeline.core import metrics


# --------------------------------------------------------------------------- helpers


def _f1_brute(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 over every threshold 'score >= t' (t = each distinct score)."""
    labels = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        if tp == 0:
            continue
        precision, recall = tp / (tp + fp), tp / labels.sum()
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _aupro_slow(
    masks: np.ndarray, maps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3, connectivity: int = 2
) -> float:
    """The authors' (cflow-ad) loop: threshold 200 times, label regions with skimage
    (connectivity=2: 8-connected)."""
    binary = np.zeros_like(maps, dtype=bool)
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / max_step
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        binary[maps <= th], binary[maps > th] = False, True
        pro = []
        for b, m in zip(binary, masks):
            for region in measure.regionprops(measure.label(m, connectivity=connectivity)):
                tp = b[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp / region.area)
        inverse = ~masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(pro))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pros[keep]))


def _aupro_mvtec_slow(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """MVTec's official AU-PRO, threshold by threshold ('>= t'), trapezoid with the
    official interpolation at the limit (bisect on the FPRs), divided by the limit."""
    regions, region_imgs = [], []
    for i, m in enumerate(masks):
        lab = measure.label(m, connectivity=2)
        for k in range(1, lab.max() + 1):
            regions.append(lab == k)
            region_imgs.append(i)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.sum(pred & ~masks) / np.sum(~masks))
        pros.append(np.mean([np.sum(pred[i][r]) / r.sum() for i, r in zip(region_imgs, regions)]))
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if limit not in x:
        ins = bisect(list(x), limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (limit - x[ins - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    return float((np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / limit)


def _random_pixels(seed: int, n: int = 3, size: int = 20):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):  # a few rectangles, some touching only diagonally
            r, c = rng.integers(0, size - 4, 2)
            hh, ww = rng.integers(1, 5, 2)
            masks[i, r : r + hh, c : c + ww] = True
        masks[i, rng.integers(0, size), rng.integers(0, size)] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.uniform(0.3, 1.5, masks.shape)
    return masks, maps


def _hand_case():
    """5×5 image, two ground-truth regions, map values in {0, 50, 100, 150, 200}.

    Region A = {(0,0), (1,1)}: one region only with 8-connectivity (diagonal neighbours).
    Region B = {(3,3), (3,4), (4,3)}. The other 20 pixels are normal.
    """
    mask = np.zeros((5, 5), dtype=bool)
    for rc in [(0, 0), (1, 1), (3, 3), (3, 4), (4, 3)]:
        mask[rc] = True
    amap = np.zeros((5, 5))
    amap[0, 0], amap[1, 1] = 200, 50  # region A
    amap[3, 3], amap[3, 4], amap[4, 3] = 200, 100, 0  # region B
    amap[0, 4], amap[2, 0] = 150, 100  # normal pixels
    amap[4, 0], amap[0, 2] = 50, 50  # normal pixels; the other 16 normal pixels are 0
    return mask[None], amap[None]


# --------------------------------------------------------------------------- image / pixel


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = rng.normal(size=40) + labels * 0.8
    res = metrics.image_metrics(labels, scores)
    assert res.notes == []
    assert res.values["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert res.values["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert res.values["image_f1_max"] == pytest.approx(_f1_brute(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_f1_max_with_ties_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # many ties
    assert metrics.f1_max(labels, scores) == pytest.approx(_f1_brute(labels, scores), abs=1e-12)


def test_f1_max_hand_case():
    # scores 0.9 (defect), 0.8 (good), 0.7 (defect), 0.1 (good):
    # t = 0.9: P=1, R=1/2 → F1 2/3; t = 0.7: P=2/3, R=1 → F1 0.8; → max 0.8
    assert metrics.f1_max(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", [5, 6])
def test_pixel_metrics_match_sklearn(seed):
    masks, maps = _random_pixels(seed)
    res = metrics.pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert res.values["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert res.values["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert res.values["pixel_f1_max"] == pytest.approx(_f1_brute(y, s), abs=1e-12)
    assert res.values["pixel_pro"] == pytest.approx(_aupro_slow(masks, maps), abs=1e-12)


@pytest.mark.parametrize("labels, which", [([0, 0, 0, 0], "only normal"), ([1, 1, 1], "only anomalous")])
def test_one_class_image_labels_give_nan_with_note(labels, which):
    res = metrics.image_metrics(np.array(labels), np.arange(len(labels), dtype=float))
    assert set(res.values) == set(metrics.IMAGE_METRICS)
    assert all(math.isnan(v) for v in res.values.values())
    assert len(res.notes) == 1 and which in res.notes[0]


def test_all_normal_pixels_give_nan_with_note():
    rng = np.random.default_rng(0)
    res = metrics.pixel_metrics(np.zeros((2, 6, 6), dtype=bool), rng.normal(size=(2, 6, 6)))
    assert set(res.values) == set(metrics.PIXEL_METRICS)
    assert all(math.isnan(v) for v in res.values.values())
    assert res.notes and "only normal" in res.notes[0]


def test_pixel_shape_mismatch_raises():
    with pytest.raises(ValueError, match="N×H×W"):
        metrics.pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))


# --------------------------------------------------------------------------- PRO (authors)


def test_aupro_hand_computed():
    """Worked by hand for _hand_case().

    min = 0, max = 200 → thresholds arange(0, 200, 1.0) = 0, 1, …, 199 (200 values);
    a pixel is anomalous when value > t. 20 normal pixels: values 150, 100, 50, 50 and 16×0.

      t in [0, 49]   : A: 200, 50 > t → 2/2; B: 200, 100 → 2/3; PRO = (1 + 2/3)/2   = 5/6
                       FP: 150, 100, 50, 50 → FPR = 4/20 = 0.20
      t in [50, 99]  : A: 1/2; B: 2/3; PRO = (1/2 + 2/3)/2 = 7/12;  FPR = 2/20 = 0.10
      t in [100, 149]: A: 1/2; B: 1/3; PRO = (1/2 + 1/3)/2 = 5/12;  FPR = 1/20 = 0.05
      t in [150, 199]: A: 1/2; B: 1/3; PRO = 5/12;                  FPR = 0
    All FPRs < 0.3, kept. Rescaled by their min 0 and max 0.2: 1, 0.5, 0.25, 0.
    Trapezoids (repeated points add nothing):
      [0, 0.25]  : 0.25 · 5/12                = 5/48
      [0.25, 0.5]: 0.25 · (5/12 + 7/12)/2     = 6/48
      [0.5, 1]   : 0.5  · (7/12 + 10/12)/2    = 17/48
    AUPRO = 28/48 = 7/12 ≈ 0.58333.
    (With 4-connectivity A would be two regions and the value 43/72 ≈ 0.597.)
    """
    masks, maps = _hand_case()
    assert metrics.aupro(masks, maps) == pytest.approx(7 / 12, abs=1e-12)
    assert _aupro_slow(masks, maps) == pytest.approx(7 / 12, abs=1e-12)


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_aupro_equals_slow_threshold_loop(seed):
    masks, maps = _random_pixels(seed)
    assert metrics.aupro(masks, maps) == pytest.approx(_aupro_slow(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed", [14, 15])
def test_aupro_on_threshold_grid_values_equals_slow_loop(seed):
    """Map values exactly on the threshold grid (integers 0..200, step 1): here '> t' and
    '>= t' give different curves, so this pins the authors' strict '>'."""
    masks, maps = _random_pixels(seed)
    rng = np.random.default_rng(seed)
    maps = np.clip(np.round(100 + 40 * maps + 30 * rng.normal(size=maps.shape)), 0, 200)
    maps.flat[0], maps.flat[1] = 0, 200
    assert metrics.aupro(masks, maps) == pytest.approx(_aupro_slow(masks, maps), abs=1e-12)


def test_aupro_uses_eight_connectivity():
    masks, maps = _hand_case()
    four = _aupro_slow(masks, maps, connectivity=1)  # region A split into two
    assert four == pytest.approx(43 / 72, abs=1e-12)
    assert abs(metrics.aupro(masks, maps) - four) > 1e-3


def test_aupro_constant_map_is_nan():
    masks, _ = _hand_case()
    assert math.isnan(metrics.aupro(masks, np.ones(masks.shape)))


def test_aupro_without_regions_raises():
    with pytest.raises(ValueError, match="region"):
        metrics.aupro(np.zeros((1, 4, 4), bool), np.random.default_rng(0).normal(size=(1, 4, 4)))


# --------------------------------------------------------------------------- PRO (MVTec)


def test_aupro_mvtec_perfect_map_is_one():
    masks, _ = _random_pixels(20)
    assert metrics.aupro_mvtec(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(1)  # any map ranking every anomalous pixel above every normal one
    maps = np.where(masks, 2 + rng.uniform(size=masks.shape), rng.uniform(size=masks.shape))
    assert metrics.aupro_mvtec(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_mvtec_hand_computed():
    """Worked by hand for _hand_case(), official variant ('>= t', every distinct value).

      t = 200: A 1/2, B 1/3 → PRO 5/12;  FPR 0
      t = 150: PRO 5/12;                 FPR 1/20 = 0.05
      t = 100: A 1/2, B 2/3 → 7/12;      FPR 2/20 = 0.10
      t =  50: A 1,   B 2/3 → 5/6;       FPR 4/20 = 0.20
      t =   0: PRO 1;                    FPR 1
    Curve with (0, 0) prepended: (0,0) (0,5/12) (0.05,5/12) (0.1,7/12) (0.2,5/6) (1,1).
    PRO at 0.3 interpolated between (0.2, 5/6) and (1, 1): 5/6 + (1/6)(0.1/0.8) = 41/48.
    Area on [0, 0.3]:
      [0, 0.05]  : 0.05 · 5/12                 = 20/960
      [0.05, 0.1]: 0.05 · (5/12 + 7/12)/2      = 24/960
      [0.1, 0.2] : 0.1  · (7/12 + 10/12)/2     = 68/960
      [0.2, 0.3] : 0.1  · (40/48 + 41/48)/2    = 81/960
    total 193/960; divided by 0.3 → 193/288 ≈ 0.67014.
    """
    masks, maps = _hand_case()
    assert metrics.aupro_mvtec(masks, maps) == pytest.approx(193 / 288, abs=1e-12)
    assert _aupro_mvtec_slow(masks, maps) == pytest.approx(193 / 288, abs=1e-12)


@pytest.mark.parametrize("seed", [30, 31])
def test_aupro_mvtec_equals_slow_threshold_loop(seed):
    masks, maps = _random_pixels(seed, size=12)
    maps = np.round(maps, 1)  # ties: one curve point per distinct value
    assert metrics.aupro_mvtec(masks, maps) == pytest.approx(_aupro_mvtec_slow(masks, maps), abs=1e-9)


def test_aupro_nan_when_no_threshold_has_fpr_below_limit():
    """A coarse map whose maximum covers ≥ 30 % of the normal pixels: every threshold has
    FPR ≥ 0.3, no curve point is kept, PRO is undefined (NaN), not a crash."""
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :2, :2] = True
    maps = np.zeros((1, 10, 10))
    maps[0, :5, :] = 1.0  # 46 of 96 normal pixels at the maximum
    assert math.isnan(metrics.aupro(masks, maps))
    res = metrics.pixel_metrics(masks, maps)
    assert math.isnan(res.values["pixel_pro"]) and not math.isnan(res.values["pixel_auroc"])
