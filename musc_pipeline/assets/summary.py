"""Assets over all categories: metric tables, figures, the DuckDB catalog and the HTML report."""


import importlib.metadata
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from dagster import (
    AllPartitionMapping,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
)

from musc_pipeline.assets.partitions import partition_keys, split_key
from musc_pipeline.assets.metadata import figure_markdown, md_table, table_metadata
from musc_pipeline.assets.metrics_columns import describe_column
from musc_pipeline.assets.ground_truth import ground_truth
from musc_pipeline.assets.paired_runs import paired_profiles
from musc_pipeline.assets.paper_reference import REFERENCE_CSV
from musc_pipeline.assets.scoring import full_maps
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.core import metrics
from musc_pipeline.reports import RunData, figures, load_reference, render, slug
from musc_pipeline.reports.studies import render_study_pages
from musc_pipeline.resources.datasets import read_image
from musc_pipeline.resources.storage import ArrayBundle, rebuild_catalog
from musc_pipeline.settings import VARIANT_CHOICES, ProfileSettings, Settings

METRIC_COLUMNS = list(metrics.IMAGE_METRICS + metrics.PIXEL_METRICS)
_ALL = {"allow_missing_partitions": True}
#: The UI's name of each figure of ``category_figures``.
FIGURE_TITLES = {"qualitative": "qualitative maps", "histograms": "score histograms", "curves": "ROC and PR curves"}


def with_means(df: pd.DataFrame) -> pd.DataFrame:
    """Per-category rows plus one 'mean' row per dataset (mean of categories, NaN-aware)."""
    rows = [df]
    for dataset, part in df.groupby("dataset", sort=True):
        mean = {"dataset": dataset, "category": "mean", **part[METRIC_COLUMNS].mean(numeric_only=True).to_dict()}
        rows.append(pd.DataFrame([mean]))
    return pd.concat(rows, ignore_index=True)


def build_profile_summary(name: str, profile: ProfileSettings, settings: Settings,
                          partitions: StaticPartitionsDefinition) -> list:
    def key(asset_name: str) -> AssetKey:
        return AssetKey([name, asset_name])

    @asset(name="metrics_table", key_prefix=[name], group_name=name, io_manager_key="tables", kinds={"parquet"},
           ins={"per_category": AssetIn(key("category_metrics"), partition_mapping=AllPartitionMapping(), metadata=_ALL)})
    def metrics_table(per_category) -> Output[pd.DataFrame]:
        """All categories' metrics of this profile with dataset means, like the paper's tables."""
        if isinstance(per_category, pd.DataFrame):  # Dagster hands over a lone partition unwrapped
            per_category = {"": per_category}
        if not per_category:
            raise ValueError(f"profile {name!r}: no category has been materialized yet")
        df = pd.concat(per_category.values(), ignore_index=True).sort_values(["dataset", "category"])
        table = with_means(df[["dataset", "category", *METRIC_COLUMNS]])
        return Output(df, metadata={"categories": len(df), "metrics": MetadataValue.md(md_table(table))}
                      | table_metadata(df, describe_column))

    @asset(name="regression_comparison", key_prefix=[name], group_name=name, io_manager_key="tables",
           kinds={"parquet"}, ins={"table": AssetIn(key("metrics_table"))})
    def regression_comparison(table: pd.DataFrame) -> Output[pd.DataFrame]:
        """Before/after table: each category's metrics against its previous materialization, with
        the paired test's interval of after − before and its p-value (NaN before a previous run)."""
        rows = []
        for r in table.itertuples():
            for m in METRIC_COLUMNS:
                before, after = getattr(r, f"previous_{m}"), getattr(r, m)
                paired = {c: getattr(r, f"previous_{m}_delta_{c}", math.nan) for c in ("lo", "hi", "p")}
                rows.append({"dataset": r.dataset, "category": r.category, "metric": m, "before": before,
                             "after": after, "delta": after - before, "delta_lo": paired["lo"],
                             "delta_hi": paired["hi"], "p_value": paired["p"],
                             "significant": bool(paired["lo"] > 0 or paired["hi"] < 0),
                             "before_backbone": r.previous_backbone, "after_backbone": r.backbone})
        df = pd.DataFrame(rows)
        changed = df[df["delta"].abs() > 1e-9]
        return Output(df, metadata=table_metadata(df) | {"changed_values": len(changed),
                                    "significant_changes": int(df["significant"].sum()) if len(df) else 0,
                                    "largest_changes": MetadataValue.md(md_table(
                                        changed.reindex(changed["delta"].abs().sort_values(ascending=False).index).head(15)))
                                    if len(changed) else "no change"})

    @asset(name="category_figures", key_prefix=[name], group_name=name, partitions_def=partitions, kinds={"matplotlib"},
           ins={"amaps": AssetIn(key("anomaly_maps")), "scores": AssetIn(key("rscin_scores")),
                "manifest": AssetIn(key("image_manifest"))})
    def category_figures(context: AssetExecutionContext, amaps: ArrayBundle, scores: pd.DataFrame,
                         manifest: pd.DataFrame) -> MaterializeResult:
        """Qualitative maps, score histograms and ROC/PR curves of one category (PNG files)."""
        dataset, cfg, category = split_key(settings, context.partition_key)
        out_dir = figure_dir(settings, name, dataset, category)
        out_dir.mkdir(parents=True, exist_ok=True)
        size = int(amaps.meta["image_size"])
        labels = scores["label"].fillna(-1).to_numpy(int)
        maps_ = full_maps(amaps)
        masks = ground_truth(manifest, size, resolve_mask_rule(profile.method.mask_rule, cfg.layout))
        images = [read_image(p) for p in manifest["path"]]
        s = scores["score_rscin"].to_numpy()
        made = {
            "qualitative": figures.qualitative(out_dir, category, images, masks, maps_, s, labels, list(manifest["image_id"])),
            "histograms": figures.histograms(out_dir, category, s, labels, maps_, masks),
            "curves": figures.curves(out_dir, category, s, labels),
        }
        made = {k: v for k, v in made.items() if v}
        (out_dir / "figures.json").write_text(json.dumps({k: str(Path(v).name) for k, v in made.items()}))
        meta = {}
        for kind, file in made.items():  # Dagster has no image metadata: a captioned Markdown image and the file
            meta[f"figure: {FIGURE_TITLES[kind]}"] = MetadataValue.md(figure_markdown(out_dir / file, FIGURE_TITLES[kind]))
            meta[f"figure file: {FIGURE_TITLES[kind]}"] = MetadataValue.path(str(out_dir / file))
        return MaterializeResult(metadata=meta | {"folder": MetadataValue.path(str(out_dir))})

    return [metrics_table, regression_comparison, category_figures]


def figure_dir(settings: Settings, profile: str, dataset: str, category: str) -> Path:
    safe = slug(category)
    return Path(settings.reports_dir) / "figures" / slug(profile) / slug(dataset) / safe


def build_global_assets(settings: Settings) -> list:
    profiles = list(settings.profiles)

    @asset(name="results_catalog", group_name="reports", kinds={"duckdb"},
           deps=[AssetKey([p, t]) for p in profiles for t in ("image_manifest", "rscin_scores", "category_metrics")])
    def results_catalog() -> MaterializeResult:
        """DuckDB database of views over every profile's Parquet tables (rebuilt, never appended)."""
        if "://" in settings.storage:
            raise ValueError("the DuckDB catalog is built on a local or mounted storage path")
        db = rebuild_catalog(settings.storage)
        import duckdb

        con = duckdb.connect(str(db), read_only=True)
        try:
            views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
            counts = {v: con.execute(f"SELECT count(*) FROM {v}").fetchone()[0] for v in views}
        finally:
            con.close()
        return MaterializeResult(metadata={"path": MetadataValue.path(str(db)), "rows": MetadataValue.json(counts)})

    @asset(name="html_report", group_name="reports", kinds={"html"},
           ins={f"metrics_{p}": AssetIn(AssetKey([p, "category_metrics"]), partition_mapping=AllPartitionMapping(),
                                        metadata=_ALL) for p in profiles},
           deps=[AssetKey([p, "category_figures"]) for p in profiles])
    def html_report(context: AssetExecutionContext, **per_category) -> MaterializeResult:
        """Static HTML: per-run paper-format tables, figures, run facts, and a run comparison, from
        whichever categories are materialized (the others are shown as not yet materialized)."""
        out_dir = Path(settings.reports_dir)
        runs = []
        for p in profiles:
            parts = per_category[f"metrics_{p}"]
            parts = {"": parts} if isinstance(parts, pd.DataFrame) else parts  # a lone partition comes unwrapped
            df = pd.concat(parts.values(), ignore_index=True).sort_values(["dataset", "category"]) if parts else None
            figs = {}
            for r in df.itertuples() if df is not None else []:
                folder = figure_dir(settings, p, r.dataset, r.category)
                listing = folder / "figures.json"
                if listing.is_file():
                    figs[(r.dataset, r.category)] = {
                        k: os.path.relpath(folder / v, out_dir) for k, v in json.loads(listing.read_text()).items()
                    }
            backbone = settings.profiles[p].backbone
            random_init = bool(df["random_init"].any()) if df is not None else backbone.weights == "random"
            runs.append(RunData(
                profile=p, description=settings.profiles[p].description, metrics=df,
                facts=run_facts(p, settings.profiles[p], df if df is not None else pd.DataFrame()),
                random_init=random_init, figures=figs, layouts={d: cfg.layout for d, cfg in settings.datasets.items()},
            ))
        reference = load_reference(REFERENCE_CSV)
        configured = [tuple(key.split("/", 1)) for key in partition_keys(settings)]
        if not (out_dir / "studies.html").is_file():  # the index links it: until study_pages runs, "not yet"
            render_study_pages(out_dir, pd.DataFrame(columns=["study"]))
        paired = paired_profiles(settings, profiles[0], profiles[1]) if len(profiles) >= 2 else None
        index = render.render_reports(out_dir, runs, reference, categories=configured,
                                      variants=variant_groups(settings), studies="studies.html", paired=paired)
        context.log.info(f"report written to {index}")
        meta = {"index": MetadataValue.path(str(index))}
        if paired is not None and len(paired):
            sig = paired[(paired["lo"] > 0) | (paired["hi"] < 0)]
            meta[f"paired: {profiles[1]} − {profiles[0]}"] = MetadataValue.md(md_table(paired))
            meta["paired: significant deltas"] = MetadataValue.int(len(sig))
        return MaterializeResult(metadata=meta)

    return [results_catalog, html_report]


def run_facts(profile_name: str, profile: ProfileSettings, metrics_df: pd.DataFrame) -> dict[str, str]:
    """Facts for the report: backbone identity, method config, timings, memory, versions, date."""
    facts = {"profile": profile_name, "description": profile.description}
    if len(metrics_df):
        first = metrics_df.iloc[0]
        facts |= {"backbone": str(first["backbone"]), "weights sha256": str(first["weights_sha256"]) or "n/a (random)",
                  "randomly initialised": str(bool(first["random_init"])), "image size": str(first["image_size"])}
        for stage in ("features", "msm", "maps"):
            col = f"{stage}_ms_per_image"
            facts[f"time per image: {stage} (ms, mean over categories)"] = f"{metrics_df[col].mean():.1f}"
        facts["peak memory (process RSS, MB, max)"] = f"{metrics_df['peak_rss_mb'].max():.0f}"
        for col in [c for c in metrics_df.columns if c.startswith("stored_") and c.endswith("_bytes_per_image")]:
            if metrics_df[col].notna().any():  # absent in tables written before storage was recorded
                stage = col.removeprefix("stored_").removesuffix("_bytes_per_image")
                facts[f"stored per image: {stage} (KB, mean over categories)"] = f"{metrics_df[col].mean() / 1024:.1f}"
        if metrics_df.get("peak_gpu_mb", pd.Series(dtype=float)).notna().any():  # absent in tables before it
            facts["peak GPU memory (allocated by torch, MB, max)"] = f"{metrics_df['peak_gpu_mb'].max():.0f}"
    facts["method"] = profile.method.model_dump_json()
    facts["backbone settings"] = profile.backbone.model_dump_json()
    facts["subsets"] = str(profile.method.subsets)
    facts["intermediates"] = profile.intermediates
    for pkg in ("torch", "open_clip_torch", "timm", "dagster"):
        facts[f"version: {pkg}"] = importlib.metadata.version(pkg)
    facts["python"] = platform.python_version()
    facts["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return facts


def variant_groups(settings: Settings) -> dict[str, list[str]]:
    """Each paper-method profile -> the profiles of method variants on the same backbone."""
    profiles = settings.profiles
    paper = [p for p, v in profiles.items() if not v.method.variant(*VARIANT_CHOICES)]
    return {p: [q for q, v in profiles.items() if q not in paper and v.backbone == profiles[p].backbone]
            for p in paper}
