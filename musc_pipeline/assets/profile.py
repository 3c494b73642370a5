"""The per-category asset graph of one profile, one asset per stage of SPEC.md.

    image_manifest -> backbone_features + lnamd_features (one backbone pass) -> msm_scores
                   -> anomaly_maps -> rscin_scores -> category_metrics   (partitioned: dataset/category)
    lnamd_features, msm_scores -> salient_features -> rscin_scores   (only with rescoring: rscon)

Assets stay thin: read inputs, call :mod:`musc_pipeline.core`, return what they computed with
metadata for the UI. Each stage family has its module (``features``, ``scoring``,
``metrics``); this one composes them for a profile.
"""

from __future__ import annotations

import logging

from dagster import AssetsDefinition, StaticPartitionsDefinition

from musc_pipeline.assets.context import ProfileContext, code_versions, profile_problem
from musc_pipeline.assets.features import embedding_assets, image_manifest_asset
from musc_pipeline.assets.metrics import category_metrics_asset
from musc_pipeline.assets.scoring import anomaly_maps_asset, msm_scores_asset, rscin_scores_asset, salient_features_asset
from musc_pipeline.assets.studies import build_study_assets
from musc_pipeline.settings import ProfileSettings, Settings

log = logging.getLogger(__name__)
STAGE_FACTORIES = (image_manifest_asset, embedding_assets, msm_scores_asset,
                   anomaly_maps_asset, rscin_scores_asset, category_metrics_asset)


def build_profile_assets(
    name: str, profile: ProfileSettings, settings: Settings, partitions: StaticPartitionsDefinition
) -> list[AssetsDefinition]:
    """All per-category assets of one profile (asset keys prefixed with the profile name), its
    ablation studies included (group ``<profile>_studies``)."""
    problem = profile_problem(name, profile)
    if problem:  # the other profiles load and run; this one's assets carry the reason and fail with it
        log.warning(problem)
    versions = code_versions(profile, usable=not problem, intervals=settings.intervals)
    p = ProfileContext(name, profile, settings, partitions, versions, problem)
    extra = (salient_features_asset,) if profile.method.rescoring == "rscon" else ()
    return [factory(p) for factory in STAGE_FACTORIES + extra] + build_study_assets(p)
