"""What every asset factory of one profile shares: its settings, code versions and asset keys.

Code versions are hashes of exactly the settings each stage depends on, so editing a profile
in ``musc.yaml`` marks exactly the affected stages stale.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from dagster import AssetCheckSpec, AssetExecutionContext, AssetKey, Failure, PreviewWarning, StaticPartitionsDefinition

from musc_pipeline.assets.partitions import split_key
from musc_pipeline.assets.profile_rules import setting_problem
from musc_pipeline.resources.weights import resolve_name, spec_for
from musc_pipeline.settings import DatasetSettings, IntervalSettings, MethodSettings, ProfileSettings, Settings, fingerprint

#: Bump an entry when the code of that stage changes its results or the format it stores.
CODE_REVISION = {"manifest": 1, "features": 4, "lnamd": 3, "msm": 2, "maps": 3, "salient": 1, "rscin": 2, "metrics": 5}
#: Concurrency pool of the steps that use the model device (limit it in dagster.yaml).
MODEL_POOL = "musc_model"


def backbone_fingerprint(profile: ProfileSettings) -> str:
    """Hash of what determines the features: backbone settings and what 'auto' resolves to."""
    return fingerprint(profile.backbone, resolve_name(profile.backbone.name))


def profile_problem(name: str, profile: ProfileSettings) -> str | None:
    """Why a profile cannot run (one line naming it, the settings file and the bad setting), or None."""
    try:
        problem = setting_problem(profile, spec_for(profile.backbone))
    except ValueError as exc:  # an unknown backbone name (registry, timm:, open_clip:): the message lists close ones
        problem = str(exc)
    if problem is None:
        return None
    return f"profile {name!r} in {os.environ.get('MUSC_CONFIG', 'musc.yaml')} is unusable: {problem}"


def code_versions(profile: ProfileSettings, usable: bool = True,
                  intervals: IntervalSettings = IntervalSettings()) -> dict[str, str]:
    """Code version of each stage: its code revision and the settings it depends on (the
    metrics' intervals: B, seed, level and bins; not the regression check's settings)."""
    method = profile.method
    backbone_fp = backbone_fingerprint(profile) if usable else fingerprint(profile.backbone, "unusable")
    return {
        "manifest": fingerprint(CODE_REVISION["manifest"]),
        "features": fingerprint(CODE_REVISION["features"], backbone_fp),
        "lnamd": fingerprint(CODE_REVISION["lnamd"], backbone_fp),
        "msm": fingerprint(CODE_REVISION["msm"], backbone_fp, json.dumps([
            method.degrees, method.interval, method.subsets, method.subset_dealing, method.subset_seed, method.mode,
            method.references]), *method.variant("aggregation")),
        "maps": fingerprint(CODE_REVISION["maps"], str(method.smoothing_sigma), *method.variant("image_score", "image_score_q")),
        "salient": fingerprint(CODE_REVISION["salient"], method.aggregation, json.dumps(method.degrees)),
        "rscin": fingerprint(CODE_REVISION["rscin"], json.dumps(method.rscin_windows), method.rscin_precision,
                             *method.variant("rescoring", "rscon_windows")),
        "metrics": fingerprint(CODE_REVISION["metrics"], method.mask_rule,
                               intervals.model_dump_json(include={"resamples", "seed", "level", "bins"})),
    }


@dataclass(frozen=True)
class ProfileContext:
    """One profile as its asset factories see it."""

    name: str
    profile: ProfileSettings
    settings: Settings
    partitions: StaticPartitionsDefinition
    versions: dict[str, str]
    problem: str | None = None  # set when the profile cannot run: its assets say so and fail

    @property
    def method(self) -> MethodSettings:
        return self.profile.method

    def key(self, asset: str) -> AssetKey:
        return AssetKey([self.name, asset])

    def where(self, context: AssetExecutionContext) -> tuple[str, DatasetSettings, str]:
        """(dataset, its settings, category) of the partition being materialized."""
        return split_key(self.settings, context.partition_key)

    def ensure_usable(self) -> None:
        """First thing every asset of the profile does: fail with the one-line reason, if any."""
        if self.problem:
            raise Failure(description=self.problem)

    def asset_args(self, stage: str) -> dict:
        """Arguments every per-category asset of this profile passes to ``@asset``."""
        args = dict(key_prefix=[self.name], group_name=self.name, partitions_def=self.partitions,
                    code_version=self.versions[stage])
        return args | ({"description": f"UNUSABLE: {self.problem}"} if self.problem else {})

    def check_spec(self, asset: str, name: str, description: str | None = None) -> AssetCheckSpec:
        """A check of one of this profile's assets, partitioned like it: each result is recorded
        against the partition it checked (a preview feature of Dagster, hence the silenced notice)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PreviewWarning, message=".*partitions_def on an AssetCheckSpec")
            return AssetCheckSpec(name, asset=self.key(asset), description=description, partitions_def=self.partitions)
