"""The bootstrap over images: stratified resamples as multiplicities, and what replicates say.

A resample draws the defective images and the normal images separately, each with replacement
and as many as there are (stratified: every replicate keeps the category's defect share, and
always has both classes). Replicate b is a vector of multiplicities w_b (how often each image
was drawn), so a metric of the resample is the metric of the images weighted by w_b — every
image-level and pixel-level metric here is computed from per-image counts multiplied by W
(B×N), never by copying maps. Paired comparisons use the same W for both score sets.

Intervals are percentile intervals of the replicates (Efron & Tibshirani 1993, *An
Introduction to the Bootstrap*, ch. 13); the p-value of a paired Δ is the two-sided
bootstrap p-value 2·min(#{Δ*_b ≤ 0}, #{Δ*_b ≥ 0}) + 1 over B + 1, capped at 1.
"""

from __future__ import annotations

import numpy as np

from musc_pipeline.core.uncertainty.delong import Estimate


def stratified_weights(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """W (resamples × N, int32): multiplicities of N images in stratified bootstrap resamples."""
    labels = np.asarray(labels).astype(bool).ravel()
    rng = np.random.default_rng(seed)
    w = np.zeros((resamples, labels.size), dtype=np.int32)
    rows = np.arange(resamples)[:, None]
    for members in (np.flatnonzero(labels), np.flatnonzero(~labels)):
        if members.size:
            drawn = members[rng.integers(0, members.size, size=(resamples, members.size))]
            np.add.at(w, (np.broadcast_to(rows, drawn.shape), drawn), 1)
    return w


def curve_metrics(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AP, F1-max) of B weighted samples from their counts per score group, groups in
    descending score order (B×G each; a group is one distinct score, or one bin).

    Each group is one threshold of scikit-learn's precision–recall curve: AP = Σ_g ΔR_g · P_g,
    F1 = 2 TP / (P_total + TP + FP). A group with no weight adds ΔR = 0 and repeats the
    previous F1, so groups absent from a resample change nothing (as if they were not there)."""
    tp, fp = np.cumsum(positives, axis=1, dtype=np.float64), np.cumsum(negatives, axis=1, dtype=np.float64)
    total = tp[:, -1:]
    drawn = tp + fp
    precision = np.divide(tp, drawn, out=np.zeros_like(tp), where=drawn > 0)
    ap = (positives * precision).sum(axis=1) / total[:, 0]
    f1 = (2 * tp / (total + drawn)).max(axis=1)
    return ap, f1


def percentile(replicates: np.ndarray, value: float, level: float, shift: float = 0.0) -> Estimate:
    """``value`` with the replicates' standard deviation and percentile interval (moved by
    ``shift``, see :mod:`pixel_stats` for binned replicates). NaN replicates (undefined in a
    resample) are left out; all NaN gives a NaN interval."""
    r = replicates[~np.isnan(replicates)] + shift
    if r.size == 0:
        return Estimate(value, np.nan, np.nan, np.nan)
    lo, hi = np.quantile(r, [0.5 - level / 2, 0.5 + level / 2])
    return Estimate(value, float(r.std(ddof=1)) if r.size > 1 else 0.0, float(lo), float(hi))


def paired(replicates_a: np.ndarray, replicates_b: np.ndarray, delta: float, level: float, shift: float = 0.0) -> Estimate:
    """Δ = a − b with the paired bootstrap's interval and two-sided p-value (same W on both sides)."""
    d = replicates_a - replicates_b
    d = d[~np.isnan(d)] + shift
    est = percentile(d, delta, level)
    if d.size == 0:
        return est
    p = min(1.0, (2 * min(int((d <= 0).sum()), int((d >= 0).sum())) + 1) / (d.size + 1))
    return Estimate(est.value, est.se, est.lo, est.hi, p)
