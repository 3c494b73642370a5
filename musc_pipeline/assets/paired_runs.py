"""Paired comparison of two profiles on the images they share (the report's comparison page):
each category's latest runs from the score history, Δ = b − a with its interval and p-value
(DeLong's paired test for image AUROC, the paired bootstrap over images for the rest).

Pairing is by image: each profile's pixel metrics stay at its own S (its maps upsampled as in
its run, the masks made at that S), and one set of resampled images serves both sides.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from dagster import AssetKey
from upath import UPath

from musc_pipeline.assets.ground_truth import ground_truth
from musc_pipeline.assets.metric_intervals import previous_score_set, resampling
from musc_pipeline.assets.partitions import partition_keys, split_key
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.core.uncertainty import category
from musc_pipeline.resources.score_history import ScoredRun, ScoreHistory
from musc_pipeline.resources.storage import ParquetIOManager
from musc_pipeline.settings import Settings

PAIRED_COLUMNS = ("dataset", "category", "metric", "delta", "lo", "hi", "se", "p_value")


def run_masks(settings: Settings, profile: str, partition: str, run: ScoredRun) -> np.ndarray | None:
    """The run's ground truth at its S, from its profile's image manifest (None without masks)."""
    io = ParquetIOManager(base_path=UPath(settings.storage))
    path = io.partition_file(AssetKey([profile, "image_manifest"]), partition)
    if not path.exists():
        return None
    manifest = io.load_from_path(None, path)
    manifest = manifest.set_index(manifest["image_id"].astype(str)).loc[run.image_ids].reset_index(drop=True)
    _, cfg, _ = split_key(settings, partition)
    return ground_truth(manifest, run.image_size, resolve_mask_rule(settings.profiles[profile].method.mask_rule, cfg.layout))


def paired_profiles(settings: Settings, a: str, b: str) -> pd.DataFrame:
    """One row per shared category and metric: Δ = b − a, [lo, hi], se, p (PAIRED_COLUMNS)."""
    history, how, rows = ScoreHistory(settings.storage), resampling(settings.intervals), []
    for partition in partition_keys(settings):
        run_a, run_b = history.latest(a, partition), history.latest(b, partition)
        if run_a is None or run_b is None:
            continue
        masks_a, masks_b = run_masks(settings, a, partition, run_a), run_masks(settings, b, partition, run_b)
        set_a = previous_score_set(run_a, run_a.image_ids, run_a.labels, masks_a, run_a.image_size, how)
        set_b = previous_score_set(run_b, run_a.image_ids, run_a.labels, masks_b, run_b.image_size, how)
        if isinstance(set_b, str):  # other images or labels: nothing to pair
            continue
        point_b = {k: v for k, v in run_b.metrics.items() if not math.isnan(v)}
        point_a = {k: v for k, v in run_a.metrics.items() if not math.isnan(v)}
        if set_a.pixels is None or set_b.pixels is None:
            point_b = {k: v for k, v in point_b.items() if k.startswith("image_")}
        deltas = category.paired(run_a.labels, set_b, set_a, point_b, point_a, how)
        dataset, _, cat = partition.partition("/")
        rows += [{"dataset": dataset, "category": cat, "metric": k, "delta": e.value, "lo": e.lo, "hi": e.hi,
                  "se": e.se, "p_value": e.p_value} for k, e in deltas.items()]
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
