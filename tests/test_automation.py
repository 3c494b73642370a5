"""Regression benchmarking: the backbone-change sensor, the schedule and the before/after table."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from dagster import AssetKey, DagsterInstance, build_schedule_context, build_sensor_context

from conftest import small_settings
from musc_pipeline.assets.context import backbone_fingerprint
from musc_pipeline.definitions import build_definitions
from musc_pipeline.settings import BackboneSettings, ProfileSettings


def _with_size(settings, size: int):
    profile = ProfileSettings(backbone=BackboneSettings(name="efficientnet_lite0", image_size=size))
    return settings.model_copy(update={"profiles": {"musc": profile}})


def test_backbone_change_reruns_materialized_partitions_and_compares(tmp_path, mini_root):
    before = _with_size(small_settings(tmp_path, mini_root), 224)
    after = _with_size(before, 256)
    instance = DagsterInstance.ephemeral()
    defs_before = build_definitions(before)
    assert defs_before.resolve_job_def("musc_categories").execute_in_process(
        partition_key="mini/cat1", instance=instance).success

    defs_after = build_definitions(after)
    sensor = defs_after.resolve_sensor_def("backbone_change_sensor")
    old_fp = backbone_fingerprint(before.profiles["musc"])
    new_fp = backbone_fingerprint(after.profiles["musc"])
    assert old_fp != new_fp

    unchanged = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=json.dumps({"musc": new_fp}),
                                                          definitions=defs_after))
    assert not unchanged.run_requests and unchanged.skip_message

    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=json.dumps({"musc": old_fp}),
                                                     definitions=defs_after))
    assert [(r.partition_key, r.job_name) for r in tick.run_requests] == [("mini/cat1", "musc_categories")]
    assert json.loads(tick.cursor) == {"musc": new_fp}

    for request in tick.run_requests:
        assert defs_after.resolve_job_def(request.job_name).execute_in_process(
            partition_key=request.partition_key, instance=instance, tags=request.tags).success
    keys = [AssetKey(["musc", "metrics_table"]), AssetKey(["musc", "regression_comparison"])]
    assert defs_after.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=keys).success

    table = pd.read_parquet(Path(after.storage) / "musc" / "regression_comparison.parquet")
    assert set(table["metric"]) >= {"image_auroc", "pixel_auroc", "pixel_pro"}
    first = pd.read_parquet(Path(after.storage) / "musc" / "metrics_table.parquet").iloc[0]
    row = table[table["metric"] == "pixel_auroc"].iloc[0]
    assert row["after"] == first["pixel_auroc"]
    assert row["before"] == first["previous_pixel_auroc"]
    assert row["before"] != row["after"]  # a different input size changes the maps
    assert abs(row["delta"] - (row["after"] - row["before"])) < 1e-12
    # the paired test against the run before the change (its per-image maps from the score history)
    assert row["delta_lo"] < row["delta_hi"] and 0.0 <= row["p_value"] <= 1.0
    assert row["significant"] == (row["delta_lo"] > 0 or row["delta_hi"] < 0)


def test_weekly_schedule_requests_every_partition(tmp_path, mini_root):
    from conftest import make_category

    make_category(mini_root, "cat2", n=2)
    defs = build_definitions(small_settings(tmp_path, mini_root))
    schedule = defs.resolve_schedule_def("musc_weekly_regression")
    when = datetime(2026, 11, 22, 3, tzinfo=timezone.utc)
    with DagsterInstance.ephemeral() as instance:
        result = schedule.evaluate_tick(build_schedule_context(
            instance=instance, scheduled_execution_time=when, repository_def=defs.get_repository_def()))
    assert sorted(r.partition_key for r in result.run_requests) == ["mini/cat1", "mini/cat2"]
    assert len({r.run_key for r in result.run_requests}) == 2
