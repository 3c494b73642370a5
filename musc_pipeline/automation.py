"""Jobs, schedules and sensors: per-profile category runs and regression benchmarks."""


import json

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    StaticPartitionsDefinition,
    define_asset_job,
    schedule,
    sensor,
)

from musc_pipeline.assets.context import backbone_fingerprint, profile_problem
from musc_pipeline.assets.studies import STUDIES
from musc_pipeline.assets.study_backbones import BACKBONES_KEY
from musc_pipeline.settings import Settings

PER_CATEGORY = ("image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics", "category_figures")


def category_job(profile: str):
    """All per-category stages of one profile; run per partition (the regression benchmark).

    Its executor is the code location's (one process per run, see ``build_definitions``).
    """
    return define_asset_job(
        name=f"{profile}_categories",
        selection=AssetSelection.assets(*[AssetKey([profile, a]) for a in PER_CATEGORY]),
        description=f"Materialize every per-category stage of profile {profile!r} for the chosen partitions.",
    )


#: The study inputs each study needs besides the pipeline's stages (see assets.studies).
STUDY_INPUTS = {"degrees": ("msm_scores_extra_degrees",), "msm_variants": ("msm_similarities",),
                "percentage": ("msm_similarities",), "interval_start": ("msm_similarities",)}


def study_jobs(settings: Settings) -> list:
    """A job per study (every profile, the study and its inputs; run it for chosen partitions),
    ``studies`` (all of them) and ``study_report`` (the ``study_pages`` HTML asset; a job may not share an asset's name). The pipeline's stages must be
    materialized for those partitions (``make demo``)."""
    def keys(study: str) -> list[AssetKey]:
        return [AssetKey([p, a]) for p in settings.profiles for a in (*STUDY_INPUTS.get(study, ()), f"study_{study}")]

    jobs = [define_asset_job(name=f"study_{s}", selection=AssetSelection.assets(*keys(s)),
                             description=f"Ablation study {s!r} for the chosen partitions, every profile.")
            for s in STUDIES]
    jobs.append(define_asset_job(name="study_backbones", selection=AssetSelection.assets(BACKBONES_KEY),
                                 description="Backbones and image sizes: the named profiles' category_metrics side by side."))
    everything = AssetSelection.assets(*[k for s in STUDIES for k in keys(s)], BACKBONES_KEY)
    jobs.append(define_asset_job(name="studies", selection=everything,
                                 description="Every ablation study for the chosen partitions, every profile."))
    jobs.append(define_asset_job(name="study_report", selection=AssetSelection.assets(AssetKey("study_pages")),
                                 description="Render the study pages (reports/study_*.html) from the studies' tables."))
    return jobs


def build_automation(settings: Settings, partitions: StaticPartitionsDefinition):
    jobs = {p: category_job(p) for p in settings.profiles}
    summary_job = define_asset_job(
        name="reports", selection=AssetSelection.groups("reports")
        | AssetSelection.assets(*[AssetKey([p, a]) for p in settings.profiles for a in ("metrics_table", "regression_comparison")]),
        description="Rebuild the metric tables, the DuckDB catalog and the HTML report.",
    )
    schedules, sensors = [], []
    for profile, job in jobs.items():
        @schedule(name=f"{profile}_weekly_regression", job=job, cron_schedule="0 3 * * 0",
                  default_status=DefaultScheduleStatus.STOPPED,
                  description=f"Weekly regression benchmark (Sundays 03:00, off until turned on): re-run every "
                              f"category of profile {profile!r}; its regression_vs_previous checks compare.")
        def weekly(context: ScheduleEvaluationContext, _profile=profile):
            for key in partitions.get_partition_keys():
                yield RunRequest(run_key=f"{_profile}-{context.scheduled_execution_time:%Y%m%d}-{key}",
                                 partition_key=key, tags={"musc/trigger": "schedule"})

        schedules.append(weekly)

    fingerprints = {p: backbone_fingerprint(prof) for p, prof in settings.profiles.items()
                    if not profile_problem(p, prof)}  # an unusable profile has no backbone to watch

    @sensor(name="backbone_change_sensor", jobs=list(jobs.values()), minimum_interval_seconds=60,
            default_status=DefaultSensorStatus.STOPPED,
            description="When a profile's backbone configuration changes (off until turned on), re-run its "
                        "materialized categories; old and new metrics side by side in <profile>/regression_comparison.")
    def backbone_change_sensor(context: SensorEvaluationContext):
        seen = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for profile, fp in fingerprints.items():
            if profile in seen and seen[profile] != fp:
                done = context.instance.get_materialized_partitions(AssetKey([profile, "category_metrics"]))
                for key in sorted(done & set(partitions.get_partition_keys())):
                    requests.append(RunRequest(run_key=f"{profile}-{fp}-{key}", job_name=jobs[profile].name,
                                               partition_key=key, tags={"musc/trigger": "backbone_change",
                                                                        "musc/previous_backbone": seen[profile]}))
        context.update_cursor(json.dumps(fingerprints))
        return requests or SkipReason("no backbone configuration changed")

    sensors.append(backbone_change_sensor)
    return [*jobs.values(), summary_job, *study_jobs(settings)], schedules, sensors
