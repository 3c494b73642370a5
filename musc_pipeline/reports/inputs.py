"""What the report is rendered from: the metric columns and their labels, :class:`RunData` (one
profile's metrics table, facts and figures, built by the assets), the paper's reference table,
and the normalised metrics frame every page reads.

Metric values arrive as fractions in [0, 1] (or NaN); the paper's numbers
(``reference_results.csv``) are ×100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Classification", (("image_auroc", "AUROC"), ("image_f1_max", "F1-max"), ("image_ap", "AP"))),
    (
        "Segmentation",
        (("pixel_auroc", "AUROC"), ("pixel_f1_max", "F1-max"), ("pixel_ap", "AP"), ("pixel_pro", "PRO")),
    ),
)
METRICS: tuple[str, ...] = tuple(key for _, cols in GROUPS for key, _ in cols)
METRIC_LABELS: dict[str, str] = {key: f"{'Image' if g == 'Classification' else 'Pixel'} {label}"
                                 for g, cols in GROUPS for key, label in cols}
HEADLINE: tuple[str, ...] = ("image_auroc", "pixel_auroc")


@dataclass
class RunData:
    profile: str  # e.g. "musc", "random_vit"
    description: str
    # one row per materialized category: dataset, category, METRICS (fractions or NaN), n_images,
    # n_anomalous, notes; None (or no rows): no category materialized yet
    metrics: pd.DataFrame | None
    facts: dict[str, str]  # run facts: backbone, weights sha256, image size, timings, versions, date, …
    random_init: bool  # True -> a loud banner on every page of this run and on its section of the index
    # (dataset, category) -> kind -> relpath, for the categories whose category_figures exist
    figures: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)  # dataset -> layout, for the authors' mask rule


def load_reference(path: Path) -> pd.DataFrame:
    """The paper's per-category numbers (×100) with a ``mean`` row per dataset."""
    ref = pd.read_csv(path, dtype={"dataset": str, "category": str})
    missing = {"dataset", "category", *METRICS} - set(ref.columns)
    if missing:
        raise ValueError(f"{path}: reference table lacks columns {sorted(missing)}")
    ref["dataset"] = ref["dataset"].str.strip()
    ref["category"] = ref["category"].str.strip()
    for key in METRICS:
        ref[key] = pd.to_numeric(ref[key], errors="coerce")
    return ref


def metrics_frame(run: RunData) -> pd.DataFrame:
    if run.metrics is None or (run.metrics.empty and not len(run.metrics.columns)):
        df = pd.DataFrame({"dataset": pd.Series(dtype=str), "category": pd.Series(dtype=str)})
    else:
        df = run.metrics.copy()
    for col in ("dataset", "category"):
        if col not in df.columns:
            raise ValueError(f"run {run.profile!r}: metrics table lacks a {col!r} column")
        df[col] = df[col].astype(str)
    for key in METRICS:
        df[key] = pd.to_numeric(df[key], errors="coerce") if key in df.columns else math.nan
    for key in ("n_images", "n_anomalous"):
        if key not in df.columns:
            df[key] = math.nan
    df["notes"] = df["notes"].fillna("").astype(str) if "notes" in df.columns else ""
    return df.reset_index(drop=True)


def datasets(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["dataset"]))
