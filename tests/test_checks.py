"""The asset checks of category_metrics: floating-point tolerance and skips where nothing compares."""

from __future__ import annotations

import math

from dagster import AssetCheckResult

from musc_pipeline.assets.metric_checks import metric_checks, skipped
from musc_pipeline.core.metrics import METRIC_NAMES


def _row(dataset: str = "demo", category: str = "PA_BDP01_TL", **values: float) -> dict:
    return {"dataset": dataset, "category": category, **{k: values.get(k, 0.9) for k in METRIC_NAMES}}


FIRST_RUN = skipped("regression_vs_previous", "no previous run of this category in the score history")


def _by_name(results) -> dict:
    return {r.check_name: r for r in results}


def test_perfect_scores_with_rounding_pass_the_unit_interval_check():
    checks = _by_name(metric_checks(_row(image_ap=1.0000000000000002, pixel_ap=-1e-15), FIRST_RUN))
    assert checks["metrics_in_unit_interval"].passed
    checks = _by_name(metric_checks(_row(image_ap=1.01), FIRST_RUN))
    assert not checks["metrics_in_unit_interval"].passed
    assert checks["metrics_in_unit_interval"].metadata["out_of_range"].value == "image_ap"


def _skip_reason(result: AssetCheckResult) -> str | None:
    """The reason a result gives for comparing nothing, as the UI shows it (None: it compared)."""
    if result.metadata["compared"].value != "none":
        return None
    assert result.passed and result.description == f"Skipped: {result.metadata['skipped'].value}"
    return result.metadata["skipped"].value


def test_checks_with_nothing_to_compare_are_skipped_with_a_reason():
    checks = _by_name(metric_checks(_row(), FIRST_RUN))  # first run, a dataset the paper has no numbers for
    assert checks["regression_vs_previous"] is FIRST_RUN
    assert "no previous run" in _skip_reason(checks["regression_vs_previous"])
    assert _skip_reason(checks["paper_reference"]) == "the paper has no numbers for demo/PA_BDP01_TL"
    nan_row = _row("mvtec_ad", "bottle", **{k: math.nan for k in METRIC_NAMES})
    assert _skip_reason(_by_name(metric_checks(nan_row, FIRST_RUN))["paper_reference"]) == "all metrics are n/a"


def test_paper_check_compares_when_the_paper_has_numbers():
    paper = _by_name(metric_checks(_row("mvtec_ad", "bottle"), FIRST_RUN))["paper_reference"]
    assert _skip_reason(paper) is None and not paper.passed  # 0.9 is far from the paper's 0.999
    assert "image_auroc" in paper.metadata["beyond_tolerance"].value
