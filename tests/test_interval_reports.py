"""Intervals in the HTML report: under each value on run pages and the index headline, the mean
row's combined interval, and the comparison page's paired intervals and significance marks."""

from __future__ import annotations

import math
import re

import pandas as pd
from scipy.stats import norm

from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.reports import RunData, render_reports


def _run(profile: str, values: dict[str, float], se: float) -> RunData:
    rows = []
    for cat, shift in (("c1", 0.0), ("c2", -0.02)):
        row = {"dataset": "demo", "category": cat, "n_images": 96, "n_anomalous": 48, "notes": "",
               "random_init": False, "interval_level": 0.95}
        for k in METRIC_NAMES:
            v = values.get(k, 0.9) + shift
            row |= {k: v, f"{k}_lo": v - 2 * se, f"{k}_hi": v + se, f"{k}_se": se}
        rows.append(row)
    return RunData(profile=profile, description="", metrics=pd.DataFrame(rows), facts={}, random_init=False)


def _paired() -> pd.DataFrame:
    rows = []
    for cat in ("c1", "c2"):
        for k in METRIC_NAMES:
            sig = k == "image_auroc"  # only image AUROC's interval excludes 0
            rows.append({"dataset": "demo", "category": cat, "metric": k, "delta": -0.1 if sig else -0.01,
                         "lo": -0.15 if sig else -0.12, "hi": -0.05 if sig else 0.1, "se": 0.02 if sig else 0.06,
                         "p_value": 0.001 if sig else 0.8})
    return pd.DataFrame(rows)


def test_intervals_and_significance_marks_in_the_pages(tmp_path):
    a, b = _run("a", {"image_auroc": 0.95}, se=0.01), _run("b", {"image_auroc": 0.85}, se=0.01)
    index = render_reports(tmp_path, [a, b], None, paired=_paired())
    run_page = (tmp_path / "a_demo.html").read_text()
    assert '<span class="v">95.0</span><span class="ci" title="95 % interval">[93.0, 96.0]</span>' in run_page
    z = norm.ppf(0.975)
    mean_se = math.sqrt(2 * 0.01**2) / 2
    mean = (0.95 + 0.93) / 2
    assert f"[{100 * (mean - z * mean_se):.1f}, {100 * (mean + z * mean_se):.1f}]" in run_page
    assert "[93.0, 96.0]" in index.read_text()  # the headline: image AUROC of c1
    compare = (tmp_path / "compare_a_vs_b.html").read_text()
    marks = re.findall(r'data-metric="(\w+)"[^>]*>\s*<span class="diff[^"]*">[^<]*(<span class="sig")?', compare)
    assert len(marks) == 3 * len(METRIC_NAMES) and {k for k, sig in marks if sig} == {"image_auroc"}
    assert "[-15.0, -5.0]" in compare and "[-12.0, +10.0]" in compare
    mean_ci = f"[{100 * (-0.1 - z * math.sqrt(2 * 0.02**2) / 2):+.1f}, {100 * (-0.1 + z * math.sqrt(2 * 0.02**2) / 2):+.1f}]"
    assert mean_ci in compare  # the mean row: the categories' paired standard errors combined


def test_chromium_shows_the_intervals_and_marks(tmp_path):
    from test_reports import dump_dom, screenshot

    a, b = _run("a", {"image_auroc": 0.95}, se=0.01), _run("b", {"image_auroc": 0.85}, se=0.01)
    render_reports(tmp_path / "out", [a, b], None, paired=_paired())
    run_dom = dump_dom(tmp_path, tmp_path / "out" / "a_demo.html")
    assert '<span class="ci" title="95 % interval">[93.0, 96.0]</span>' in run_dom
    compare = tmp_path / "out" / "compare_a_vs_b.html"
    assert dump_dom(tmp_path, compare).count('<span class="sig" title=') == 3  # c1, c2 and the mean: image AUROC
    screenshot(tmp_path, compare, tmp_path / "compare.png")
