"""Per-category evaluation: the category_metrics asset, its checks, ground truth, paper numbers."""

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    MetadataValue,
    Output,
    multi_asset,
)

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.features import drop_intermediates
from musc_pipeline.assets.metadata import md_table, table_metadata
from musc_pipeline.assets.scoring import full_maps
from musc_pipeline.core import metrics
from musc_pipeline.core.preprocess import mask_array, resolve_mask_rule
from musc_pipeline.reports.inputs import load_reference
from musc_pipeline.resources.datasets import read_mask
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import fingerprint

#: Metrics are sums of float64 terms: a perfect average precision can come out as 1.0000000000000002.
UNIT_TOLERANCE = 1e-9
REGRESSION_TOLERANCE = 0.02
PAPER_TOLERANCE = 0.05
REFERENCE_CSV = Path(__file__).resolve().parents[1] / "reports" / "reference_results.csv"
METRIC_NAMES = metrics.IMAGE_METRICS + metrics.PIXEL_METRICS
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
                                  f"warn when a metric moved by more than {REGRESSION_TOLERANCE} since the last run "
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
                px = metrics.pixel_metrics(gt, full_maps(amaps))
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
        previous = _previous_metrics(context, key)
        for k in METRIC_NAMES:
            row[f"previous_{k}"] = previous.get(k, math.nan)
        row["previous_backbone"] = previous.get("backbone", "")
        df = pd.DataFrame([row])
        table = df[["dataset", "category", *METRIC_NAMES]]
        meta = {"metrics": MetadataValue.md(md_table(table)), "notes": "; ".join(notes) or "none"}
        meta |= {k: MetadataValue.float(float(v)) for k, v in values.items()}
        meta["backbone"] = ident["backbone"]
        meta |= table_metadata(df)
        yield Output(df, output_name="category_metrics", metadata=meta)
        for result in metric_checks(row, previous):
            if isinstance(result, SkippedCheck):  # no result: the UI shows the check as skipped
                context.log.info(f"check {result.check_name} skipped: {result.reason}")
            else:
                yield result

    return category_metrics


#: The array stages whose stored size per image each metrics row records (``stored_<stage>_bytes_per_image``).
STORED_STAGES = ("backbone_features", "lnamd_features", "msm_scores", "anomaly_maps", "salient_features")


def stored_bytes_per_image(context: AssetExecutionContext, p: ProfileContext, n: int) -> dict[str, float]:
    """Bytes per image each array stage of this partition holds in storage now."""
    out = {}
    for stage in STORED_STAGES:
        path = context.resources.arrays.partition_file(p.key(stage), context.partition_key)
        if path.exists():
            out[f"stored_{stage}_bytes_per_image"] = path.stat().st_size / n
    return out


def ground_truth(manifest: pd.DataFrame, size: int, rule: str) -> np.ndarray | None:
    """N×S×S ground-truth masks by ``rule``, or None when labels or masks are missing."""
    if manifest["label"].isna().any() or manifest.loc[manifest["label"] == 1, "mask_path"].isna().any():
        return None
    gt = np.zeros((len(manifest), size, size), dtype=bool)
    for i, row in enumerate(manifest.itertuples()):
        if isinstance(row.mask_path, str):
            gt[i] = mask_array(read_mask(row.mask_path, (row.width, row.height)), size, rule)
    return gt


@dataclass(frozen=True)
class SkippedCheck:
    """A check with nothing to compare against: no result is emitted, with this reason logged."""

    check_name: str
    reason: str


def metric_checks(row: dict, previous: dict) -> Iterator[AssetCheckResult | SkippedCheck]:
    """Check results of one category's metrics row (a skip where there is nothing to compare)."""
    values = {k: row[k] for k in METRIC_NAMES}
    out_of_range = [k for k, v in values.items()
                    if not (math.isnan(v) or -UNIT_TOLERANCE <= v <= 1.0 + UNIT_TOLERANCE)]
    yield AssetCheckResult(check_name="metrics_in_unit_interval", passed=not out_of_range,
                           metadata={"out_of_range": ", ".join(out_of_range) or "none"})
    yield _deviation_check("regression_vs_previous", values, previous, REGRESSION_TOLERANCE, "moved",
                           "no previous materialization of this partition with metrics to compare")
    ref = reference_row(row["dataset"], row["category"])
    yield _deviation_check("paper_reference", values, ref, PAPER_TOLERANCE, "beyond_tolerance",
                           f"the paper has no numbers for {row['dataset']}/{row['category']}" if not ref
                           else "all metrics are n/a")


def _deviation_check(name: str, values: dict[str, float], baseline: dict, tolerance: float, key: str,
                     skip_reason: str) -> AssetCheckResult | SkippedCheck:
    """A warning check that the metrics stay within ``tolerance`` of ``baseline`` (skipped when no
    metric has a value on both sides); ``key`` names the metadata entry listing the deviations."""
    compared = [k for k in METRIC_NAMES if not math.isnan(values[k]) and not math.isnan(baseline.get(k, math.nan))]
    if not compared:
        return SkippedCheck(name, skip_reason)
    far = {k: values[k] - baseline[k] for k in compared if abs(values[k] - baseline[k]) > tolerance}
    return AssetCheckResult(check_name=name, passed=not far, severity=AssetCheckSeverity.WARN,
                            metadata={"compared": ", ".join(compared),
                                      key: MetadataValue.json({k: round(v, 4) for k, v in far.items()})})


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
