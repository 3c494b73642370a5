"""Per-category evaluation: the category_metrics asset (its checks: :mod:`.metric_checks`, its
columns: :mod:`.metrics_columns`, what stays stored: :mod:`.storage_policy`)."""

import json
import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from dagster import AssetCheckResult, AssetExecutionContext, AssetIn, AssetOut, AssetsDefinition, MetadataValue, Output, multi_asset

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.ground_truth import ground_truth
from musc_pipeline.assets.metadata import display_float, md_table, table_metadata
from musc_pipeline.assets.metric_checks import metric_check_specs, metric_checks, previous_metrics, skipped
from musc_pipeline.assets.metric_intervals import category_uncertainty, interval_columns
from musc_pipeline.assets.metrics_columns import describe_column
from musc_pipeline.assets.scoring import full_maps
from musc_pipeline.assets.storage_policy import apply_storage_policy
from musc_pipeline.core import metrics
from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.resources.score_history import ScoredRun
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import fingerprint

#: How the features were made (the backbone identity): recorded in every metrics row.
CONVENTION_KEYS = ("activation", "preprocess", "pos_embed_resize", "precision")
#: The stages whose time per image and peak memory every metrics row records.
TIMED_STAGES = ("features", "msm", "maps")


def category_metrics_asset(p: ProfileContext) -> AssetsDefinition:
    key = p.key("category_metrics")
    args = p.asset_args("metrics")
    description = args.get("description", "Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row.")

    # can_subset: a run may select the asset with only some of its checks
    @multi_asset(name=f"{p.name}__category_metrics", group_name=args["group_name"],
                 partitions_def=args["partitions_def"], can_subset=True, required_resource_keys={"arrays"},
                 outs={"category_metrics": AssetOut(key=key, io_manager_key="tables", kinds={"parquet"},
                                                    code_version=args["code_version"], description=description)},
                 ins={"scores": AssetIn(p.key("rscin_scores")), "amaps": AssetIn(p.key("anomaly_maps")),
                      "manifest": AssetIn(p.key("image_manifest")), "features": AssetIn(p.key("backbone_features")),
                      "msm_out": AssetIn(p.key("msm_scores"))},
                 check_specs=metric_check_specs(p))
    def category_metrics(context: AssetExecutionContext, scores: pd.DataFrame, amaps: ArrayBundle,
                         manifest: pd.DataFrame, features: ArrayBundle, msm_out: ArrayBundle):
        """Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row."""
        p.ensure_usable()
        dataset, cfg, category = p.where(context)
        mask_rule = resolve_mask_rule(p.method.mask_rule, cfg.layout)
        gt = ground_truth(manifest, int(amaps.meta["image_size"]), mask_rule)
        full = full_maps(amaps) if gt is not None and not scores["label"].isna().any() else None
        values, notes = metric_values(scores, gt, full)
        ident = json.loads(features.meta["identity"])
        n = len(scores)
        row = {"profile": p.name, "dataset": dataset, "category": category, **values,
               "n_images": n, "n_anomalous": int((scores["label"] == 1).sum()), "notes": "; ".join(notes),
               "backbone": ident["backbone"], "weights_sha256": ident["weights_sha256"] or "",
               "random_init": bool(ident["random_init"]), "image_size": ident["image_size"],
               "mask_rule": mask_rule, "config": fingerprint(p.profile),
               **{k: ident[k] for k in CONVENTION_KEYS}, "rscin_precision": p.method.rscin_precision,
               "subset_dealing": p.method.subset_dealing if p.method.subsets > 1 else "n/a (one set)",
               "materialized_at": datetime.now(timezone.utc).isoformat()}
        row |= stage_costs([json.loads(b.meta["timing"]) for b in (features, msm_out, amaps)])
        row |= apply_storage_policy(p, context, n)  # the category is scored: drop what the profile does not keep
        uncertainty, regression = _uncertainty(p, context, row, scores, amaps, values, gt, full)
        row |= uncertainty
        previous = previous_metrics(context, key)
        row |= {f"previous_{k}": previous.get(k, math.nan) for k in METRIC_NAMES}
        row["previous_backbone"] = previous.get("backbone", "")
        df = pd.DataFrame([row])
        yield Output(df, output_name="category_metrics", metadata=_metadata(df, notes, p.settings.intervals.level))
        # after the materialization, so that each result is stamped after what it checks
        selected = {k.name for k in context.selected_asset_check_keys}
        yield from (result for result in metric_checks(row, regression) if result.check_name in selected)

    return category_metrics


def metric_values(scores: pd.DataFrame, gt: np.ndarray | None, full: np.ndarray | None) -> tuple[dict[str, float], list[str]]:
    """The seven metrics of one category (NaN where they cannot be computed) and why not;
    ``full`` is the S×S anomaly maps (None without labels or masks)."""
    labels = scores["label"]
    if labels.isna().any():
        return {k: math.nan for k in METRIC_NAMES}, ["unlabeled images: metrics n/a"]
    img = metrics.image_metrics(labels.to_numpy(int), scores["score_rscin"].to_numpy())
    values, notes = dict(img.values), list(img.notes)
    if gt is None:
        return values | {k: math.nan for k in metrics.PIXEL_METRICS}, notes + ["no ground-truth masks: pixel metrics n/a"]
    px = metrics.pixel_metrics(gt, full)
    return values | px.values, notes + list(px.notes)


def stage_costs(timings: list[dict]) -> dict[str, float]:
    """Per stage of :data:`TIMED_STAGES` its time per image; the peaks are the stages' maxima
    (each stage may have run in its own process)."""
    out = {f"{stage}_ms_per_image": float(t["ms_per_image"]) for stage, t in zip(TIMED_STAGES, timings)}
    out["peak_rss_mb"] = float(max(t["peak_rss_mb"] for t in timings))
    gpu = [t["peak_gpu_mb"] for t in timings if t["peak_gpu_mb"] is not None]
    out["peak_gpu_mb"] = float(max(gpu)) if gpu else math.nan
    return out


def _uncertainty(p: ProfileContext, context: AssetExecutionContext, row: dict, scores: pd.DataFrame,
                 amaps: ArrayBundle, values: dict, gt: np.ndarray | None,
                 full: np.ndarray | None) -> tuple[dict, AssetCheckResult]:
    """The row's interval columns and the paired check against the previous run (which then
    joins the category's score history); nothing to compare on unlabeled images."""
    if scores["label"].isna().any():
        return interval_columns({}), skipped("regression_vs_previous", "unlabeled images: no metrics to compare")
    current = ScoredRun(run_id=context.run.run_id, materialized_at=row["materialized_at"], config=row["config"],
                        backbone=row["backbone"], image_ids=[str(i) for i in scores["image_id"]],
                        labels=scores["label"].to_numpy(int), scores=scores["score_rscin"].to_numpy(np.float64),
                        patch_maps=amaps.arrays["patch_maps"], image_size=int(amaps.meta["image_size"]),
                        smoothing_sigma=float(amaps.meta["smoothing_sigma"]), metrics=values)
    return category_uncertainty(p.settings, p.name, context.partition_key, current, gt, full)


def _metadata(df: pd.DataFrame, notes: list[str], level: float) -> dict:
    """The UI's view of the row: the metrics table and values (rounded for display), their
    intervals, the notes, the backbone, the stages' costs, and the column schema with each
    column's meaning."""
    row = df.iloc[0]
    meta = {"metrics": MetadataValue.md(md_table(df[["dataset", "category", *METRIC_NAMES]])),
            "notes": "; ".join(notes) or "none"}
    meta |= {k: display_float(row[k]) for k in METRIC_NAMES}
    meta["intervals"] = MetadataValue.md(md_table(pd.DataFrame(
        [{"metric": k, "value": row[k], f"{level:.0%} lo": row[f"{k}_lo"], f"{level:.0%} hi": row[f"{k}_hi"]}
         for k in METRIC_NAMES])))
    meta["backbone"] = row["backbone"]
    costs = [c for c in df.columns if c.endswith("_ms_per_image") or c in ("peak_rss_mb", "peak_gpu_mb")]
    meta |= {c: display_float(row[c]) for c in costs if not math.isnan(row[c])}
    return meta | table_metadata(df, describe_column)
