"""Static HTML report: index, one page per (run, dataset), one comparison page, and one page
of method variants per paper profile (every variant's Δ against it, side by side).

Pure functions, no Dagster: the assets build :class:`RunData` and call
:func:`render_reports`. Pages come from the Jinja2 templates in ``templates/`` (autoescape on,
``base.html`` layout, one template per page kind); every string that comes from data reaches
the page only through autoescaping. File names built from data go through
:func:`~musc_pipeline.reports.paths.slug`; figure paths must be relative to ``out_dir`` and
stay inside it. Links are relative, so the folder can be copied and opened from disk.

Metric values arrive as fractions in [0, 1] (or NaN) and are shown ×100 with one decimal,
as in the paper; the paper's numbers (``reference_results.csv``) are already ×100.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from urllib.parse import quote

import jinja2
import pandas as pd

from .cells import (Reference, count, delta_cell, interval_of, is_nan, mean_delta, mean_interval, mean_over_categories,
                    value_cell)
from .conventions import conventions
from .inputs import GROUPS, HEADLINE, METRIC_LABELS, METRICS, RunData, datasets, metrics_frame
from .pages import Names, compare_page, href, run_link, variant_pages
from .paths import escapes, inside, safe_relpath, slug

TEMPLATES = Path(__file__).parent / "templates"
CSS_NAME = "report.css"
BANNER = "RANDOMLY INITIALISED BACKBONE — not a pretrained model; numbers are a baseline only"

FIGURE_KINDS: tuple[tuple[str, str], ...] = (
    ("qualitative", "Qualitative examples"),
    ("histograms", "Score histograms"),
    ("curves", "ROC and precision–recall curves"),
)


#: Fact keys shown from RunData's own fields (or the page's lede), never repeated from ``facts``.
OWN_FACTS = {"profile", "description", "randomly initialised", "randomly initialised backbone", "random init"}
NOT_MATERIALIZED = "not yet materialized"


# --------------------------------------------------------------------------- pages


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _no_curves(rec: dict) -> str:
    """Why a category whose figures exist has no ROC / PR curves, from its image counts."""
    n, k = rec.get("n_images"), rec.get("n_anomalous")
    if is_nan(n) or is_nan(k):
        return "no ROC / PR curves: the labelled images hold only one class"
    n, k = int(float(n)), int(float(k))
    if k == 0:
        return f"no ROC / PR curves: none of the {n} images is labelled defective"
    if k == n:
        return f"no ROC / PR curves: all {n} images are labelled defective"
    return (f"no ROC / PR curves although the category holds {n - k} normal and {k} defective images: "
            "its figures predate its metrics; re-materialize category_figures")


def _figures(out_dir: Path, run: RunData, rec: dict) -> list[dict]:
    dataset, category = rec["dataset"], rec["category"]
    made = run.figures.get((dataset, category))
    given = dict(made or {})
    kinds = list(FIGURE_KINDS) + [(k, k.replace("_", " ").capitalize()) for k in given if k not in dict(FIGURE_KINDS)]
    items = []
    for kind, caption in kinds:
        rel = given.get(kind)
        src = safe_relpath(out_dir, rel) if rel else None
        if src is not None:
            items.append({"kind": kind, "caption": caption, "src": quote(src),
                          "alt": f"{caption} for {dataset} / {category}", "missing": None})
            continue
        if made is None:
            why = f"{NOT_MATERIALIZED}: {run.profile}/category_figures has not been materialized for this category"
        elif rel and escapes(out_dir, rel):
            why = f"figure path {rel!s} lies outside the report folder: not linked"
        elif rel:
            why = f"figure file {rel!s} is missing from the report folder; re-materialize category_figures"
        elif kind == "curves":
            why = _no_curves(rec)
        else:
            why = f"category_figures made no {caption.lower()} figure for this category"
        items.append({"kind": kind, "caption": caption, "src": None, "alt": "", "missing": why})
    return items


def _run_page(out_dir: Path, run: RunData, df: pd.DataFrame, dataset: str, ref: Reference,
              missing: list[str]) -> dict:
    part = df[df["dataset"] == dataset]
    has_ref = ref.has_dataset(dataset)
    rows = []
    for rec in part.to_dict("records"):
        cat, note = rec["category"], rec["notes"]
        rows.append({
            "category": cat,
            "n_images": count(rec["n_images"]),
            "n_anomalous": count(rec["n_anomalous"]),
            "notes": note,
            "cells": [dict(value_cell(rec[k], note, ref.value(dataset, cat, k), **interval_of(rec, k)), metric=k)
                      for k in METRICS],
            "figures": _figures(out_dir, run, rec),
            "anchor": "cat-" + slug(cat),
        })
    mean_cells = []
    for k in METRICS:
        m, note = mean_over_categories(part[k])
        rv, rnote = ref.mean(dataset, list(part["category"]), k)
        mean_cells.append(dict(value_cell(m, note, rv, rnote, **mean_interval(part, k)), metric=k, title=note or ""))
    return {
        "dataset": dataset,
        "rows": rows,
        "mean": {"label": f"mean ({len(rows)} categories)", "cells": mean_cells},
        "has_ref": has_ref,
        "missing": missing,
    }


def _headline(dataset: str, frames: list[tuple[RunData, pd.DataFrame]], ref: Reference,
              expected: list[str]) -> dict:
    done = list(dict.fromkeys(c for _, df in frames for c in df.loc[df["dataset"] == dataset, "category"]))
    cats = list(dict.fromkeys(done + expected))
    has_ref = ref.has_dataset(dataset)
    rows = []
    for cat in cats:
        cells = []
        for run, df in frames:
            hit = df[(df["dataset"] == dataset) & (df["category"] == cat)]
            for k in HEADLINE:
                if hit.empty:
                    cells.append(dict(value_cell(math.nan, f"{NOT_MATERIALIZED} in run {run.profile}"),
                                      metric=k, profile=run.profile))
                else:
                    rec = hit.iloc[0]
                    cells.append(dict(value_cell(rec[k], rec["notes"], **interval_of(rec.to_dict(), k)), metric=k,
                                      profile=run.profile))
        paper = [value_cell(ref.value(dataset, cat, k) / 100 if ref.value(dataset, cat, k) is not None else math.nan,
                            "not in the paper's table") for k in HEADLINE]
        rows.append({"category": cat, "cells": cells, "paper": paper})
    mean_cells = []
    for run, df in frames:
        part = df[df["dataset"] == dataset]
        for k in HEADLINE:
            m, note = mean_over_categories(part[k]) if not part.empty else (math.nan, f"{NOT_MATERIALIZED} in run {run.profile}")
            mean_cells.append(dict(value_cell(m, note, **mean_interval(part, k)), metric=k, profile=run.profile,
                                   title=note))
    paper_mean = []
    for k in HEADLINE:
        v, note = ref.mean(dataset, done, k)
        paper_mean.append(dict(value_cell(v / 100 if v is not None else math.nan, "not in the paper's table"),
                               title=note))
    return {
        "dataset": dataset,
        "runs": [{"profile": r.profile, "random_init": r.random_init} for r, _ in frames],
        "rows": rows,
        "mean": {"label": f"mean ({len(done)} categories)", "cells": mean_cells, "paper": paper_mean},
        "has_ref": has_ref,
    }


def _compare(a: tuple[RunData, pd.DataFrame], b: tuple[RunData, pd.DataFrame],
             paired: pd.DataFrame | None = None) -> list[dict]:
    """Sections of b − a per dataset; ``paired`` (dataset, category, metric, lo, hi, se,
    p_value of b − a) adds each Δ's interval and significance."""
    (_, da), (_, db) = a, b
    tests = {} if paired is None else {(r["dataset"], r["category"], r["metric"]): r for r in paired.to_dict("records")}
    sections = []
    for dataset in dict.fromkeys(datasets(da) + datasets(db)):
        pa, pb = da[da["dataset"] == dataset], db[db["dataset"] == dataset]
        merged = pa.merge(pb, on=["dataset", "category"], suffixes=("_a", "_b"), how="inner", sort=False)
        rows = []
        for rec in merged.to_dict("records"):
            note = " / ".join(n for n in (rec["notes_a"], rec["notes_b"]) if n)
            rows.append({
                "category": rec["category"],
                "cells": [dict(delta_cell(rec[f"{k}_a"], rec[f"{k}_b"], note, tests.get((dataset, rec["category"], k))),
                               metric=k) for k in METRICS],
            })
        mean_cells = []
        for k in METRICS:
            ma, na = mean_over_categories(merged[f"{k}_a"]) if len(merged) else (math.nan, "")
            mb, nb = mean_over_categories(merged[f"{k}_b"]) if len(merged) else (math.nan, "")
            shared_paired = None if paired is None else mean_delta(paired[paired["dataset"] == dataset], k,
                                                                    list(merged["category"]))
            mean_cells.append(dict(delta_cell(ma, mb, " / ".join(n for n in (na, nb) if n), shared_paired), metric=k))
        shared = set(merged["category"])
        sections.append({
            "dataset": dataset,
            "rows": rows,
            "mean": {"label": f"mean ({len(rows)} shared categories)", "cells": mean_cells},
            "only_a": [c for c in pa["category"] if c not in shared],
            "only_b": [c for c in pb["category"] if c not in shared],
        })
    return sections


def _variants(paper: tuple[RunData, pd.DataFrame], variants: list[tuple[RunData, pd.DataFrame]]) -> list[dict]:
    """Per dataset: each category's rows of Δ (variant − paper), one row per variant, and the means."""
    sections: dict[str, dict] = {}
    for run, df in variants:
        for s in _compare(paper, (run, df)):
            sec = sections.setdefault(s["dataset"], {"dataset": s["dataset"], "categories": {}, "means": []})
            for row in s["rows"]:
                sec["categories"].setdefault(row["category"], []).append({"profile": run.profile, "cells": row["cells"]})
            sec["means"].append({"profile": run.profile, "label": s["mean"]["label"], "cells": s["mean"]["cells"]})
    return list(sections.values())


def _facts(run: RunData) -> list[tuple[str, str]]:
    """Run facts, each once: the run's own fields first, then ``facts`` without repeating them."""
    rows = [("profile", run.profile), ("randomly initialised backbone", "YES" if run.random_init else "no")]
    rows += [(str(k), str(v)) for k, v in (run.facts or {}).items() if str(k) not in OWN_FACTS]
    return rows


def render_reports(
    out_dir: Path,
    runs: list[RunData],
    reference: pd.DataFrame | None,
    compare: tuple[str, str] | None = None,
    categories: list[tuple[str, str]] | None = None,
    variants: dict[str, list[str]] | None = None,
    studies: str | None = None,
    paired: pd.DataFrame | None = None,
) -> Path:
    """Write the report folder; returns ``out_dir / "index.html"``.

    ``compare`` names two run profiles ``(a, b)`` for the page of deltas b − a; by default the
    first two runs are compared when there are at least two. ``categories`` lists the
    configured ``(dataset, category)`` pairs: those a run has no metrics for are shown as not
    yet materialized (a run with no metrics at all is shown as such, never an error).
    ``variants`` maps a paper profile to its method-variant profiles (same backbone): one page
    per paper profile shows every variant's deltas against it, category by category.
    ``studies``: the ablation studies' listing page (``reports.studies``) the index links to.
    ``paired``: the paired tests of the compared runs' b − a (:func:`_compare`), for their
    intervals and significance marks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = [r.profile for r in runs]
    if len(set(profiles)) != len(profiles):
        raise ValueError(f"render_reports: run profiles must be unique, got {profiles}")
    frames = [(run, metrics_frame(run)) for run in runs]
    by_name = dict(zip(profiles, frames))
    expected: dict[str, list[str]] = {}
    for dataset, category in categories or []:
        expected.setdefault(str(dataset), []).append(str(category))
    ref = Reference(reference)
    names = Names(out_dir, reserved={"index.html", CSS_NAME})
    shutil.copyfile(TEMPLATES / CSS_NAME, inside(out_dir, CSS_NAME))
    if compare is None and len(runs) >= 2:
        compare = (runs[0].profile, runs[1].profile)
    compare_info = compare_page(names, compare, profiles) if compare is not None else None
    pages_of_variants = variant_pages(names, variants or {}, profiles)
    run_links = [run_link(names, run, df, expected) for run, df in frames]
    write = _writer(out_dir)

    for (run, df), link in zip(frames, run_links):
        _write_run_pages(write, out_dir, run, df, link["pages"], ref)
    if compare_info is not None:
        a, b = (by_name[p] for p in compare)
        write(compare_info["file"], "compare.html", a=a[0], b=b[0], sections=_compare(a, b, paired), groups=GROUPS)
    for page in pages_of_variants:
        involved = [by_name[p] for p in (page["paper"], *page["variants"])]
        write(page["file"], "variants.html", paper=involved[0][0], variants=[r for r, _ in involved[1:]],
              sections=_variants(involved[0], involved[1:]), groups=GROUPS)

    all_datasets = list(dict.fromkeys([d for _, df in frames for d in datasets(df)] + list(expected)))
    write(
        "index.html", "index.html",
        runs=run_links, compare=compare_info, variant_pages=pages_of_variants, studies=studies and href(studies),
        headlines=[_headline(d, frames, ref, expected.get(d, [])) for d in all_datasets],
        headline_labels=[METRIC_LABELS[k] for k in HEADLINE],
    )
    return out_dir / "index.html"


def _write_run_pages(write, out_dir: Path, run: RunData, df: pd.DataFrame, pages: list[dict], ref: Reference) -> None:
    """A run's pages, one per dataset, each linking the others."""
    for page in pages:
        write(
            page["file"], "run.html",
            run=run, facts=_facts(run),
            table=_run_page(out_dir, run, df, page["dataset"], ref, page["missing"]),
            conventions=conventions(df[df["dataset"] == page["dataset"]], run.layouts.get(page["dataset"])),
            groups=GROUPS, other_pages=[p for p in pages if p is not page],
            banners=[run.profile] if run.random_init else [],
        )


def _writer(out_dir: Path):
    """``write(name, template, **context)``: one rendered page into ``out_dir``."""
    env = _env()

    def write(name: str, template: str, **ctx) -> None:
        ctx.setdefault("banners", [])
        html = env.get_template(template).render(banner=BANNER, css=CSS_NAME, **ctx)
        inside(out_dir, name).write_text(html, encoding="utf-8")

    return write
