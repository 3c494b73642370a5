"""Per-image counts from which every pixel metric of a resample of images follows (the
bootstrap over images: an image's pixels go in and out together — a defect region's pixels are
not independent, the image is the cluster).

With multiplicities w (N) of the images:

- **AUROC, exact.** U[i, j] = Σ_{p defect pixel of image i} (#normal pixels of j below p + #
  at or below p) — twice the Mann–Whitney count with ½ for ties, by the merge kernel of
  :mod:`musc_pipeline.core.auroc` (one pass per image j over all defect pixels, sorted once).
  AUROC(w) = wᵀUw / (2 · (w·P)(w·N)) with P, N the defect and normal pixel counts. At w = 1
  it is :func:`auroc.pixel_auroc` to the last bit (the same integers, divided once).
- **AUPRO, exact for the authors' thresholds of the whole category.** Per image: Σ over its
  ground-truth regions of the fraction above each of the 200 thresholds, its region count, its
  normal pixels above each threshold and in all; the weighted sums give PRO(t) and FPR(t),
  then the same clip at FPR < 0.3, rescaling and trapezoids as :func:`metrics.aupro`. The
  thresholds stay those of the full category (a resample's own min and max would move them
  by a fraction of one step).
- **AP and F1-max, binned.** Defect and normal pixels per image counted in ``bins`` bins whose
  edges are quantiles of the defect pixels' values; each bin is one threshold of the curve.
  The binned value differs from the exact one by the spread of precision within a bin
  (< 1e-3 at 2048 bins on the demo, ``benchmarks/intervals.py``); the replicates are moved by
  exact − binned of the full category, so the interval sits around the exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from musc_pipeline.core import auroc, metrics
from musc_pipeline.core.uncertainty.resample import curve_metrics


@dataclass(frozen=True)
class PixelStats:
    """Per-image counts of one category's maps against its masks (N images)."""

    defect_pixels: np.ndarray  # N
    normal_pixels: np.ndarray  # N
    pair_counts: np.ndarray  # N×N float64 (integers): U above
    bin_defect: np.ndarray  # N×K, bins in descending score order
    bin_normal: np.ndarray  # N×K
    region_fractions: np.ndarray  # N×T: Σ over the image's regions of the fraction above threshold t
    region_counts: np.ndarray  # N
    normal_above: np.ndarray  # N×T

    def replicates(self, w: np.ndarray, fpr_limit: float = 0.3) -> dict[str, np.ndarray]:
        """Each pixel metric of the B resamples with multiplicities w (B×N). The products are
        small (≤ B×N×K): on one BLAS thread, 5× faster than OpenBLAS's threads on 2 busy cores."""
        w = np.asarray(w, dtype=np.float64)
        pos, neg = w @ self.defect_pixels, w @ self.normal_pixels
        with threadpool_limits(1, user_api="blas"), np.errstate(invalid="ignore", divide="ignore"):
            area = np.einsum("bi,ij,bj->b", w, self.pair_counts, w) / (2 * pos * neg)
            ap, f1 = curve_metrics(w @ self.bin_defect, w @ self.bin_normal)
            pro = (w @ self.region_fractions) / (w @ self.region_counts)[:, None]
            fpr = (w @ self.normal_above) / np.maximum(neg, 1)[:, None]
        aupro = np.array([_aupro(f, p, fpr_limit) for f, p in zip(fpr, pro)])
        return {"pixel_auroc": area, "pixel_f1_max": f1, "pixel_ap": ap, "pixel_pro": aupro}


def _aupro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """:func:`metrics.aupro` from its curve (the same clip, rescaling and integration). FPR falls
    as the thresholds rise, so scikit-learn's ``auc`` is −trapezoid: called directly, without
    its input checks (1 ms a call, most of the replicates' time)."""
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min() or np.isnan(pro).any():
        return math.nan
    return float(-np.trapezoid(pro, (fpr - fpr.min()) / (fpr.max() - fpr.min())))


def pixel_stats(masks: np.ndarray, maps: np.ndarray, bins: int = 2048, steps: int = 200) -> PixelStats:
    """The counts of :class:`PixelStats`. masks: N×S×S bool (some defect pixel), maps: N×S×S
    (float32 takes the C kernel)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be N×H×W")
    if not masks.any() or masks.all():
        raise ValueError("pixel intervals need both defect and normal pixels")
    n = masks.shape[0]
    flat, flat_mask = maps.reshape(n, -1), masks.reshape(n, -1)
    defect = [np.sort(v[m]) for v, m in zip(flat, flat_mask)]
    normal = [np.sort(v[~m]) for v, m in zip(flat, flat_mask)]
    lo, hi = float(maps.min()), float(maps.max())
    thresholds = np.arange(lo, hi, (hi - lo) / steps) if hi > lo else np.array([lo])
    edges = np.unique(np.quantile(np.concatenate(defect), np.arange(1, bins) / bins))
    fractions, counts = np.zeros((n, thresholds.size)), np.zeros(n)
    for i in range(n):
        for values in metrics.region_values(masks[i:i + 1], maps[i:i + 1]):
            fractions[i] += (values.size - np.searchsorted(values, thresholds, side="right")) / values.size
            counts[i] += 1
    return PixelStats(
        defect_pixels=np.array([d.size for d in defect], dtype=np.float64),
        normal_pixels=np.array([a.size for a in normal], dtype=np.float64),
        pair_counts=_pair_counts(defect, normal),
        bin_defect=np.array([_binned(d, edges) for d in defect]),
        bin_normal=np.array([_binned(a, edges) for a in normal]),
        region_fractions=fractions, region_counts=counts,
        normal_above=np.array([a.size - np.searchsorted(a, thresholds, side="right") for a in normal], dtype=np.float64),
    )


def _binned(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of sorted ``values`` in the bins (−∞, e_0], (e_0, e_1], …, (e_last, ∞), highest first."""
    cum = np.searchsorted(values, edges, side="right")
    return np.diff(np.concatenate([[0], cum, [values.size]]))[::-1].astype(np.float64)


def _pair_counts(defect: list[np.ndarray], normal: list[np.ndarray]) -> np.ndarray:
    """U (N×N) from each image's sorted defect and normal values."""
    n = len(defect)
    owner = np.repeat(np.arange(n, dtype=np.int32), [d.size for d in defect])
    values = np.concatenate(defect)
    order = np.argsort(values, kind="stable")
    values, owner = np.ascontiguousarray(values[order]), np.ascontiguousarray(owner[order])
    lib = auroc.load() if values.dtype == np.float32 else None
    out = np.zeros((n, n), dtype=np.int64)
    for j, a in enumerate(normal):
        if lib is not None:
            column = np.zeros(n, dtype=np.int64)
            lib.owner_rank_sums(a.ctypes.data, a.size, values.ctypes.data, owner.ctypes.data, values.size,
                                column.ctypes.data)
            out[:, j] = column
        else:
            both = np.searchsorted(a, values, "left") + np.searchsorted(a, values, "right")
            out[:, j] = np.bincount(owner, weights=both, minlength=n).astype(np.int64)
    return out.astype(np.float64)
