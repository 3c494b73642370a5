"""Intervals of a category's metrics and its paired comparison with the previous run
(``regression_vs_previous``): the asset side of :mod:`musc_pipeline.core.uncertainty`."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue

from musc_pipeline.assets.metric_checks import skipped
from musc_pipeline.core import maps
from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.core.uncertainty import category
from musc_pipeline.core.uncertainty.delong import Estimate
from musc_pipeline.resources.score_history import ScoredRun, ScoreHistory
from musc_pipeline.settings import IntervalSettings, Settings


def resampling(s: IntervalSettings) -> category.Resampling:
    return category.Resampling(resamples=s.resamples, seed=s.seed, level=s.level, bins=s.bins)


def interval_columns(estimates: dict[str, Estimate]) -> dict[str, float]:
    """``<metric>_lo``, ``<metric>_hi``, ``<metric>_se`` of every metric (NaN where undefined)."""
    out = {}
    for k in METRIC_NAMES:
        e = estimates.get(k, Estimate(math.nan, math.nan, math.nan, math.nan))
        out |= {f"{k}_lo": float(e.lo), f"{k}_hi": float(e.hi), f"{k}_se": float(e.se)}
    return out


def previous_score_set(run: ScoredRun, image_ids: list[str], labels: np.ndarray, masks: np.ndarray | None,
                       size: int, how: category.Resampling) -> category.ScoreSet | str:
    """The previous run's scores (and its grid maps upsampled to this run's S, with its own
    smoothing) in this run's image order; or why the two runs cannot be paired."""
    if sorted(run.image_ids) != sorted(image_ids):
        return f"the previous run ({run.run_id}) scored other images ({len(run.image_ids)} vs {len(image_ids)})"
    order = [run.image_ids.index(i) for i in image_ids] if run.image_ids != image_ids else list(range(len(image_ids)))
    if not np.array_equal(run.labels[order], labels):
        return f"the previous run ({run.run_id}) has other labels for the same images"
    prev_maps = None
    if masks is not None:
        patch = torch.from_numpy(run.patch_maps[order])
        prev_maps = maps.anomaly_maps(patch.flatten(1), tuple(patch.shape[1:]), size, run.smoothing_sigma).numpy()
    return category.score_set(run.scores[order], masks, prev_maps, how)


def significant(e: Estimate, min_effect: float) -> bool:
    """Δ's interval excludes 0 and |Δ| ≥ ``min_effect``."""
    return not math.isnan(e.lo) and (e.lo > 0 or e.hi < 0) and abs(e.value) >= min_effect


def regression_result(deltas: dict[str, Estimate], min_effect: float, previous: ScoredRun) -> AssetCheckResult:
    """``regression_vs_previous``: a warning when some metric moved significantly (paired test)
    by at least ``min_effect``; the metadata lists every Δ with its interval and p-value."""
    compared = {k: e for k, e in deltas.items() if not math.isnan(e.value)}
    moved = {k: e for k, e in compared.items() if significant(e, min_effect)}
    table = {k: {"delta": round(e.value, 4), "lo": round(e.lo, 4), "hi": round(e.hi, 4),
                 "p": round(e.p_value, 4)} for k, e in compared.items()}
    return AssetCheckResult(
        check_name="regression_vs_previous", passed=not moved, severity=AssetCheckSeverity.WARN,
        metadata={"compared_with": f"run {previous.run_id} ({previous.materialized_at}, {previous.backbone})",
                  "compared": ", ".join(compared),
                  "moved": MetadataValue.json({k: table[k] for k in moved}),
                  "deltas": MetadataValue.json(table), "min_effect": min_effect})


def compare_with_previous(previous: ScoredRun | None, current: ScoredRun, current_set: category.ScoreSet,
                          masks: np.ndarray | None, how: category.Resampling,
                          min_effect: float) -> tuple[AssetCheckResult, dict[str, Estimate]]:
    """``regression_vs_previous`` of ``current`` against the category's previous stored run,
    paired on the same images (DeLong for image AUROC, the paired bootstrap for the rest), and
    the Δ = current − previous of each metric ({} when skipped)."""
    if previous is None:
        return skipped("regression_vs_previous", "no previous run of this category in the score history"), {}
    prev = previous_score_set(previous, current.image_ids, current.labels, masks, current.image_size, how)
    if isinstance(prev, str):
        return skipped("regression_vs_previous", prev), {}
    point_b = previous.metrics if previous.image_size == current.image_size else None
    values = {k: v for k, v in current.metrics.items() if not math.isnan(v)}
    if prev.pixels is None or current_set.pixels is None:
        values = {k: v for k, v in values.items() if k.startswith("image_")}
    deltas = category.paired(current.labels, current_set, prev, values, point_b, how)
    if not any(not math.isnan(e.value) for e in deltas.values()):
        return skipped("regression_vs_previous", "no metric has a value in both runs"), {}
    return regression_result(deltas, min_effect, previous), deltas


def category_uncertainty(settings: Settings, profile: str, partition: str, current: ScoredRun,
                         masks: np.ndarray | None, full: np.ndarray | None) -> tuple[dict, AssetCheckResult]:
    """The row's interval columns (and their time per image), the paired Δ against the previous
    run (``previous_<metric>_delta`` and its ``_lo``, ``_hi``, ``_p``) and ``regression_vs_previous``;
    ``current`` then joins the category's score history."""
    how, s = resampling(settings.intervals), settings.intervals
    start = time.perf_counter()
    current_set = category.score_set(current.scores, masks, full, how)
    columns = interval_columns(category.intervals(current.labels, current_set, current.metrics, how))
    n = len(current.labels)
    columns["intervals_ms_per_image"] = 1000 * (time.perf_counter() - start) / n
    columns["interval_level"] = how.level
    history = ScoreHistory(settings.storage)
    start = time.perf_counter()
    regression, deltas = compare_with_previous(history.latest(profile, partition), current, current_set, masks, how,
                                               s.min_effect)
    columns["regression_ms_per_image"] = 1000 * (time.perf_counter() - start) / n
    for k in METRIC_NAMES:
        e = deltas.get(k, Estimate(math.nan, math.nan, math.nan, math.nan))
        columns |= {f"previous_{k}_delta": e.value, f"previous_{k}_delta_lo": e.lo,
                    f"previous_{k}_delta_hi": e.hi, f"previous_{k}_delta_p": e.p_value}
    history.append(profile, partition, current, keep=s.history_runs)
    return columns, regression
