"""The asset checks of category_metrics: floating-point tolerance and skips where nothing compares."""

from __future__ import annotations

import math

from dagster import AssetCheckResult

from musc_pipeline.assets.metric_checks import metric_checks
from musc_pipeline.core.metrics import METRIC_NAMES


def _row(dataset: str = "demo", category: str = "PA_BDP01_TL", **values: float) -> dict:
    return {"dataset": dataset, "category": category, **{k: values.get(k, 0.9) for k in METRIC_NAMES}}


def _by_name(results) -> dict:
    return {r.check_name: r for r in results}


def test_perfect_scores_with_rounding_pass_the_unit_interval_check():
    checks = _by_name(metric_checks(_row(image_ap=1.0000000000000002, pixel_ap=-1e-15), {}))
    assert checks["metrics_in_unit_interval"].passed
    checks = _by_name(metric_checks(_row(image_ap=1.01), {}))
    assert not checks["metrics_in_unit_interval"].passed
    assert checks["metrics_in_unit_interval"].metadata["out_of_range"].value == "image_ap"


def _skip_reason(result: AssetCheckResult) -> str | None:
    """The reason a result gives for comparing nothing, as the UI shows it (None: it compared)."""
    if result.metadata["compared"].value != "none":
        return None
    assert result.passed and result.description == f"Skipped: {result.metadata['skipped'].value}"
    return result.metadata["skipped"].value


def test_checks_with_nothing_to_compare_are_skipped_with_a_reason():
    checks = _by_name(metric_checks(_row(), {}))  # first run, a dataset the paper has no numbers for
    assert "no previous materialization" in _skip_reason(checks["regression_vs_previous"])
    assert _skip_reason(checks["paper_reference"]) == "the paper has no numbers for demo/PA_BDP01_TL"

    nan_before = {k: math.nan for k in METRIC_NAMES}  # a previous run whose metrics were all n/a
    assert _skip_reason(_by_name(metric_checks(_row(), nan_before))["regression_vs_previous"])


def test_checks_compare_when_there_is_something_to_compare():
    previous = {k: 0.9 for k in METRIC_NAMES} | {"image_auroc": 0.5}
    checks = _by_name(metric_checks(_row("mvtec_ad", "bottle"), previous))
    regression, paper = checks["regression_vs_previous"], checks["paper_reference"]
    assert _skip_reason(regression) is None and not regression.passed
    assert set(regression.metadata["moved"].value) == {"image_auroc"}
    assert _skip_reason(paper) is None and not paper.passed  # 0.9 is far from the paper's 0.999
    assert "image_auroc" in paper.metadata["beyond_tolerance"].value
