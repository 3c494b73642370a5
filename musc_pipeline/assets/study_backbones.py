"""Backbones and image sizes (Tab. 8, Tab. 13): the profiles named in ``studies.backbone_profiles``
(default: every profile) side by side, one column per backbone × image size, per category.

A backbone × size is a profile in ``musc.yaml`` (two sizes of one backbone are two profiles), so
this study recomputes nothing: for its partition it reads each named profile's stored
``category_metrics`` row — the 7 metrics, time per image of the features, MSM and maps stages,
peak memory. Its long rows join ``ablation_results`` with profile = the profile a column comes
from and setting = ``<backbone> @ <size>``.

    <profile>/category_metrics (each named profile) -> studies/study_backbones
"""

import json

import pandas as pd
from dagster import AssetIn, AssetKey, AssetsDefinition, MetadataValue, Output, asset

from musc_pipeline.assets.metadata import md_table, table_metadata
from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.assets.study_common import STUDY_REVISION
from musc_pipeline.settings import Settings, fingerprint

#: Not a profile's asset: keyed ``studies/study_backbones``, stored beside the profiles' tables.
BACKBONES_KEY = AssetKey(["studies", "study_backbones"])
#: What each column holds: the 7 metrics, then time per image per stage and peak memory.
BACKBONE_METRICS = (*METRIC_NAMES, "features_ms_per_image", "msm_ms_per_image", "maps_ms_per_image",
                    "peak_rss_mb", "peak_gpu_mb")


def backbone_profiles(settings: Settings) -> tuple[str, ...]:
    return settings.studies.backbone_profiles or tuple(settings.profiles)


def setting_label(row: pd.Series) -> str:
    """``<backbone> @ <image size>``; random weights say so."""
    return f"{row['backbone']}{' (random weights)' if row['random_init'] else ''} @ {int(row['image_size'])}"


def backbone_rows(metrics_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The study's long rows from each profile's ``category_metrics`` row (profile -> one-row frame),
    columns in the given order. Two profiles with one backbone × size are told apart by name."""
    labels = {name: setting_label(df.iloc[0]) for name, df in metrics_rows.items()}
    shared = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    rows = []
    for order, (name, df) in enumerate(metrics_rows.items()):
        row = df.iloc[0]
        setting = labels[name] + (f" ({name})" if labels[name] in shared else "")
        rows += [{"profile": name, "study": "backbones", "setting": setting, "setting_order": order,
                  "dataset": row["dataset"], "category": row["category"], "metric": m, "value": float(row[m])}
                 for m in BACKBONE_METRICS]
    return pd.DataFrame(rows)


def backbones_study_asset(settings: Settings, partitions) -> AssetsDefinition:
    names = backbone_profiles(settings)
    ins = {f"profile_{i}": AssetIn(AssetKey([name, "category_metrics"])) for i, name in enumerate(names)}

    @asset(key=BACKBONES_KEY, group_name="studies", partitions_def=partitions, io_manager_key="tables",
           kinds={"parquet"}, ins=ins, code_version=fingerprint(STUDY_REVISION, json.dumps(names)))
    def study_backbones(**metrics_rows: pd.DataFrame) -> Output[pd.DataFrame]:
        """Backbones and image sizes (Tab. 8, Tab. 13): the named profiles' metrics, time per image
        and peak memory, one column per backbone × size — read from their ``category_metrics``."""
        df = backbone_rows({name: metrics_rows[f"profile_{i}"] for i, name in enumerate(names)})
        wide = df.pivot_table(index="metric", columns="setting", values="value", sort=False, dropna=False)
        return Output(df, metadata={
            "recomputed": f"nothing: read the category_metrics of {', '.join(names)}",
            "results": MetadataValue.md(md_table(wide.reset_index()))} | table_metadata(df))

    return study_backbones
