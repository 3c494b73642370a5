"""Study pages: one static HTML page per ablation study, in the paper's table format.

Input: the long ``ablation_results`` rows (profile, study, setting, setting_order, dataset,
category, metric, value). Per study, per profile and dataset, one table: a row per setting in
the study's order, a column per metric holding the mean over categories ×100 — and, where the
paper has the number (``study_reference.csv``: MVTec AD, VisA), the paper's value and
Δ = ours − paper under it. Other columns (seconds ``*_s``, ms, MB, subset sizes) are shown as
they are, mean per category. Ordered sweeps get a line plot (metric vs selection percentage,
vs interval start, vs s — with MSM time per image against the subset size). The backbones study
is transposed: a column per backbone × image size, a row per metric, per category and the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from musc_pipeline.core import ablation
from musc_pipeline.core.metrics import IMAGE_METRICS, PIXEL_METRICS
from musc_pipeline.reports import figures
from musc_pipeline.reports.cells import value_cell
from musc_pipeline.reports.paths import inside, slug
from musc_pipeline.reports.render import BANNER, CSS_NAME, _env

REFERENCE = Path(__file__).parent / "study_reference.csv"
LABELS = {"image_auroc": "Image AUROC (AC)", "image_f1_max": "Image F1-max", "image_ap": "Image AP",
          "pixel_auroc": "Pixel AUROC (AS)", "reaggregate_s": "re-aggregate s (all settings)", "rescore_s": "maps + RsCIN s",
          "evaluate_s": "metrics s", "msm_ms_per_image": "MSM ms / image", "peak_rss_mb": "peak RSS MB",
          "peak_gpu_mb": "peak GPU MB", "subset_min": "smallest subset", "subset_max": "largest subset",
          "pixel_f1_max": "Pixel F1-max", "pixel_ap": "Pixel AP", "pixel_pro": "Pixel PRO",
          "features_ms_per_image": "features ms / image", "maps_ms_per_image": "maps ms / image"}


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper: str  # where in the paper
    plot_x: str | None = None  # axis label of the line plot over the settings (None: no plot)


STUDIES = (
    Study("degrees", "Aggregation degrees", "Tab. 3 and Tab. 9"),
    Study("msm_variants", "MSM variants", "Tab. 5 (a)–(f)"),
    Study("percentage", "MSM selection percentage", "Fig. 8", "lowest x % of the distances kept"),
    Study("interval_start", "MSM interval start", "Tab. 10", "kept interval of the sorted distances"),
    Study("rscin", "RsCIN on / off and windows", "Tab. 5 and Fig. 8"),
    Study("rscin_plugin", "RsCIN as a plug-in", "Tab. 11"),
    Study("subsets", "Subsets: time, memory, metrics", "Tab. 7", "number of subsets s"),
    Study("fewshot", "Few-shot MuSc and MuSc+", "Tab. 16"),
    Study("backbones", "Backbones and image sizes", "Tab. 8 and Tab. 13"),
)


def page_name(study: str) -> str:
    return f"study_{slug(study)}.html"


def load_reference(path: Path = REFERENCE) -> pd.DataFrame:
    ref = pd.read_csv(path, dtype={"study": str, "setting": str, "dataset": str, "metric": str})
    ref["value"] = pd.to_numeric(ref["value"], errors="coerce")
    return ref


def _tables(rows: pd.DataFrame, ref: pd.DataFrame) -> list[dict]:
    """One table per (profile, dataset): settings × metrics, means over categories."""
    out = []
    for (profile, dataset), part in rows.groupby(["profile", "dataset"], sort=True):
        metrics = list(dict.fromkeys(part["metric"]))
        metrics = [m for m in metrics if m in ablation.STUDY_METRICS] + [m for m in metrics if m not in ablation.STUDY_METRICS]
        categories = sorted(part["category"].unique())
        means = part.groupby(["setting_order", "setting", "metric"], sort=True)["value"].mean()
        counts = part.dropna(subset=["value"]).groupby(["setting", "metric"])["category"].nunique()
        refs = {(r.setting, r.metric): (r.value, r.source) for r in ref[ref["dataset"] == dataset].itertuples()}
        settings = list(dict.fromkeys((o, s) for o, s, _ in means.index))
        body = []
        for order, setting in settings:
            cells = []
            for m in metrics:
                v = means.get((order, setting, m), math.nan)
                if m not in ablation.STUDY_METRICS:  # seconds, ms, MB, image counts: as they are
                    text = "n/a" if math.isnan(v) else f"{v:.2f}" if m.endswith("_s") else f"{v:.0f}"
                    cells.append({"text": text, "na": math.isnan(v), "title": "", "raw": True})
                    continue
                n = int(counts.get((setting, m), 0))
                note = "" if n == len(categories) else f"mean over {n} of {len(categories)} categories"
                r, source = refs.get((setting, m), (None, ""))
                cells.append(value_cell(v, note or "not defined for these categories", r, source) | {"metric": m})
            body.append({"setting": setting, "cells": cells})
        out.append({"profile": profile, "dataset": dataset, "categories": categories, "body": body,
                    "columns": [LABELS.get(m, m) for m in metrics],
                    "has_ref": any(k in refs for k in [(s, m) for _, s in settings for m in metrics])})
    return out


def _backbone_tables(rows: pd.DataFrame) -> list[dict]:
    """Backbones and image sizes: per dataset, the mean over categories and each category, one
    column per backbone × size (setting), a row per metric, time and memory."""
    out = []
    for dataset, part in rows.groupby("dataset", sort=True):
        settings = list(part.sort_values("setting_order")["setting"].unique())
        metrics = list(dict.fromkeys(part["metric"]))
        categories = sorted(part["category"].unique())
        for title, sel in [("Mean over categories", part), *[(c, part[part["category"] == c]) for c in categories]]:
            values = sel.groupby(["metric", "setting"])["value"].mean()
            body = [{"setting": LABELS.get(m, m), "cells": [_backbone_cell(m, values.get((m, s), math.nan)) for s in settings]}
                    for m in metrics]
            out.append({"heading": title, "dataset": dataset, "categories": categories, "body": body,
                        "columns": settings, "lead": "Metric", "has_ref": False})
    return out


def _backbone_cell(metric: str, v: float) -> dict:
    if metric in IMAGE_METRICS + PIXEL_METRICS:
        return value_cell(v, "not defined for this category") | {"metric": metric}
    return {"text": "n/a" if math.isnan(v) else f"{v:.0f}", "na": math.isnan(v), "title": "", "raw": True}


def _means(rows: pd.DataFrame, metric: str) -> pd.Series:
    return rows[rows["metric"] == metric].groupby(["setting_order", "setting"], sort=True)["value"].mean()


def _plot(out_dir: Path, study: Study, rows: pd.DataFrame) -> str | None:
    """Image and pixel AUROC (×100) against the ordered settings, one line per profile × dataset;
    where the study timed MSM, a third panel: MSM ms per image against the (mean) subset size."""
    if study.plot_x is None or rows.empty:
        return None
    timed = "msm_ms_per_image" in set(rows["metric"])
    fig = figures._new_figure(10.5 if timed else 7.0, 3.4)
    axes = fig.subplots(1, 3 if timed else 2)
    for (profile, dataset), part in rows.groupby(["profile", "dataset"], sort=True):
        label = f"{profile} · {dataset}"
        for ax, metric in zip(axes, ("image_auroc", "pixel_auroc")):
            mean = _means(part, metric)
            ax.plot(np.arange(len(mean)), 100 * mean.to_numpy(), marker="o", label=label)
            ax.set_xticks(np.arange(len(mean)), [s for _, s in mean.index], rotation=45, ha="right", fontsize=10)
        if timed:
            size = (_means(part, "subset_min") + _means(part, "subset_max")) / 2
            axes[2].plot(size.to_numpy(), _means(part, "msm_ms_per_image").to_numpy(), marker="o", label=label)
    for ax, metric in zip(axes, ("image_auroc", "pixel_auroc")):
        ax.set_title(LABELS[metric], fontsize=11)
        ax.set_xlabel(study.plot_x, fontsize=10)
    if timed:
        axes[2].set_title("MSM time vs images scored together", fontsize=11)
        axes[2].set_xlabel("images per subset (mean)", fontsize=10)
        axes[2].set_ylabel("ms per image", fontsize=10)
    for ax in axes:
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over categories (×100)", fontsize=10)
    axes[-1].legend(fontsize=10)
    return figures._save(fig, out_dir, f"study_{slug(study.name)}.png")


def render_study_pages(out_dir: Path, rows: pd.DataFrame, ref: pd.DataFrame | None = None) -> list[Path]:
    """Write one page per study (and ``studies.html`` listing them) into ``out_dir``; returns the pages.

    rows: the long study table; a study without rows gets a page saying it was not materialized.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = load_reference() if ref is None else ref
    env = _env()
    css = inside(out_dir, CSS_NAME)
    if not css.exists():  # the run report copies it too; a study page must not depend on it
        css.write_text((Path(__file__).parent / "templates" / CSS_NAME).read_text(encoding="utf-8"), encoding="utf-8")
    pages, links = [], []
    for study in STUDIES:
        part = rows[rows["study"] == study.name] if len(rows) else rows
        plot = _plot(out_dir, study, part)
        name = page_name(study.name)
        html = env.get_template("study.html").render(
            study=study, tables=(_backbone_tables(part) if study.name == "backbones" else
                                 _tables(part, ref[ref["study"] == study.name])) if len(part) else [],
            plot=plot, listing=None, pages=[(s.title, page_name(s.name)) for s in STUDIES], css=CSS_NAME,
            banner=BANNER, banners=[])
        inside(out_dir, name).write_text(html, encoding="utf-8")
        pages.append(out_dir / name)
        links.append({"title": study.title, "paper": study.paper, "href": name,
                      "profiles": sorted(part["profile"].unique()) if len(part) else []})
    html = env.get_template("study.html").render(study=None, tables=[], plot=None, listing=links,
                                                 pages=[(s.title, page_name(s.name)) for s in STUDIES],
                                                 css=CSS_NAME, banner=BANNER, banners=[])
    inside(out_dir, "studies.html").write_text(html, encoding="utf-8")
    return pages

