"""Table cells of the report in the paper's format: values ×100 with one decimal, the paper's
value and the signed difference beside ours, run-versus-run deltas, means over categories;
each value's interval under it (``[lo, hi]`` ×100) where the metrics table has one.

:class:`Reference` holds the paper's per-category numbers (``reference_results.csv``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from musc_pipeline.core.uncertainty.category import mean_over_categories as combine
from musc_pipeline.core.uncertainty.delong import Estimate


def is_nan(v: object) -> bool:
    try:
        return v is None or math.isnan(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


def pct(v: object) -> str | None:
    """A fraction as the paper prints it: ×100, one decimal (0.9876 → "98.8"); None for NaN."""
    return None if is_nan(v) else f"{100 * float(v):.1f}"  # type: ignore[arg-type]


def signed(d: float) -> tuple[str, str]:
    """A difference in points with its sign, and a CSS class (pos / neg / zero)."""
    text = f"{d:+.1f}"
    if text in ("+0.0", "-0.0"):
        return "0.0", "zero"
    return text, ("pos" if d > 0 else "neg")


def count(v: object) -> str:
    return "" if is_nan(v) else str(int(float(v)))  # type: ignore[arg-type]


def interval_text(lo: object, hi: object) -> str | None:
    """``[lo, hi]`` ×100 with one decimal, or None when either end is missing."""
    return None if is_nan(lo) or is_nan(hi) else f"[{pct(lo)}, {pct(hi)}]"


def value_cell(v: object, note: str = "", ref: object = None, ref_note: str = "", lo: object = None,
               hi: object = None) -> dict:
    """One table cell: our value (×100) with its interval [lo, hi] when given, and — when the
    paper has it — the paper's value and the signed difference ours − paper, computed from the
    numbers as shown."""
    text = pct(v)
    cell = {
        "text": text if text is not None else "n/a",
        "ci": interval_text(lo, hi) if text is not None else None,
        "na": text is None,
        "title": (note or "not available") if text is None else "",
        "ref": None,
        "diff": None,
        "diff_cls": "",
        "ref_title": ref_note,
    }
    if not is_nan(ref):
        cell["ref"] = f"{float(ref):.1f}"  # type: ignore[arg-type]
        if text is not None:
            cell["diff"], cell["diff_cls"] = signed(float(text) - round(float(ref), 1))  # type: ignore[arg-type]
    return cell


def delta_cell(a: object, b: object, note: str = "", paired: dict | None = None) -> dict:
    """b − a in points (×100, one decimal), from the values as shown; with a → b beside it.
    ``paired`` (``lo``, ``hi``, ``p_value`` of the paired test of b − a): the interval under
    it and ``sig`` True when the interval excludes 0."""
    ta, tb = pct(a), pct(b)
    cell = {"a": ta or "n/a", "b": tb or "n/a", "text": "n/a", "na": True, "cls": "", "title": note,
            "ci": None, "sig": None, "p": ""}
    if ta is not None and tb is not None:
        cell["text"], cell["cls"] = signed(float(tb) - float(ta))
        cell["na"] = False
        if paired and not is_nan(paired.get("lo")) and not is_nan(paired.get("hi")):
            lo, hi = float(paired["lo"]), float(paired["hi"])
            cell["ci"] = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cell["sig"] = lo > 0 or hi < 0
            cell["p"] = "" if is_nan(paired.get("p_value")) else f"p = {float(paired['p_value']):.3g}"
    elif not note:
        cell["title"] = "not available in " + " and ".join(
            name for name, t in (("run a", ta), ("run b", tb)) if t is None
        )
    return cell


def mean_delta(paired: pd.DataFrame, key: str, categories: list[str], level: float = 0.95) -> dict | None:
    """The paired interval of the mean Δ over ``categories`` (Var = Σ se² / C²), or None when
    a category lacks its paired standard error."""
    part = paired[(paired["metric"] == key) & paired["category"].isin(categories)]
    if len(part) != len(categories) or not len(part) or part["se"].isna().any():
        return None
    est = combine([Estimate(float(r.delta), float(r.se), math.nan, math.nan) for r in part.itertuples()], level, clip=False)
    return {"lo": est.lo, "hi": est.hi, "p_value": math.nan}


def interval_of(rec: dict, key: str) -> dict:
    """The ``lo``/``hi`` keyword arguments of :func:`value_cell` from a metrics row."""
    return {"lo": rec.get(f"{key}_lo"), "hi": rec.get(f"{key}_hi")}


def mean_interval(part: pd.DataFrame, key: str) -> dict:
    """``lo``/``hi`` of the mean over categories: independent categories, Var(mean) = Σ se² / C²
    (:func:`musc_pipeline.core.uncertainty.category.mean_over_categories`); none when a
    category with a value has no standard error (rows from before intervals existed)."""
    if f"{key}_se" not in part.columns or part.empty:
        return {}
    rows = [r for r in part.to_dict("records") if not is_nan(r.get(key))]
    if not rows or any(is_nan(r.get(f"{key}_se")) for r in rows):
        return {}
    level = float(rows[0].get("interval_level", 0.95))
    est = combine([Estimate(float(r[key]), float(r[f"{key}_se"]), math.nan, math.nan) for r in rows], level)
    return {"lo": est.lo, "hi": est.hi}


def mean_over_categories(values: pd.Series) -> tuple[float, str]:
    """Mean over the categories that have a value, and a note when some do not."""
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(arr)
    if not ok.any():
        return math.nan, "no category has this value"
    note = "" if ok.all() else f"mean over {int(ok.sum())} of {arr.size} categories (the others are n/a)"
    return float(arr[ok].mean()), note


class Reference:
    def __init__(self, ref: pd.DataFrame | None):
        self.rows: dict[tuple[str, str], dict] = {}
        if ref is not None:
            for rec in ref.to_dict("records"):
                self.rows[(str(rec["dataset"]), str(rec["category"]))] = rec

    def has_dataset(self, dataset: str) -> bool:
        return any(d == dataset for d, _ in self.rows)

    def value(self, dataset: str, category: str, key: str) -> float | None:
        if category == "mean":  # a category literally named "mean" is not the paper's mean row.
            return None
        rec = self.rows.get((dataset, category))
        return None if rec is None or is_nan(rec.get(key)) else float(rec[key])

    def mean(self, dataset: str, categories: list[str], key: str) -> tuple[float | None, str]:
        """The paper's mean for these categories: its own mean row when they are all of the
        paper's categories, else the mean of its values over the ones present."""
        paper_cats = {c for d, c in self.rows if d == dataset and c != "mean"}
        shown = [c for c in dict.fromkeys(categories) if c in paper_cats]
        if not shown:
            return None, ""
        full = self.rows.get((dataset, "mean"))
        if set(shown) == paper_cats and full is not None and not is_nan(full.get(key)):
            return float(full[key]), "the paper's mean row"
        vals = [self.value(dataset, c, key) for c in shown]
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, ""
        return float(np.mean(vals)), f"mean of the paper's values over the {len(vals)} categories shown"
