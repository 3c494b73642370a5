"""Partitions: one key per existing ``<dataset>/<category>``.

Keys are discovered from the configured dataset roots when the code location loads (reload
it in the UI after adding a category). A static, discovered key list was chosen over a 2-D
dataset × category definition, which would show impossible cells (mvtec_ad × candle), and
over dynamic partitions fed by a sensor, which would leave a fresh instance — or the
``dagster asset materialize`` CLI — without keys until the sensor had run.

A configured root that does not exist or holds no category is reported with a warning naming
the path (and the environment variable it came from) when the code location loads — on the
terminal of ``dagster dev`` and of the ``dagster`` CLI — since its categories cannot appear.

A folder whose name cannot be a key (a path such as ``..`` or ``a\\b``, ``...``, control
characters such as a tab or newline, which Dagster refuses) is skipped with a warning naming
it, so one odd folder never stops the code location from loading.
"""

from __future__ import annotations

import logging
import os

from dagster import StaticPartitionsDefinition

from musc_pipeline.resources.datasets import categories, root_problem
from musc_pipeline.settings import ENV_ROOTS, DatasetSettings, Settings


log = logging.getLogger(__name__)


def _unusable(category: str) -> str | None:
    """Why a category name cannot be a partition key (None if it can)."""
    if category in ("", ".", "..") or "/" in category or "\\" in category:
        return "is not a plain folder name"
    if "..." in category or any(ord(c) < 32 or ord(c) == 127 for c in category):
        return "contains '...' or control characters, which Dagster refuses in partition keys"
    return None


def partition_keys(settings: Settings) -> list[str]:
    keys = []
    for dataset, cfg in settings.datasets.items():
        problem = root_problem(cfg.root, cfg.layout)
        if problem:
            var = ENV_ROOTS.get(dataset, ("",))[0]
            source = f" (from ${var})" if var and os.environ.get(var) else ""
            log.warning("dataset %s: root %s%s %s; it contributes no partition until this is fixed "
                        "and the code location reloaded", dataset, cfg.root, source, problem)
            continue
        for category in categories(cfg.root, cfg.layout):
            why = _unusable(category)
            if why:
                log.warning("dataset %s: skipping category %r under %s: the name %s",
                            dataset, category, cfg.root, why)
                continue
            keys.append(f"{dataset}/{category}")
    return keys


def build_partitions(settings: Settings) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition(partition_keys(settings))


def split_key(settings: Settings, key: str) -> tuple[str, DatasetSettings, str]:
    """``dataset/category`` -> (dataset, its settings, category), refusing path-like keys."""
    dataset, sep, category = key.partition("/")
    if not sep or dataset not in settings.datasets:
        raise ValueError(f"partition key {key!r} is not <dataset>/<category> of a configured dataset")
    why = _unusable(category)
    if why:
        raise ValueError(f"partition key {key!r}: category {category!r} {why}")
    return dataset, settings.datasets[dataset], category
