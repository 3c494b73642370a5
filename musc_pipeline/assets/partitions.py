"""Partitions: one key per existing ``<dataset>/<category>``.

Keys are discovered from the configured dataset roots when the code location loads (reload
it in the UI after adding a category). A static, discovered key list was chosen over a 2-D
dataset × category definition, which would show impossible cells (mvtec_ad × candle), and
over dynamic partitions fed by a sensor, which would leave a fresh instance — or the
``dagster asset materialize`` CLI — without keys until the sensor had run.
"""

from __future__ import annotations

from dagster import StaticPartitionsDefinition

from musc_pipeline.resources.datasets import categories
from musc_pipeline.settings import DatasetSettings, Settings


def partition_keys(settings: Settings) -> list[str]:
    keys = []
    for dataset, cfg in settings.datasets.items():
        for category in categories(cfg.root, cfg.layout):
            keys.append(f"{dataset}/{category}")
    return keys


def build_partitions(settings: Settings) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(settings))


def split_key(settings: Settings, key: str) -> tuple[str, DatasetSettings, str]:
    """``dataset/category`` -> (dataset, its settings, category), refusing path-like keys."""
    dataset, sep, category = key.partition("/")
    if not sep or dataset not in settings.datasets:
        raise ValueError(f"partition key {key!r} is not <dataset>/<category> of a configured dataset")
    if category in ("", ".", "..") or "/" in category or "\\" in category:
        raise ValueError(f"partition key {key!r}: category {category!r} is not a plain folder name")
    return dataset, settings.datasets[dataset], category
