"""Per-category evaluation: the category_metrics asset (its checks: :mod:`.metric_checks`)."""

import json
import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, AssetIn, AssetOut, AssetsDefinition, MetadataValue, Output, multi_asset

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.ground_truth import ground_truth
from musc_pipeline.assets.metadata import md_table, table_metadata
from musc_pipeline.assets.metric_checks import (
    PAPER_TOLERANCE,
    UNIT_TOLERANCE,
    SkippedCheck,
    metric_checks,
    previous_metrics,
)
from musc_pipeline.assets.metric_intervals import category_uncertainty, interval_columns
from musc_pipeline.assets.scoring import full_maps
from musc_pipeline.assets.storage_policy import drop_intermediates, stored_bytes_per_image
from musc_pipeline.core import metrics
from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.resources.score_history import ScoredRun
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import fingerprint

#: How the features were made (the backbone identity): recorded in every metrics row.
CONVENTION_KEYS = ("activation", "preprocess", "pos_embed_resize", "precision")


def category_metrics_asset(p: ProfileContext) -> AssetsDefinition:
    key = p.key("category_metrics")

    args = p.asset_args("metrics")
    description = args.get("description", "Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row.")

    # A multi-asset only because it may omit a check's result (can_subset): a check with nothing
    # to compare against then shows as skipped instead of passed.
    @multi_asset(name=f"{p.name}__category_metrics", group_name=args["group_name"],
                 partitions_def=args["partitions_def"], can_subset=True, required_resource_keys={"arrays"},
                 outs={"category_metrics": AssetOut(key=key, io_manager_key="tables", kinds={"parquet"},
                                                    code_version=args["code_version"], description=description)},
                 ins={"scores": AssetIn(p.key("rscin_scores")), "amaps": AssetIn(p.key("anomaly_maps")),
                      "manifest": AssetIn(p.key("image_manifest")), "features": AssetIn(p.key("backbone_features")),
                      "msm_out": AssetIn(p.key("msm_scores"))},
                 check_specs=[
                     p.check_spec("category_metrics", "metrics_in_unit_interval",
                                  f"every metric in [0, 1] (± {UNIT_TOLERANCE:g} of floating-point rounding) or n/a"),
                     p.check_spec("category_metrics", "regression_vs_previous",
                                  "warn when a metric moved significantly since the last run: Δ's "
                                  f"{p.settings.intervals.level:.0%} interval (paired test on the same images) "
                                  f"excludes 0 and |Δ| ≥ {p.settings.intervals.min_effect} "
                                  "(skipped on a partition's first run)"),
                     p.check_spec("category_metrics", "paper_reference",
                                  f"MVTec AD / VisA: warn when more than {PAPER_TOLERANCE} from the paper "
                                  "(skipped where the paper has no numbers)"),
                 ])
    def category_metrics(context: AssetExecutionContext, scores: pd.DataFrame, amaps: ArrayBundle,
                         manifest: pd.DataFrame, features: ArrayBundle, msm_out: ArrayBundle):
        """Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row."""
        p.ensure_usable()
        dataset, cfg, category = p.where(context)
        size = int(amaps.meta["image_size"])
        mask_rule = resolve_mask_rule(p.method.mask_rule, cfg.layout)
        labels = scores["label"]
        notes: list[str] = []
        gt = full = None
        if labels.isna().any():
            values = {k: math.nan for k in METRIC_NAMES}
            notes.append("unlabeled images: metrics n/a")
        else:
            img = metrics.image_metrics(labels.to_numpy(int), scores["score_rscin"].to_numpy())
            values, notes = dict(img.values), list(img.notes)
            gt = ground_truth(manifest, size, mask_rule)
            if gt is None:
                values |= {k: math.nan for k in metrics.PIXEL_METRICS}
                notes.append("no ground-truth masks: pixel metrics n/a")
            else:
                full = full_maps(amaps)
                px = metrics.pixel_metrics(gt, full)
                values |= px.values
                notes += px.notes
        ident = json.loads(features.meta["identity"])
        n = len(scores)
        row = {"profile": p.name, "dataset": dataset, "category": category, **values,
               "n_images": n, "n_anomalous": int((labels == 1).sum()), "notes": "; ".join(notes),
               "backbone": ident["backbone"], "weights_sha256": ident["weights_sha256"] or "",
               "random_init": bool(ident["random_init"]), "image_size": ident["image_size"],
               "mask_rule": mask_rule, "config": fingerprint(p.profile),
               **{k: ident[k] for k in CONVENTION_KEYS}, "rscin_precision": p.method.rscin_precision,
               "subset_dealing": p.method.subset_dealing if p.method.subsets > 1 else "n/a (one set)",
               "materialized_at": datetime.now(timezone.utc).isoformat()}
        stage_timings = [json.loads(meta["timing"]) for meta in (features.meta, msm_out.meta, amaps.meta)]
        for stage, t in zip(("features", "msm", "maps"), stage_timings):
            row[f"{stage}_ms_per_image"] = float(t["ms_per_image"])
        # each stage may have run in its own process: the category's peaks are the stages' maxima
        row["peak_rss_mb"] = float(max(t["peak_rss_mb"] for t in stage_timings))
        gpu = [t["peak_gpu_mb"] for t in stage_timings if t["peak_gpu_mb"] is not None]
        row["peak_gpu_mb"] = float(max(gpu)) if gpu else math.nan
        # the category is scored: drop what the profile does not keep, then record what is stored
        drop_intermediates(p, context, context.resources.arrays)
        row |= stored_bytes_per_image(context, p, n)
        row["intermediates"] = p.profile.intermediates
        if labels.isna().any():
            row |= interval_columns({})
            regression = SkippedCheck("regression_vs_previous", "unlabeled images: no metrics to compare")
        else:
            current = _scored_run(context.run.run_id, row, scores, amaps, values)
            uncertainty, regression = category_uncertainty(p.settings, p.name, context.partition_key, current, gt, full)
            row |= uncertainty
        previous = previous_metrics(context, key)
        for k in METRIC_NAMES:
            row[f"previous_{k}"] = previous.get(k, math.nan)
        row["previous_backbone"] = previous.get("backbone", "")
        df = pd.DataFrame([row])
        yield Output(df, output_name="category_metrics", metadata=_metadata(df, values, notes, p.settings.intervals.level))
        for result in metric_checks(row, regression):
            if isinstance(result, SkippedCheck):  # no result: the UI shows the check as skipped
                context.log.info(f"check {result.check_name} skipped: {result.reason}")
            else:
                yield result

    return category_metrics


def _metadata(df: pd.DataFrame, values: dict, notes: list[str], level: float) -> dict:
    """The materialization's metadata: the metrics (a table and each as a float), their
    intervals (a table), notes, backbone and the table schema."""
    row = df.iloc[0]
    meta = {"metrics": MetadataValue.md(md_table(df[["dataset", "category", *METRIC_NAMES]])),
            "notes": "; ".join(notes) or "none"}
    meta |= {k: MetadataValue.float(float(v)) for k, v in values.items()}
    meta["intervals"] = MetadataValue.md(md_table(pd.DataFrame(
        [{"metric": k, "value": row[k], f"{level:.0%} lo": row[f"{k}_lo"], f"{level:.0%} hi": row[f"{k}_hi"]}
         for k in METRIC_NAMES])))
    return meta | {"backbone": str(row["backbone"])} | table_metadata(df)


def _scored_run(run_id: str, row: dict, scores: pd.DataFrame, amaps: ArrayBundle, values: dict) -> ScoredRun:
    """What the score history keeps of this run of the category."""
    return ScoredRun(run_id=run_id, materialized_at=row["materialized_at"], config=row["config"],
                     backbone=row["backbone"], image_ids=[str(i) for i in scores["image_id"]],
                     labels=scores["label"].to_numpy(int), scores=scores["score_rscin"].to_numpy(np.float64),
                     patch_maps=amaps.arrays["patch_maps"], image_size=int(amaps.meta["image_size"]),
                     smoothing_sigma=float(amaps.meta["smoothing_sigma"]), metrics=values)
