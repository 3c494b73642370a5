"""What a newcomer sees in the Dagster UI (issue #25): study tables, check results, schedule and
sensor descriptions, rounded floats, figures labelled as figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, FloatMetadataValue, MarkdownMetadataValue

from conftest import make_category, small_settings
from musc_pipeline.assets.metrics_columns import describe_column
from musc_pipeline.assets.study_common import wide_results
from musc_pipeline.definitions import build_definitions
from musc_pipeline.reports.figures import select_examples

PER_CATEGORY = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics"]


def _long(settings: list[str], metrics: list[str]) -> pd.DataFrame:
    """A study's long table as study_output writes it (values: order + metric index / 10)."""
    return pd.DataFrame([{"profile": "musc", "study": "degrees", "setting": s, "setting_order": i, "dataset": "demo",
                          "category": "c", "metric": m, "value": i + j / 10}
                         for i, s in enumerate(settings) for j, m in enumerate(metrics)])


def test_study_results_table_has_one_row_per_setting_in_study_order():
    settings = ["{1}", "{3}", "{5}", "{1, 3}", "{1, 5}", "{3, 5}", "{1, 3, 5}", "{1, 3, 5, 7}", "{1, 3, 5, 7, 9}"]
    wide = wide_results(_long(settings, ["image_auroc", "pixel_auroc", "image_ap"]))
    assert list(wide["setting"]) == settings  # 9 rows, not 81
    assert list(wide.columns) == ["setting", "image_ap", "image_auroc", "pixel_auroc"]
    assert not wide.isna().any().any()
    assert wide.loc[3, "pixel_auroc"] == 3.1


# --------------------------------------------------------------------------- one materialized category


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """mini/cat1 through category_metrics and category_figures, once: (settings, result, instance)."""
    tmp = tmp_path_factory.mktemp("ui")
    make_category(tmp / "data", "cat1")
    settings = small_settings(tmp, tmp / "data")
    instance = DagsterInstance.ephemeral()
    result = build_definitions(settings).resolve_job_def("musc_categories").execute_in_process(
        partition_key="mini/cat1", instance=instance,
        asset_selection=[AssetKey(["musc", n]) for n in PER_CATEGORY + ["category_figures"]])
    assert result.success
    return settings, result, instance


def _metadata(result, asset: str) -> dict:
    (meta,) = [ev.materialization.metadata for ev in result.get_asset_materialization_events()
               if ev.asset_key.path[-1] == asset]
    return meta


def test_skipped_check_says_why_in_the_result_after_its_materialization(materialized):
    _, result, instance = materialized
    checks = {ev.check_name: ev for ev in result.get_asset_check_evaluations()}
    assert checks["paper_reference"].description == "Skipped: the paper has no numbers for mini/cat1"
    assert checks["paper_reference"].metadata["skipped"].value == "the paper has no numbers for mini/cat1"
    assert checks["regression_vs_previous"].description.startswith("Skipped: no previous run")
    logs = instance.all_logs(result.run_id)
    assert not [e for e in logs if "did not yield or return expected outputs" in (e.user_message or "")]
    # every planned check of category_metrics is evaluated, each after the materialization it checks
    order = [(e.dagster_event.event_type, e.dagster_event.event_specific_data) for e in logs if e.is_dagster_event]
    materialized_at = next(i for i, (t, data) in enumerate(order) if t == DagsterEventType.ASSET_MATERIALIZATION
                           and data.materialization.asset_key.path[-1] == "category_metrics")
    planned = {data.check_name for t, data in order if t == DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED
               and data.asset_key.path[-1] == "category_metrics"}
    evaluated = {data.check_name: i for i, (t, data) in enumerate(order) if t == DagsterEventType.ASSET_CHECK_EVALUATION
                 and data.asset_key.path[-1] == "category_metrics"}
    assert set(evaluated) == planned == {"metrics_in_unit_interval", "regression_vs_previous", "paper_reference"}
    assert min(evaluated.values()) > materialized_at
    assert all(checks[c].target_materialization_data.run_id == result.run_id for c in planned)


def test_metadata_floats_are_rounded_and_columns_described(materialized):
    settings, result, _ = materialized
    meta = _metadata(result, "category_metrics")
    row = pd.read_parquet(Path(settings.storage) / "musc" / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
    shown = {k: v.value for k, v in meta.items() if isinstance(v, FloatMetadataValue)}
    assert {"image_ap", "pixel_pro", "features_ms_per_image", "msm_ms_per_image", "maps_ms_per_image",
            "peak_rss_mb"} <= set(shown)
    for k, v in shown.items():
        assert v == round(row[k], 4), k
    for asset in ("backbone_features", "msm_scores", "anomaly_maps"):
        timing = {k: v.value for k, v in _metadata(result, asset).items() if isinstance(v, FloatMetadataValue)}
        assert timing and all(v == round(v, 4) for v in timing.values()), asset
    columns = meta["dagster/column_schema"].value.columns
    assert len(columns) == len(row) >= 44
    assert [c.name for c in columns if not c.description] == []
    assert describe_column("stored_anomaly_maps_bytes_per_image") == "bytes per image anomaly_maps holds in storage after scoring"


def test_figures_are_labelled_as_figures(materialized):
    _, result, _ = materialized
    meta = _metadata(result, "category_figures")
    figures = {k: v.value for k, v in meta.items() if isinstance(v, MarkdownMetadataValue)}
    assert set(figures) == {"figure: qualitative maps", "figure: score histograms", "figure: ROC and PR curves"}
    for key, text in figures.items():
        title = key.removeprefix("figure: ")
        assert text.startswith(f"**Figure: {title}**\n\n![{title}](data:image/png;base64,")
        assert Path(meta[f"figure file: {title}"].value).suffix == ".png"


def test_schedules_and_sensors_have_descriptions(tmp_path, mini_root):
    defs = build_definitions(small_settings(tmp_path, mini_root))
    repo = defs.get_repository_def()
    described = {d.name: d.description for d in [*repo.schedule_defs, *repo.sensor_defs]}
    assert "musc_weekly_regression" in described and "backbone_change_sensor" in described
    assert all(described.values()), described


def test_example_groups_are_named_by_rank_not_by_a_threshold():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])  # image AUROC 1.0: nothing is missed
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = [g for _, g in select_examples(scores, labels, per_group=1)]
    assert groups == ["highest-scored defect", "lowest-scored normal", "lowest-scored defect", "highest-scored normal"]
