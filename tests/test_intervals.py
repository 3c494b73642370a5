"""Intervals (core/uncertainty): DeLong against the 1988 formulas written as O(N²) loops and
against a large bootstrap, resample formulas against the metrics of materialized resamples,
coverage of known-answer cases at the nominal rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score

from musc_pipeline.core import auroc, metrics
from musc_pipeline.core.uncertainty import category, delong, pixel_stats, resample


def _delong_slow(labels: np.ndarray, *score_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson (1988), eqs. for V10, V01, S10, S01, written as loops."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m, n = pos.size, neg.size

    def psi(x: float, y: float) -> float:
        return 1.0 if x > y else (0.5 if x == y else 0.0)

    v10 = np.array([[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in score_sets])
    v01 = np.array([[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in score_sets])
    theta = v10.mean(axis=1)
    k = len(score_sets)
    s10 = np.array([[sum((v10[r, i] - theta[r]) * (v10[q, i] - theta[q]) for i in range(m)) / (m - 1)
                     for q in range(k)] for r in range(k)])
    s01 = np.array([[sum((v01[r, j] - theta[r]) * (v01[q, j] - theta[q]) for j in range(n)) / (n - 1)
                     for q in range(k)] for r in range(k)])
    return theta, s10 / m + s01 / n


def _paired_scores(rng: np.random.Generator, m: int = 30, n: int = 40, ties: bool = True):
    labels = np.r_[np.ones(m, int), np.zeros(n, int)]
    a = rng.normal(size=m + n) + 1.2 * labels
    b = a + rng.normal(scale=0.8, size=m + n) - 0.3 * labels
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return labels, a, b


def test_delong_equals_slow_formulas_with_ties():
    labels, a, b = _paired_scores(np.random.default_rng(1))
    theta, cov = _delong_slow(labels, a, b)
    fast = delong.delong(labels, a, b)
    np.testing.assert_allclose(fast.auroc, theta, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast.cov, cov, rtol=0, atol=1e-10)
    est = delong.paired_auroc(labels, a, b)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert est.value == pytest.approx(theta[0] - theta[1], abs=1e-10)
    assert est.se == pytest.approx(se, abs=1e-10)
    assert est.p_value == pytest.approx(2 * norm.sf(abs(theta[0] - theta[1]) / se), abs=1e-10)


def _bootstrap_aurocs(labels: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each resample: images weighted by their multiplicities (pairs weighted w_i w_j)."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    wx, wy = w[:, labels == 1].astype(float), w[:, labels == 0].astype(float)
    return np.einsum("bi,ij,bj->b", wx, psi, wy) / (wx.sum(1) * wy.sum(1))


def test_delong_variance_agrees_with_a_large_bootstrap():
    labels, a, b = _paired_scores(np.random.default_rng(2), m=60, n=80, ties=False)
    w = resample.stratified_weights(labels, 6000, seed=3)
    ra, rb = _bootstrap_aurocs(labels, a, w), _bootstrap_aurocs(labels, b, w)
    d = delong.delong(labels, a, b)
    assert d.cov[0, 0] == pytest.approx(ra.var(), rel=0.1)
    assert d.cov[0, 0] + d.cov[1, 1] - 2 * d.cov[0, 1] == pytest.approx((ra - rb).var(), rel=0.1)


def test_delong_perfect_separation_and_identical_sets():
    labels = np.r_[np.ones(5, int), np.zeros(5, int)]
    scores = np.r_[np.arange(5) + 10.0, np.arange(5.0)]
    est = delong.auroc_interval(labels, scores)
    assert (est.value, est.se, est.lo, est.hi) == (1.0, 0.0, 1.0, 1.0)
    same = delong.paired_auroc(labels, scores, scores)
    assert (same.value, same.p_value) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 defective"):
        delong.delong(np.r_[1, 0, 0], np.r_[0.1, 0.2, 0.3])


def test_stratified_weights_keep_each_class_size():
    labels = np.r_[np.ones(7, int), np.zeros(11, int)]
    w = resample.stratified_weights(labels, 50, seed=0)
    assert (w[:, :7].sum(1) == 7).all() and (w[:, 7:].sum(1) == 11).all()
    assert np.array_equal(w, resample.stratified_weights(labels, 50, seed=0))


def test_image_replicates_equal_sklearn_on_materialized_resamples():
    labels, a, _ = _paired_scores(np.random.default_rng(4))
    w = resample.stratified_weights(labels, 20, seed=5)
    reps = category.image_replicates(labels, a, w)
    for b in range(w.shape[0]):
        idx = np.repeat(np.arange(labels.size), w[b])
        assert reps["image_ap"][b] == pytest.approx(average_precision_score(labels[idx], a[idx]), abs=1e-12)
        assert reps["image_f1_max"][b] == pytest.approx(metrics.f1_max(labels[idx], a[idx]), abs=1e-12)


def _pixels(rng: np.random.Generator, n_defect: int = 6, n_normal: int = 6, size: int = 24, tau: float = 0.7):
    """Maps with an image-level random effect u_i (the cluster) and square defects."""
    n = n_defect + n_normal
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n_defect):
        y, x = rng.integers(0, size - 8, 2)
        masks[i, y:y + 4 + i % 4, x:x + 5] = True
        masks[i, 0, 0] = i % 2 == 0  # a second region in some images
    u = rng.normal(scale=tau, size=(n, 1, 1))
    maps = (rng.normal(size=masks.shape) + u + 1.5 * masks).astype(np.float32)
    return masks, maps


def test_pixel_replicates_equal_metrics_on_materialized_resamples():
    masks, maps = _pixels(np.random.default_rng(6))
    stats = pixel_stats.pixel_stats(masks, maps)
    labels = masks.reshape(len(masks), -1).any(1)
    w = resample.stratified_weights(labels, 8, seed=7)
    lo, hi = maps.reshape(len(maps), -1).min(1).argmin(), maps.reshape(len(maps), -1).max(1).argmax()
    w[:, [lo, hi]] = np.maximum(w[:, [lo, hi]], 1)  # the resamples keep the category's min and max: same thresholds
    reps = stats.replicates(np.vstack([np.ones(len(masks)), w]))
    assert reps["pixel_auroc"][0] == auroc.pixel_auroc(masks, maps)  # the same integers, one division
    for b in range(len(w) + 1):
        idx = np.arange(len(masks)) if b == 0 else np.repeat(np.arange(len(masks)), w[b - 1])
        exact = metrics.pixel_metrics(masks[idx], maps[idx]).values
        assert reps["pixel_auroc"][b] == pytest.approx(exact["pixel_auroc"], abs=1e-12)
        assert reps["pixel_pro"][b] == pytest.approx(exact["pixel_pro"], abs=1e-12)
        assert reps["pixel_ap"][b] == pytest.approx(exact["pixel_ap"], abs=2e-3)  # binned
        assert reps["pixel_f1_max"][b] == pytest.approx(exact["pixel_f1_max"], abs=2e-3)


def test_pair_counts_numpy_path_equals_kernel():
    masks, maps = _pixels(np.random.default_rng(8))
    kernel = pixel_stats.pixel_stats(masks, maps).pair_counts
    searches = pixel_stats.pixel_stats(masks, maps.astype(np.float64)).pair_counts
    assert auroc.load() is not None and np.array_equal(kernel, searches)


def test_delong_interval_covers_a_known_auroc_at_the_nominal_rate():
    """Binormal scores, separation d: AUROC = Φ(d/√2). 400 datasets of 25 + 25 images."""
    rng, d, trials = np.random.default_rng(9), 1.0, 400
    truth = norm.cdf(d / math.sqrt(2))
    labels = np.r_[np.ones(25, int), np.zeros(25, int)]
    hits = 0
    for _ in range(trials):
        est = delong.auroc_interval(labels, rng.normal(size=50) + d * labels)
        hits += est.lo <= truth <= est.hi
    assert abs(hits / trials - 0.95) < 3 * math.sqrt(0.95 * 0.05 / trials)


def test_cluster_bootstrap_covers_a_known_pixel_auroc_at_the_nominal_rate():
    """Pixels N(1.5·defect + u_image, 1), u_image ~ N(0, τ²): a pair from two images differs by
    N(1.5, 2 + 2τ²), a pair from one image by N(1.5, 2), so E[pixel AUROC] is known for the
    design. At the demo's 48 + 48 images the interval of the bootstrap over images covers it
    at the nominal 95 % (with τ = 0.7, a stronger cluster effect, 40 + 40 images cover 91 %:
    docs/intervals.md)."""
    rng, trials, tau = np.random.default_rng(10), 300, 0.4
    how = category.Resampling(resamples=200, seed=0)
    hits = 0
    for t in range(trials):
        masks, maps = _pixels(rng, n_defect=48, n_normal=48, size=10, tau=tau)
        flat = masks.reshape(len(masks), -1)
        pos, neg = flat.sum(1).astype(float), (~flat).sum(1).astype(float)
        same = (pos * neg).sum() / (pos.sum() * neg.sum())
        truth = same * norm.cdf(1.5 / math.sqrt(2)) + (1 - same) * norm.cdf(1.5 / math.sqrt(2 + 2 * tau**2))
        stats = pixel_stats.pixel_stats(masks, maps, bins=16)
        w = resample.stratified_weights(flat.any(1), how.resamples, seed=t)
        est = resample.percentile(stats.replicates(w)["pixel_auroc"], math.nan, how.level)
        hits += est.lo <= truth <= est.hi
    assert abs(hits / trials - 0.95) < 3 * math.sqrt(0.95 * 0.05 / trials)


def test_paired_deltas_of_identical_sets_are_zero_and_means_combine_variances():
    masks, maps = _pixels(np.random.default_rng(11))
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    how = category.Resampling(resamples=100)
    point = metrics.image_metrics(labels, scores).values | metrics.pixel_metrics(masks, maps).values
    s = category.score_set(scores, masks, maps, how)
    out = category.paired(labels, s, s, point, point, how)
    assert all(e.value == 0.0 and e.p_value == 1.0 and e.lo == e.hi == 0.0 for e in out.values())
    single = category.intervals(labels, s, point, how)
    assert all(e.lo <= e.value <= e.hi for e in single.values())
    a, b = delong.Estimate(0.8, 0.03, 0, 0), delong.Estimate(0.9, 0.04, 0, 0)
    mean = category.mean_over_categories([a, b, delong.Estimate(math.nan, math.nan, 0, 0)])
    assert mean.value == pytest.approx(0.85) and mean.se == pytest.approx(0.025)
