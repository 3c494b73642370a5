"""Intervals of one category's 7 metrics, and paired differences of two score sets on its images.

- image AUROC: DeLong (:mod:`delong`); paired: DeLong's paired test;
- image AP, F1-max: the stratified bootstrap over images, exact per resample;
- pixel AUROC, AP, F1-max, AUPRO: the same resamples of images (:mod:`pixel_stats`).

One set of multiplicities W serves all six bootstrap metrics (and both sides of a paired
comparison), so their replicates are the same resamples. ``point`` is the category's exact
metric values (:mod:`musc_pipeline.core.metrics`): each interval is placed around it by the
offset point − replicate-formula-at-w=1 (0 up to rounding except for the binned pixel AP and
F1-max, see :mod:`pixel_stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from musc_pipeline.core.uncertainty import delong, pixel_stats, resample
from musc_pipeline.core.uncertainty.delong import Estimate

BOOTSTRAP_METRICS = ("image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_pro")


@dataclass(frozen=True)
class Resampling:
    """How intervals are made: B resamples from ``seed``, ``level`` coverage, ``bins`` for pixel AP/F1."""

    resamples: int = 200
    seed: int = 0
    level: float = 0.95
    bins: int = 2048


def image_replicates(labels: np.ndarray, scores: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Exact image AP and F1-max of each resample (rows of w), ties grouped as scikit-learn does."""
    labels = np.asarray(labels).astype(bool)
    values, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    onehot = np.zeros((labels.size, values.size))
    onehot[np.arange(labels.size), group] = 1.0
    onehot = onehot[:, ::-1]  # highest score first
    w = np.asarray(w, dtype=np.float64)
    ap, f1 = resample.curve_metrics((w * labels) @ onehot, (w * ~labels) @ onehot)
    return {"image_f1_max": f1, "image_ap": ap}


@dataclass(frozen=True)
class ScoreSet:
    """One score set of a category: image scores and (optionally) the S×S maps' per-image counts."""

    scores: np.ndarray
    pixels: pixel_stats.PixelStats | None

    def replicates(self, labels: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
        out = image_replicates(labels, self.scores, w)
        if self.pixels is not None:
            out |= self.pixels.replicates(w)
        return out


def score_set(scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None, how: Resampling) -> ScoreSet:
    """A :class:`ScoreSet`; the pixel part only where there are masks with both classes."""
    usable = masks is not None and maps is not None and np.any(masks) and not np.all(masks)
    return ScoreSet(np.asarray(scores, dtype=np.float64), pixel_stats.pixel_stats(masks, maps, how.bins) if usable else None)


def _two_classes(labels: np.ndarray) -> bool:
    labels = np.asarray(labels).astype(bool)
    return int(labels.sum()) >= 2 and int((~labels).sum()) >= 2


def intervals(labels: np.ndarray, scores: ScoreSet, point: dict[str, float], how: Resampling) -> dict[str, Estimate]:
    """Estimate (value, se, lo, hi) of each metric with a value in ``point`` (NaN ones stay NaN)."""
    nan = {k: Estimate(v, math.nan, math.nan, math.nan) for k, v in point.items()}
    if not _two_classes(labels):
        return nan
    out = dict(nan)
    out["image_auroc"] = delong.auroc_interval(labels, scores.scores, how.level)
    w = resample.stratified_weights(labels, how.resamples, how.seed)
    reps = scores.replicates(labels, w)
    at_one = scores.replicates(labels, np.ones((1, len(labels))))
    for k, r in reps.items():
        if k in point and not math.isnan(point[k]):
            out[k] = resample.percentile(r, point[k], how.level, shift=point[k] - float(at_one[k][0]))
    return out


def paired(labels: np.ndarray, a: ScoreSet, b: ScoreSet, point_a: dict[str, float], point_b: dict[str, float] | None,
           how: Resampling) -> dict[str, Estimate]:
    """Δ = a − b of each metric valued on both sides: estimate, interval and p-value.
    b's values missing from ``point_b`` (or NaN there) are the resample formulas at w = 1 (exact
    but for the binned pixel AP and F1-max): for a score set whose exact metrics are unknown."""
    ones = np.ones((1, len(labels)))
    one_a, one_b = a.replicates(labels, ones), b.replicates(labels, ones)
    formula_b = {k: float(v[0]) for k, v in one_b.items()}
    if _two_classes(labels):
        formula_b["image_auroc"] = float(delong.delong(labels, b.scores).auroc[0])
    point_b = formula_b | {k: v for k, v in (point_b or {}).items() if not math.isnan(v)}
    deltas = {k: point_a[k] - point_b[k] for k in point_a if k in point_b}
    out = {k: Estimate(d, math.nan, math.nan, math.nan) for k, d in deltas.items()}
    if not _two_classes(labels):
        return out
    if "image_auroc" in deltas and not math.isnan(deltas["image_auroc"]):
        out["image_auroc"] = delong.paired_auroc(labels, a.scores, b.scores, how.level)
    w = resample.stratified_weights(labels, how.resamples, how.seed)
    reps_a, reps_b = a.replicates(labels, w), b.replicates(labels, w)
    for k in reps_a.keys() & reps_b.keys() & deltas.keys():
        if not math.isnan(deltas[k]):
            shift = deltas[k] - float(one_a[k][0] - one_b[k][0])
            out[k] = resample.paired(reps_a[k], reps_b[k], deltas[k], how.level, shift)
    return out


def mean_over_categories(estimates: list[Estimate], level: float = 0.95, clip: bool = True) -> Estimate:
    """The mean of per-category values with its interval. Categories are independent samples
    (their resamples are drawn independently), so Var(mean) = Σ_c se_c² / C²; the interval is
    mean ± z·se, clipped to [0, 1] for metrics (``clip``; not for differences). NaN categories
    are left out of value and variance alike."""
    kept = [e for e in estimates if not math.isnan(e.value)]
    if not kept:
        return Estimate(math.nan, math.nan, math.nan, math.nan)
    value = float(np.mean([e.value for e in kept]))
    se = math.sqrt(sum(e.se ** 2 for e in kept)) / len(kept)
    z = norm.ppf(0.5 + level / 2)
    lo, hi = value - z * se, value + z * se
    return Estimate(value, se, max(0.0, lo), min(1.0, hi)) if clip else Estimate(value, se, lo, hi)
