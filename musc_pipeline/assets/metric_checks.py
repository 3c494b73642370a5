"""The checks of a category's metrics row: unit interval, regression against the partition's
previous run (a paired test, :mod:`.metric_intervals`), and distance from the paper's numbers."""

import math
from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    MetadataValue,
)

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.paper_reference import reference_row
from musc_pipeline.core.metrics import METRIC_NAMES

#: Metrics are sums of float64 terms: a perfect average precision can come out as 1.0000000000000002.
UNIT_TOLERANCE = 1e-9
PAPER_TOLERANCE = 0.05


def metric_check_specs(p: ProfileContext) -> list[AssetCheckSpec]:
    """The checks of the profile's ``category_metrics``, with what each compares."""
    return [
        p.check_spec("category_metrics", "metrics_in_unit_interval",
                     f"every metric in [0, 1] (± {UNIT_TOLERANCE:g} of floating-point rounding) or n/a"),
        p.check_spec("category_metrics", "regression_vs_previous",
                     "warn when a metric moved significantly since the partition's last run: Δ's "
                     f"{p.settings.intervals.level:.0%} interval (paired test on the same images) excludes 0 "
                     f"and |Δ| ≥ {p.settings.intervals.min_effect} (nothing to compare on its first: 'Skipped: …')"),
        p.check_spec("category_metrics", "paper_reference",
                     f"MVTec AD / VisA: warn when more than {PAPER_TOLERANCE} from the paper "
                     "(nothing to compare where the paper has no numbers: 'Skipped: …')"),
    ]


def metric_checks(row: dict, regression: AssetCheckResult) -> Iterator[AssetCheckResult]:
    """Check results of one category's metrics row (a skip, with its reason, where there is
    nothing to compare); ``regression`` is the paired comparison with the previous run, made by
    the caller."""
    values = {k: row[k] for k in METRIC_NAMES}
    out_of_range = [k for k, v in values.items()
                    if not (math.isnan(v) or -UNIT_TOLERANCE <= v <= 1.0 + UNIT_TOLERANCE)]
    yield AssetCheckResult(check_name="metrics_in_unit_interval", passed=not out_of_range,
                           metadata={"out_of_range": ", ".join(out_of_range) or "none"})
    yield regression
    ref = reference_row(row["dataset"], row["category"])
    yield _deviation_check("paper_reference", values, ref, PAPER_TOLERANCE, "beyond_tolerance",
                           f"the paper has no numbers for {row['dataset']}/{row['category']}" if not ref
                           else "all metrics are n/a")


def skipped(name: str, reason: str) -> AssetCheckResult:
    """A check with nothing to compare: a passing warning-level result whose description and
    metadata say why it compared nothing. Dagster's own "Skipped" (a planned check that yields no
    result) shows no reason and is stamped when the step starts, before the materialization."""
    return AssetCheckResult(check_name=name, passed=True, severity=AssetCheckSeverity.WARN,
                            description=f"Skipped: {reason}", metadata={"skipped": reason, "compared": "none"})


def _deviation_check(name: str, values: dict[str, float], baseline: dict, tolerance: float, key: str,
                     skip_reason: str) -> AssetCheckResult:
    """A warning check that the metrics stay within ``tolerance`` of ``baseline`` (skipped when no
    metric has a value on both sides); ``key`` names the metadata entry listing the deviations."""
    compared = [k for k in METRIC_NAMES if not math.isnan(values[k]) and not math.isnan(baseline.get(k, math.nan))]
    if not compared:
        return skipped(name, skip_reason)
    far = {k: values[k] - baseline[k] for k in compared if abs(values[k] - baseline[k]) > tolerance}
    return AssetCheckResult(check_name=name, passed=not far, severity=AssetCheckSeverity.WARN,
                            metadata={"compared": ", ".join(compared),
                                      key: MetadataValue.json({k: round(v, 4) for k, v in far.items()})})


def previous_metrics(context: AssetExecutionContext, asset_key: AssetKey) -> dict:
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
