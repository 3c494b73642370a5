"""Score history: each category's per-image scores and grid maps of its last runs, so a new
run can be compared image by image with the one before (``regression_vs_previous``).

One Parquet file per profile and category, ``<storage>/<profile>/score_history/<dataset>/
<category>.parquet`` (the catalog's ``score_history`` view unites them), one row per image and
run: the run's id, time, profile fingerprint and backbone, the image's id, label, image score
and h×w grid map (float32 as a list, a few KB), the S and smoothing the maps were upsampled
with, and the run's metric values. Runs are keyed by the profile name, not by its
fingerprint, so a run after a backbone change meets the run before it; each row records the
fingerprint it was made with. A write keeps the newest ``keep`` runs (atomic: the old file or
the new one, never half of either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from dagster import AssetKey
from upath import UPath

from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.resources.storage import ParquetIOManager

HISTORY_TABLE = "score_history"
_RUN_COLUMNS = ("run_id", "materialized_at", "config", "backbone", "image_size", "smoothing_sigma")


@dataclass(frozen=True)
class ScoredRun:
    """One run of a category: what the history stores per image, and the run's metrics."""

    run_id: str
    materialized_at: str
    config: str
    backbone: str
    image_ids: list[str]
    labels: np.ndarray  # N
    scores: np.ndarray  # N image scores (after re-scoring)
    patch_maps: np.ndarray  # N×h×w float32
    image_size: int
    smoothing_sigma: float
    metrics: dict[str, float]

    def rows(self) -> pd.DataFrame:
        n, h, w = self.patch_maps.shape
        df = pd.DataFrame({"image_id": self.image_ids, "label": self.labels.astype(int), "score": self.scores,
                           "grid_h": h, "grid_w": w,
                           "patch_map": list(self.patch_maps.reshape(n, h * w).astype(np.float32))})
        for k in _RUN_COLUMNS:
            df[k] = getattr(self, k)
        for k in METRIC_NAMES:
            df[k] = self.metrics.get(k, np.nan)
        return df


class ScoreHistory:
    """The history files under one storage location (a path or fsspec URL)."""

    def __init__(self, storage: str):
        self._io = ParquetIOManager(base_path=UPath(storage))

    def path(self, profile: str, partition: str) -> UPath:
        return self._io.partition_file(AssetKey([profile, HISTORY_TABLE]), partition)

    def read(self, profile: str, partition: str) -> pd.DataFrame:
        path = self.path(profile, partition)
        return self._io.load_from_path(None, path) if path.exists() else pd.DataFrame()

    def latest(self, profile: str, partition: str) -> ScoredRun | None:
        """The newest stored run of the category, or None."""
        df = self.read(profile, partition)
        if df.empty:
            return None
        last = df[df["run_id"] == df.sort_values("materialized_at")["run_id"].iloc[-1]]
        first = last.iloc[0]
        h, w = int(first["grid_h"]), int(first["grid_w"])
        maps = np.stack([np.asarray(m, dtype=np.float32) for m in last["patch_map"]]).reshape(len(last), h, w)
        return ScoredRun(run_id=str(first["run_id"]), materialized_at=str(first["materialized_at"]),
                         config=str(first["config"]), backbone=str(first["backbone"]),
                         image_ids=[str(i) for i in last["image_id"]], labels=last["label"].to_numpy(int),
                         scores=last["score"].to_numpy(np.float64), patch_maps=maps,
                         image_size=int(first["image_size"]), smoothing_sigma=float(first["smoothing_sigma"]),
                         metrics={k: float(first[k]) for k in METRIC_NAMES if k in last.columns})

    def append(self, profile: str, partition: str, run: ScoredRun, keep: int) -> None:
        """Add ``run`` (replacing a stored run of the same id) and keep the newest ``keep`` runs."""
        old = self.read(profile, partition)
        if not old.empty:
            old = old[old["run_id"] != run.run_id]
        df = pd.concat([old, run.rows()], ignore_index=True) if not old.empty else run.rows()
        runs = df.drop_duplicates("run_id").sort_values("materialized_at")["run_id"].iloc[-keep:]
        self._io.dump_to_path(None, df[df["run_id"].isin(runs)].reset_index(drop=True), self.path(profile, partition))
