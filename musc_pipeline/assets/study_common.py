"""What every study asset of a profile shares: arguments, inputs, the category's ground truth,
and the long output table (profile, study, setting, setting_order, dataset, category, metric, value)."""

import functools
import json

import numpy as np
import pandas as pd
import torch
from dagster import AssetExecutionContext, Failure, MetadataValue, Output

from musc_pipeline.assets.context import ProfileContext
from musc_pipeline.assets.metadata import md_table, table_metadata
from musc_pipeline.assets.ground_truth import ground_truth
from musc_pipeline.core import ablation, rscin, subsets
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import fingerprint

STUDY_REVISION = 3  # 2: prefix-sum re-aggregation, prepare_s rows; 3: one pass for the MSM studies (reaggregate_s once)


def study_group(profile: str) -> str:
    return f"{profile}_studies"


def study_args(p: ProfileContext, stage: str, *extra) -> dict:
    """``@asset`` arguments of a study asset: the profile's partitions, its own group, a code
    version from the upstream stage's and the study settings."""
    return dict(key_prefix=[p.name], group_name=study_group(p.name), partitions_def=p.partitions,
                code_version=fingerprint(STUDY_REVISION, p.versions[stage], p.settings.studies, json.dumps(extra)))


def subset_groups(p: ProfileContext, manifest: pd.DataFrame, s: int | None = None) -> list[np.ndarray]:
    """The image indices of each subset: the profile's s, or ``s``."""
    m = p.method
    return subsets.divide(list(manifest["defect_type"].astype(str)), s or m.subsets, m.subset_seed, m.subset_dealing)


def ensure_paper_method(p: ProfileContext) -> None:
    """The studies ablate the paper's LNAMD, MSM and RsCIN: refuse the MuSc-V2 variants."""
    if p.method.aggregation != "lnamd" or p.method.rescoring != "rscin":
        raise Failure(description=(
            f"profile {p.name!r}: the studies ablate the paper's LNAMD, MSM and RsCIN; this profile uses "
            f"aggregation={p.method.aggregation}, rescoring={p.method.rescoring}"))


class CategoryTruth:
    """What every study of one partition needs: labels, masks, class tokens, size, windows."""

    def __init__(self, p: ProfileContext, context: AssetExecutionContext, manifest: pd.DataFrame,
                 features: ArrayBundle):
        ensure_paper_method(p)
        self.dataset, cfg, self.category = p.where(context)
        self.size = int(json.loads(features.meta["identity"])["image_size"])
        labels = manifest["label"]
        self.labels = None if labels.isna().any() else labels.to_numpy(int)
        self.masks = ground_truth(manifest, self.size, resolve_mask_rule(p.method.mask_rule, cfg.layout))
        self.tokens = torch.from_numpy(features.arrays["class_tokens"])
        self.windows = tuple(p.method.rscin_windows or rscin.windows_for(self.dataset))
        self.precision = p.method.rscin_precision

    # made on the first evaluate and shared by the settings; the RsCIN studies re-score their own way
    @functools.cached_property
    def rescoring(self) -> rscin.Neighbourhoods:
        return rscin.neighbourhoods(self.tokens, self.windows, self.precision)

    @functools.cached_property
    def maps_out(self) -> torch.Tensor:
        return torch.empty(len(self.tokens), self.size, self.size)

    def evaluate(self, p: ProfileContext, scores: torch.Tensor, grid: tuple[int, int]) -> dict[str, float]:
        m = p.method
        return ablation.evaluate(scores, grid, self.size, self.rescoring, self.labels, self.masks,
                                 m.smoothing_sigma, m.image_score, m.image_score_q, self.maps_out)


def study_output(p: ProfileContext, study: str, where: CategoryTruth, results: dict[str, dict[str, float]],
                 recomputed: str, output_name: str = "result") -> Output[pd.DataFrame]:
    """The long table of one study and partition, with a wide Markdown table in the metadata."""
    rows = [{"profile": p.name, "study": study, "setting": setting, "setting_order": order,
             "dataset": where.dataset, "category": where.category, "metric": metric, "value": float(value)}
            for order, (setting, values) in enumerate(results.items()) for metric, value in values.items()]
    df = pd.DataFrame(rows)
    return Output(df, output_name=output_name, metadata={"recomputed": recomputed, "settings": len(results),
                                "results": MetadataValue.md(md_table(wide_results(df)))} | table_metadata(df))


def wide_results(long: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (in the study's order), one column per metric, from the long table.

    ``pivot``, not ``pivot_table``: the latter crosses its index levels (every setting_order with
    every setting), which made 81 mostly-NaN rows of 9 settings."""
    wide = long.pivot(index=["setting_order", "setting"], columns="metric", values="value")
    return wide.reset_index().drop(columns="setting_order").rename_axis(columns=None)
