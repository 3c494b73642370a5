"""One unusable profile in musc.yaml: the others load and run, its assets say why and fail."""

from __future__ import annotations

import logging

from dagster import AssetKey, DagsterEventType, DagsterInstance

from conftest import small_settings
from musc_pipeline.definitions import build_definitions
from musc_pipeline.settings import BackboneSettings, ProfileSettings

REASON = "profile 'typo' in musc.yaml is unusable: unknown backbone 'ViT-B-61'"


def test_mistyped_backbone_disables_only_its_profile(tmp_path, mini_root, caplog, monkeypatch):
    monkeypatch.delenv("MUSC_CONFIG", raising=False)
    settings = small_settings(tmp_path, mini_root)
    settings = settings.model_copy(update={"profiles": settings.profiles | {
        "typo": ProfileSettings(backbone=BackboneSettings(name="ViT-B-61"))}})
    with caplog.at_level(logging.WARNING):
        defs = build_definitions(settings)  # the code location loads
    assert [r.getMessage() for r in caplog.records if "typo" in r.getMessage()][0].startswith(REASON)
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(["typo", "backbone_features"])).description.startswith("UNUSABLE: " + REASON)
    assert not graph.get(AssetKey(["musc", "backbone_features"])).description.startswith("UNUSABLE")

    instance = DagsterInstance.ephemeral()
    typo = defs.resolve_job_def("typo_categories").execute_in_process(
        partition_key="mini/cat1", instance=instance, raise_on_error=False)
    assert not typo.success
    (failure,) = [e for e in typo.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert failure.step_key == "typo__image_manifest"
    assert failure.step_failure_data.user_failure_data.description.startswith(REASON)
    assert "\n" not in failure.step_failure_data.user_failure_data.description

    musc = defs.resolve_job_def("musc_categories").execute_in_process(
        partition_key="mini/cat1", instance=instance, asset_selection=[AssetKey(["musc", "image_manifest"])])
    assert musc.success
