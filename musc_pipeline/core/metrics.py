"""Metrics of the paper (SPEC §8), on scikit-learn and scikit-image.

Image level (scores vs. good/defect labels): AUROC, AP, F1-max. Pixel level (all pixels of
all images of a category at S×S): AUROC, AP, F1-max and PRO.

F1-max is the maximum of 2PR/(P+R) over the thresholds of the precision–recall curve.
A category whose labels hold only one class has no defined AUROC/AP/F1: those values are
NaN and :class:`MetricResult.notes` says why (never 0).

Two PRO variants:

- :func:`aupro` — the authors' (cflow-ad) variant the paper's numbers use: 200 thresholds
  ``arange(min, max, (max − min)/200)``, 8-connected ground-truth regions, points with
  FPR < 0.3 kept, their FPRs rescaled to [0, 1] by their own min and max, trapezoid
  integration, no interpolation at 0.3.
- :func:`aupro_mvtec` — MVTec AD's official AU-PRO: every distinct threshold, the curve
  interpolated at FPR = 0.3, integrated over [0, 0.3] and divided by 0.3.

Both are vectorised: each region's values are sorted once and the counts above every
threshold come from ``searchsorted``, which equals thresholding the maps threshold by
threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

IMAGE_METRICS = ("image_auroc", "image_f1_max", "image_ap")
PIXEL_METRICS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_pro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class MetricResult:
    values: dict[str, float]
    notes: list[str] = field(default_factory=list)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _binary_metrics(labels: np.ndarray, scores: np.ndarray, prefix: str) -> MetricResult:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    names = [f"{prefix}_auroc", f"{prefix}_f1_max", f"{prefix}_ap"]
    if labels.size == 0 or labels.all() or not labels.any():
        which = "no samples" if labels.size == 0 else ("only anomalous" if labels.all() else "only normal")
        return MetricResult(
            {k: math.nan for k in names},
            [f"{prefix}-level metrics undefined: {which} {prefix}s in this category"],
        )
    return MetricResult(
        {
            names[0]: float(roc_auc_score(labels, scores)),
            names[1]: f1_max(labels, scores),
            names[2]: float(average_precision_score(labels, scores)),
        }
    )


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> MetricResult:
    """labels: N (1 = defect), scores: N."""
    return _binary_metrics(labels, scores, "image")


def _regions(masks: np.ndarray, maps: np.ndarray) -> list[np.ndarray]:
    """Sorted map values of every 8-connected ground-truth region."""
    out = []
    for mask, amap in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        order = np.argsort(labelled.ravel(), kind="stable")
        lab_sorted = labelled.ravel()[order]
        vals_sorted = amap.ravel()[order]
        bounds = np.searchsorted(lab_sorted, np.arange(1, count + 2))
        for k in range(count):
            out.append(np.sort(vals_sorted[bounds[k] : bounds[k + 1]]))
    return out


def _pro_fpr(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, inclusive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """PRO(t) and FPR(t) with 'anomalous' meaning value > t (value >= t if inclusive)."""
    side = "left" if inclusive else "right"
    regions = _regions(masks, maps)
    if not regions:
        raise ValueError("PRO needs at least one anomalous ground-truth region")
    pro = np.zeros(thresholds.size)
    for values in regions:
        above = values.size - np.searchsorted(values, thresholds, side=side)
        pro += above / values.size
    pro /= len(regions)
    normal = np.sort(maps[~masks])
    fp = normal.size - np.searchsorted(normal, thresholds, side=side)
    return pro, fp / max(normal.size, 1)


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be N×H×W")
    return masks, maps


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """PRO integrated up to ``fpr_limit``, the authors' (cflow-ad) variant. masks, maps: N×H×W."""
    masks, maps = _check_pixels(masks, maps)
    lo, hi = float(maps.min()), float(maps.max())
    if hi == lo:
        return math.nan
    thresholds = np.arange(lo, hi, (hi - lo) / steps)
    pro, fpr = _pro_fpr(masks, maps, thresholds)
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    # no (or one) point below the limit, e.g. ≥ 30 % of normal pixels at the maximum: undefined
    if fpr.size < 2 or fpr.max() == fpr.min():
        return math.nan
    span = fpr.max() - fpr.min()
    return float(auc((fpr - fpr.min()) / span, pro))


def aupro_mvtec(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD's official AU-PRO: exact curve, interpolated at ``fpr_limit``, normalised by it."""
    masks, maps = _check_pixels(masks, maps)
    thresholds = np.unique(maps)[::-1]  # descending: FPR and PRO ascend
    pro, fpr = _pro_fpr(masks, maps, thresholds, inclusive=True)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    pro_at_limit = np.interp(fpr_limit, fpr, pro)
    keep = fpr <= fpr_limit
    x = np.concatenate([fpr[keep], [fpr_limit]])
    y = np.concatenate([pro[keep], [pro_at_limit]])
    return float(np.trapezoid(y, x) / fpr_limit)


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> MetricResult:
    """masks: N×S×S booleans, maps: N×S×S anomaly maps."""
    masks, maps = _check_pixels(masks, maps)
    result = _binary_metrics(masks, maps, "pixel")
    if math.isnan(result.values["pixel_auroc"]):
        result.values["pixel_pro"] = math.nan
    else:
        result.values["pixel_pro"] = aupro(masks, maps, fpr_limit)
    return result
