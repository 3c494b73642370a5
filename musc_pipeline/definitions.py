"""The Dagster code location: assembles assets, resources, jobs, schedules and sensors."""

from __future__ import annotations

from dagster import Definitions, ExecutorDefinition, in_process_executor

from musc_pipeline.assets.partitions import build_partitions
from musc_pipeline.assets.profile import build_profile_assets
from musc_pipeline.assets.studies import build_study_pages
from musc_pipeline.assets.study_backbones import backbones_study_asset
from musc_pipeline.assets.summary import build_global_assets, build_profile_summary
from musc_pipeline.automation import build_automation
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.storage import ArrayStorage, ParquetStorage
from musc_pipeline.settings import Settings, load_settings


def build_definitions(
    settings: Settings | None = None, model: ModelResource | None = None, executor: ExecutorDefinition | None = None
) -> Definitions:
    """Everything of the code location.

    Every job, the UI's Materialize button and the CLI included, runs its steps in one process
    (``in_process_executor``) unless ``executor`` names another: the backbone is then loaded
    once per run, not once per step. Runs still execute in parallel processes.
    """
    settings = settings or load_settings()
    partitions = build_partitions(settings)
    assets = []
    for name, profile in settings.profiles.items():
        assets += build_profile_assets(name, profile, settings, partitions)
        assets += build_profile_summary(name, profile, settings, partitions)
    assets += build_global_assets(settings)
    assets += [backbones_study_asset(settings, partitions), build_study_pages(settings)]
    jobs, schedules, sensors = build_automation(settings, partitions)
    return Definitions(
        assets=assets,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        executor=executor or in_process_executor,
        resources={
            "model": model or ModelResource(),
            "tables": ParquetStorage(base_path=settings.storage),
            "arrays": ArrayStorage(base_path=settings.storage),
        },
    )


defs = build_definitions()
