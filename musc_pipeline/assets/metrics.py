"""Per-category evaluation: the category_metrics asset, its checks, ground truth, paper numbers."""

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    MetadataValue,
    Output,
    asset,
)

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.metadata import md_table
from musc_pipeline.core import metrics
from musc_pipeline.core.preprocess import mask_array, resolve_mask_rule
from musc_pipeline.reports.render import load_reference
from musc_pipeline.resources.datasets import read_mask
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import fingerprint

REGRESSION_TOLERANCE = 0.02
PAPER_TOLERANCE = 0.05
REFERENCE_CSV = Path(__file__).resolve().parents[1] / "reports" / "reference_results.csv"
METRIC_NAMES = metrics.IMAGE_METRICS + metrics.PIXEL_METRICS
#: How the features were made (the backbone identity): recorded in every metrics row.
CONVENTION_KEYS = ("activation", "preprocess", "pos_embed_resize", "precision")


def category_metrics_asset(p: ProfileContext) -> AssetsDefinition:
    key = p.key("category_metrics")

    @asset(name="category_metrics", io_manager_key="tables",
           ins={"scores": AssetIn(p.key("rscin_scores")), "amaps": AssetIn(p.key("anomaly_maps")),
                "manifest": AssetIn(p.key("image_manifest")), "features": AssetIn(p.key("backbone_features")),
                "msm_out": AssetIn(p.key("msm_scores"))},
           kinds={"parquet"}, check_specs=[
               AssetCheckSpec("metrics_in_unit_interval", asset=key),
               AssetCheckSpec("regression_vs_previous", asset=key,
                              description=f"warn when a metric moved by more than {REGRESSION_TOLERANCE} since the last run"),
               AssetCheckSpec("paper_reference", asset=key,
                              description=f"MVTec AD / VisA: warn when more than {PAPER_TOLERANCE} from the paper"),
           ], **p.asset_args("metrics"))
    def category_metrics(context: AssetExecutionContext, scores: pd.DataFrame, amaps: ArrayBundle,
                         manifest: pd.DataFrame, features: ArrayBundle, msm_out: ArrayBundle):
        """Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row."""
        dataset, cfg, category = p.where(context)
        size = int(amaps.meta["image_size"])
        mask_rule = resolve_mask_rule(p.method.mask_rule, cfg.layout)
        labels = scores["label"]
        notes: list[str] = []
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
                px = metrics.pixel_metrics(gt, amaps.arrays["maps"])
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
        previous = _previous_metrics(context, key)
        for k in METRIC_NAMES:
            row[f"previous_{k}"] = previous.get(k, math.nan)
        row["previous_backbone"] = previous.get("backbone", "")
        df = pd.DataFrame([row])
        table = df[["dataset", "category", *METRIC_NAMES]]
        meta = {"metrics": MetadataValue.md(md_table(table)), "notes": "; ".join(notes) or "none"}
        meta |= {k: MetadataValue.float(float(v)) for k, v in values.items()}
        meta["backbone"] = ident["backbone"]
        yield Output(df, metadata=meta)
        yield from metric_checks(row, previous)

    return category_metrics


def ground_truth(manifest: pd.DataFrame, size: int, rule: str) -> np.ndarray | None:
    """N×S×S ground-truth masks by ``rule``, or None when labels or masks are missing."""
    if manifest["label"].isna().any() or manifest.loc[manifest["label"] == 1, "mask_path"].isna().any():
        return None
    gt = np.zeros((len(manifest), size, size), dtype=bool)
    for i, row in enumerate(manifest.itertuples()):
        if isinstance(row.mask_path, str):
            gt[i] = mask_array(read_mask(row.mask_path, (row.width, row.height)), size, rule)
    return gt


def metric_checks(row: dict, previous: dict):
    """Check results of one category's metrics row."""
    values = {k: row[k] for k in METRIC_NAMES}
    out_of_range = [k for k, v in values.items() if not (math.isnan(v) or 0.0 <= v <= 1.0)]
    yield AssetCheckResult(check_name="metrics_in_unit_interval", passed=not out_of_range,
                           metadata={"out_of_range": ", ".join(out_of_range) or "none"})
    moved = {k: values[k] - previous[k] for k in METRIC_NAMES
             if k in previous and not math.isnan(values[k]) and not math.isnan(previous[k])
             and abs(values[k] - previous[k]) > REGRESSION_TOLERANCE}
    yield AssetCheckResult(check_name="regression_vs_previous", passed=not moved, severity=AssetCheckSeverity.WARN,
                           metadata={"compared_with_previous": bool(previous),
                                     "moved": MetadataValue.json({k: round(v, 4) for k, v in moved.items()})})
    ref = reference_row(row["dataset"], row["category"])
    far = {k: values[k] - ref[k] for k in ref
           if not math.isnan(values[k]) and abs(values[k] - ref[k]) > PAPER_TOLERANCE}
    yield AssetCheckResult(check_name="paper_reference", passed=not far, severity=AssetCheckSeverity.WARN,
                           metadata={"has_reference": bool(ref),
                                     "beyond_tolerance": MetadataValue.json({k: round(v, 4) for k, v in far.items()})})


def reference_row(dataset: str, category: str) -> dict[str, float]:
    """The paper's numbers for a category (fractions), or {} where the paper has none."""
    ref = load_reference(REFERENCE_CSV)
    hit = ref[(ref["dataset"] == dataset) & (ref["category"] == category)]
    if hit.empty:
        return {}
    r = hit.iloc[0]
    return {k: float(r[k]) / 100.0 for k in METRIC_NAMES}


def _previous_metrics(context: AssetExecutionContext, asset_key: AssetKey) -> dict:
    """Metric values recorded by the previous materialization of this partition (if any)."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        return {}
    meta = records[0].asset_materialization.metadata
    out = {k: v.value for k, v in meta.items() if k in METRIC_NAMES}
    if "backbone" in meta:
        out["backbone"] = meta["backbone"].value
    return out
