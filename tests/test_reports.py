"""The static HTML report: figures, pages, escaping, links — checked in headless Chromium.

One small fake report (two runs, one with a randomly initialised backbone; 6 images of
32×32 per category) is built once per module; the Chromium tests open it from disk.
Chromium is required: the tests fail (they do not skip) without it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from musc_pipeline.reports import BANNER, RunData, load_reference, render_reports, slug
from musc_pipeline.reports import figures as F
from musc_pipeline.reports.render import TEMPLATES

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
NOTE = "<b>x</b> pixel labels missing"
NOT_RUN = ("visa", "capsule")  # configured, materialized by no run
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
METRICS = ("image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_pro")

# dataset, category, image_auroc of run a ("musc"), of run b ("random_vit")
CATEGORIES = [
    ("mvtec_ad", "cable", 0.9876, 0.5123),
    ("mvtec_ad", "bottle", 0.9, 0.61),
    ("mvtec_ad", EVIL, 0.95, 0.5),
    ("visa", "candle", 0.8, 0.55),
]
REFERENCE_CSV = """dataset,category,image_auroc,image_f1_max,image_ap,pixel_auroc,pixel_f1_max,pixel_ap,pixel_pro
mvtec_ad,bottle,99.9,99.2,100.0,98.6,79.6,83.2,96.2
mvtec_ad,cable,99.0,97.3,99.4,96.3,62.3,59.0,90.8
mvtec_ad,mean,99.4,98.3,99.7,97.5,71.0,71.1,93.5
visa,candle,96.2,91.3,96.2,99.4,39.4,28.7,97.8
visa,mean,96.2,91.3,96.2,99.4,39.4,28.7,97.8
"""


# --------------------------------------------------------------------------- helpers


def chromium_path() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.fail("headless Chromium is needed for the report tests: apt-get install chromium", pytrace=False)
    return path


def run_chromium(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    cmd = [
        chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,2000", *extra, url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def dump_dom(tmp: Path, page: Path) -> str:
    proc = run_chromium(tmp, page.as_uri(), "--run-all-compositor-stages-before-draw",
                        "--virtual-time-budget=5000", "--dump-dom")
    assert "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def screenshot(tmp: Path, page: Path, png: Path) -> Image.Image:
    run_chromium(tmp, page.as_uri(), "--run-all-compositor-stages-before-draw",
                 "--virtual-time-budget=5000", f"--screenshot={png}")
    assert png.is_file(), f"chromium wrote no screenshot of {page.name}"
    assert png.stat().st_size > 10_000, f"screenshot of {page.name} is only {png.stat().st_size} bytes"
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, f"screenshot of {page.name} is (nearly) one colour"
    return img


class Page(HTMLParser):
    """Tags, attributes and text of one HTML document, plus the rows of ``table#<table_id>``."""

    def __init__(self, html: str, table_id: str = "metrics"):
        super().__init__(convert_charrefs=True)
        self.table_id = table_id
        self.starts: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.rows: list[dict] = []
        self._in_table = self._in_cat = self._in_sup = False
        self._row: dict | None = None
        self._metric: str | None = None
        self._spans: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.starts.append((tag, a))
        if tag == "table" and a.get("id") == self.table_id:
            self._in_table = True
        if not self._in_table:
            return
        if tag == "tr":
            self._row = {"class": a.get("class", ""), "label": "", "cells": {}}
            self.rows.append(self._row)
        elif tag == "th" and "cat" in a.get("class", "").split():
            self._in_cat = True
        elif tag == "sup":
            self._in_sup = True
        elif tag == "td" and self._row is not None:
            self._metric = a.get("data-metric") or None
            if self._metric:
                self._row["cells"][self._metric] = {"title": a.get("title", ""), "class": a.get("class", "")}
        elif tag == "span":
            self._spans.append((a.get("class", "") or "_").split()[0])

    def handle_endtag(self, tag):
        if not self._in_table:
            return
        if tag == "table":
            self._in_table = False
        elif tag == "th":
            self._in_cat = False
        elif tag == "sup":
            self._in_sup = False
        elif tag == "td":
            self._metric = None
        elif tag == "span" and self._spans:
            self._spans.pop()

    def handle_data(self, data):
        self.text.append(data)
        if not self._in_table or self._row is None:
            return
        if self._in_cat and not self._in_sup:
            self._row["label"] += data.strip()
        elif self._metric and self._spans:
            cell = self._row["cells"][self._metric]
            cell[self._spans[-1]] = cell.get(self._spans[-1], "") + data.strip()

    def all_text(self) -> str:
        return "".join(self.text)

    def attrs(self, tag: str, name: str) -> list[str]:
        return [a[name] for t, a in self.starts if t == tag and name in a]

    def row(self, label: str) -> dict:
        hits = [r for r in self.rows if r["label"] == label]
        assert len(hits) == 1, f"expected one row {label!r}, got {[r['label'] for r in self.rows]}"
        return hits[0]


def fake_category(seed: int, n: int = 6, size: int = 32):
    """6 random 32×32 RGB images; the anomalous ones have a disc mask and a hot map there."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.array([0, 0, 0, 1, 1, 1])[:n]
    masks = np.zeros((n, size, size), dtype=bool)
    images = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if labels[i]:
            cy, cx = rng.integers(8, size - 8, 2)
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 20
            img[masks[i]] = (220, 30, 30)
        images.append(img)
    maps = (rng.random((n, size, size)) * 0.4 + masks * 0.5).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1)
    return images, masks, maps, scores, labels


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the fake report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "site"
    outside = tmp / "outside.png"  # a real PNG outside the report: must never be linked.
    Image.new("RGB", (8, 8), "red").save(outside)
    ref_csv = tmp / "reference_results.csv"
    ref_csv.write_text(REFERENCE_CSV)
    before = files_under(tmp)

    runs = []
    for r, (profile, random_init) in enumerate([("musc", False), ("random_vit", True)]):
        rows, figs = [], {}
        for j, (dataset, category, auroc_a, auroc_b) in enumerate(CATEGORIES):
            images, masks, maps, scores, labels = fake_category(seed=10 * r + j)
            ids = [f"../../{category}/{i:03d}.png" for i in range(len(images))]
            fig_dir = out / "figures" / profile  # stems hold "/" and "<…>": slugged into fig_dir.
            stem = f"{dataset}/{category}"
            entry = {
                "qualitative": F.qualitative(fig_dir, stem, images, masks, maps, scores, labels, ids),
                "histograms": F.histograms(fig_dir, stem, scores, labels, maps, masks),
            }
            curve = F.curves(fig_dir, stem, scores, labels)
            if curve is not None:
                entry["curves"] = curve
            figs[(dataset, category)] = {k: f"figures/{profile}/{v}" for k, v in entry.items()}
            evil = category == EVIL
            value = auroc_a if r == 0 else auroc_b
            rows.append({
                "dataset": dataset, "category": category,
                "image_auroc": value, "image_f1_max": value - 0.02, "image_ap": value - 0.01,
                "pixel_auroc": value + 0.004, "pixel_f1_max": math.nan if evil else value - 0.3,
                "pixel_ap": math.nan if evil else value - 0.35, "pixel_pro": math.nan if evil else value - 0.05,
                "n_images": 6, "n_anomalous": 3, "notes": NOTE if evil else "",
            })
        figs[("mvtec_ad", "bottle")]["escape"] = "../outside.png"  # refused: outside out_dir.
        runs.append(RunData(
            profile=profile,
            description=f"{profile}: fake run for the tests",
            metrics=pd.DataFrame(rows),
            facts={"profile": profile, "description": f"{profile}: fake run for the tests",  # as run_facts gives
                   "backbone": "ViT-B-32 (fake)", "weights sha256": "ab" * 32, "randomly initialised": str(random_init),
                   "image size": "32", "note <i>": "<b>x</b>"},
            random_init=random_init,
            figures=figs,
        ))
    reference = load_reference(ref_csv)
    configured = [(d, c) for d, c, _, _ in CATEGORIES] + [NOT_RUN]
    index = render_reports(out, runs, reference, categories=configured)
    created = files_under(tmp) - before
    pages = {p.name: p for p in out.glob("*.html")}
    return SimpleNamespace(tmp=tmp, out=out, index=index, runs=runs, reference=reference,
                           created=created, pages=pages, outside=outside)


# --------------------------------------------------------------------------- figures


def label_px(png: Path, shown_width: float | None = None) -> float:
    """Height in px of the figure's smallest text when the PNG is shown ``shown_width`` px wide
    (default: its natural width), from the dpi and text size it records."""
    with Image.open(png) as img:
        dpi, smallest = float(img.info["dpi"][0]), float(img.info["min_font_pt"])
        width = img.size[0]
    return smallest * dpi / 72 * (shown_width or width) / width


def test_figure_files_are_valid_pngs_of_paper_size(report):
    pngs = list((report.out / "figures").rglob("*.png"))
    assert len(pngs) == 2 * len(CATEGORIES) * 3
    for png in pngs:
        assert SAFE_NAME.match(png.name), png.name
        assert png.stat().st_size <= F.MAX_PNG_BYTES, f"{png.name}: {png.stat().st_size} bytes"
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] >= 700, (png.name, img.size)
        assert label_px(png) >= 10, f"{png.name}: labels of {label_px(png):.1f} px"
    with Image.open(next(p for p in pngs if p.name.endswith("_qualitative.png"))) as img:
        assert img.size[0] > img.size[1] / 2, img.size  # a figure, not a strip (was 369×1290)


def test_figures_edge_cases(tmp_path):
    images, masks, maps, scores, labels = fake_category(seed=3)
    # Unlabelled, no masks: still a figure (highest and lowest scoring).
    name = F.qualitative(tmp_path, "x", images, None, maps, scores, -np.ones(6, int), [f"$id_{i}" for i in range(6)])
    assert (tmp_path / name).is_file()
    assert F.curves(tmp_path, "x", scores, np.zeros(6, int)) is None
    assert F.curves(tmp_path, "x", scores, -np.ones(6, int)) is None
    assert F.histograms(tmp_path, "x", scores, labels) == "x_histograms.png"
    # A stem that tries to climb out lands inside out_dir.
    name = F.histograms(tmp_path / "d", "../../escape", scores, labels, maps, masks)
    assert (tmp_path / "d" / name).is_file() and "/" not in name
    assert not list(tmp_path.glob("escape*")) and not list(tmp_path.parent.glob("escape*"))


def test_example_selection_is_deterministic():
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.5])
    labels = np.array([0, 0, 0, 1, 1, 1])
    chosen = F.select_examples(scores, labels, per_group=1)
    assert chosen == [(3, "highest-scored defect"), (0, "lowest-scored normal"), (4, "lowest-scored defect"),
                      (1, "highest-scored normal")]
    assert F.select_examples(scores, -np.ones(6), per_group=2) == [
        (1, "highest score"), (3, "highest score"), (0, "lowest score"), (4, "lowest score")]


# --------------------------------------------------------------------------- pages


def test_pages_and_names(report):
    assert report.index == report.out / "index.html"
    assert set(report.pages) == {
        "index.html", "musc_mvtec_ad.html", "musc_visa.html", "random_vit_mvtec_ad.html",
        "random_vit_visa.html", "compare_musc_vs_random_vit.html",
    }
    assert (report.out / "report.css").is_file()
    out = report.out.resolve()
    for path in report.created:  # nothing written outside out_dir, every name safe.
        assert out in path.resolve().parents, f"{path} written outside {out}"
        assert SAFE_NAME.match(path.name), path.name
    assert slug("mvtec_ad") == "mvtec_ad"
    assert slug("a b") != slug("a_b") and slug("..") not in ("..", ".")
    assert "/" not in slug("../../etc/passwd") and not slug("../x").startswith(".")


def test_table_values_reference_and_mean(report):
    page = Page(report.pages["musc_mvtec_ad.html"].read_text())
    cable = page.row("cable")["cells"]
    assert cable["image_auroc"]["v"] == "98.8"  # 0.9876
    assert cable["image_auroc"]["ref"] == "99.0"
    assert cable["image_auroc"]["diff"] == "-0.2"  # 98.8 − 99.0
    bottle = page.row("bottle")["cells"]
    assert (bottle["image_auroc"]["v"], bottle["image_auroc"]["ref"], bottle["image_auroc"]["diff"]) == (
        "90.0", "99.9", "-9.9")
    assert bottle["pixel_auroc"]["diff"] == "-8.2"  # 90.4 − 98.6
    evil = page.row(EVIL)["cells"]
    assert evil["pixel_pro"]["v"] == "n/a" and NOTE in evil["pixel_pro"]["title"]
    assert "ref" not in evil["image_auroc"]  # the paper has no such category.

    df = report.runs[0].metrics
    part = df[df["dataset"] == "mvtec_ad"]
    mean = page.row("mean (3 categories)")["cells"]
    for key in METRICS:
        assert mean[key]["v"] == f"{100 * np.nanmean(part[key].to_numpy(float)):.1f}", key
    assert mean["image_auroc"]["v"] == "94.6"  # (0.9876 + 0.9 + 0.95) / 3
    assert "2 of 3" in mean["pixel_pro"]["title"]
    assert mean["image_auroc"]["ref"] == "99.4"  # the paper's own mean row: all its categories shown.
    assert mean["image_auroc"]["diff"] == "-4.8"


def test_compare_and_index_tables(report):
    page = Page(report.pages["compare_musc_vs_random_vit.html"].read_text(), table_id="")
    assert "−" in page.all_text() and "cable" in page.all_text()
    html = report.pages["compare_musc_vs_random_vit.html"].read_text()
    # cable image AUROC: 51.2 − 98.8 (b − a).
    assert re.search(r'data-metric="image_auroc"[^>]*>\s*<span class="diff neg">-47\.6</span>', html)
    index = report.index.read_text()
    assert 'href="compare_musc_vs_random_vit.html"' in index
    for name in ("musc_mvtec_ad.html", "random_vit_visa.html"):
        assert f'href="{name}"' in index
    index_text = Page(index).all_text()
    assert "98.8" in index_text and "51.2" in index_text and BANNER in index_text


def test_data_is_escaped_in_the_source(report):
    for name, path in report.pages.items():
        html = path.read_text()
        assert EVIL not in html, name
        assert "<b>x</b>" not in html and "<i>" not in html, name
        assert "<script" not in html.lower(), name  # product pages carry no script at all.
    run_html = report.pages["random_vit_mvtec_ad.html"].read_text()
    assert EVIL_ESCAPED in run_html
    assert "&lt;b&gt;x&lt;/b&gt;" in run_html
    for template in TEMPLATES.glob("*.html"):
        assert "|safe" not in template.read_text().replace(" ", ""), template.name


def test_links_are_relative_and_resolve(report, tmp_path):
    copy = tmp_path / "copied"  # the folder must work after being copied elsewhere.
    shutil.copytree(report.out, copy)
    for page_path in copy.glob("*.html"):
        page = Page(page_path.read_text())
        ids = set(page.attrs("article", "id"))
        for src in page.attrs("img", "src") + page.attrs("a", "href") + page.attrs("link", "href"):
            assert not re.match(r"^([a-z]+:|/)", src), f"{page_path.name}: non-relative link {src}"
            target, _, fragment = src.partition("#")
            if not target:
                assert fragment in ids, f"{page_path.name}: dangling anchor #{fragment}"
                continue
            path = (page_path.parent / target).resolve()
            assert copy.resolve() in path.parents and path.is_file(), f"{page_path.name}: broken link {src}"
        for src in page.attrs("img", "src"):
            with Image.open(page_path.parent / src) as img:
                assert img.format == "PNG"
        linked = page.attrs("img", "src") + page.attrs("a", "href")
        assert not [s for s in linked if "outside" in s], f"{page_path.name} links a file outside the report"


# --------------------------------------------------------------------------- in Chromium


def test_chromium_renders_index_and_run_page(report):
    shots = report.tmp / "shots"
    shots.mkdir(exist_ok=True)
    index_img = np.asarray(screenshot(report.tmp, report.index, shots / "index.png").crop((0, 0, 1280, 120)))
    index_red = (index_img[..., 0] > 170) & (index_img[..., 1] < 40) & (index_img[..., 2] < 40)
    assert index_red.mean() < 0.01, "a random-init banner sits above the whole index"
    run_page = report.pages["random_vit_mvtec_ad.html"]
    img = screenshot(report.tmp, run_page, shots / "run.png")
    top = np.asarray(img.crop((0, 0, 1280, 300)))
    red = (top[..., 0] > 170) & (top[..., 1] < 40) & (top[..., 2] < 40)
    assert red.mean() > 0.05, "the random-init banner is not visible at the top of the page"

    dom = dump_dom(report.tmp, run_page)
    page = Page(dom)
    text = page.all_text()
    assert BANNER in text
    assert [r["label"] for r in page.rows if r["class"] == "category"] == ["cable", "bottle", EVIL]
    assert page.row("cable")["cells"]["image_auroc"]["v"] == "51.2"  # random_vit: 0.5123
    assert EVIL in text  # shown as literal text …
    assert not [t for t, _ in page.starts if t == "script"]  # … and never as an element.
    srcs = page.attrs("img", "src")
    assert len(srcs) == 3 * 3 and all(src.startswith("figures/random_vit/") for src in srcs)
    assert all(alt for alt in page.attrs("img", "alt"))
    assert any(EVIL in alt for alt in page.attrs("img", "alt"))

    index_html = dump_dom(report.tmp, report.index)
    index_dom = Page(index_html)
    assert "mean (3 categories)" in index_dom.all_text()
    # the banner belongs to the random run's section of the index, and to no other place there
    sections = dict(re.findall(r'<article class="run[^"]*"[^>]*data-profile="([^"]+)">(.*?)</article>', index_html, re.S))
    assert set(sections) == {"musc", "random_vit"}
    assert BANNER in sections["random_vit"] and BANNER not in sections["musc"]
    assert index_dom.all_text().count(BANNER) == 1


def test_run_facts_are_listed_once(report):
    for name in ("musc_mvtec_ad.html", "random_vit_mvtec_ad.html"):
        html = report.pages[name].read_text()
        table = re.search(r'<table class="facts">(.*?)</table>', html, re.S).group(1)
        keys = re.findall(r'<th scope="row">(.*?)</th>', table)
        assert len(keys) == len(set(keys)), keys
        assert keys.count("profile") == 1 and "description" not in keys
        random_rows = [k for k in keys if "random" in k]
        assert random_rows == ["randomly initialised backbone"], keys
        value = re.search(r'randomly initialised backbone</th><td>(.*?)</td>', table).group(1)
        assert value == ("YES" if name.startswith("random_vit") else "no")


def test_chromium_figure_labels_are_at_least_10px_at_100_percent(report):
    """The run page as Chromium lays it out (1280 px window, zoom 100 %): each figure's smallest
    text, scaled from the PNG's dpi and recorded text size to the width it is shown at."""
    page = report.pages["musc_mvtec_ad.html"]
    html = page.read_text()
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)  # allow the probe script
    html = html.replace("<head>", f'<head><base href="{report.out.as_uri()}/">', 1)
    probe = ("<script>window.addEventListener('load', () => { document.title = JSON.stringify("
             "[...document.querySelectorAll('.figs img')].map(i => [i.getAttribute('src'), i.naturalWidth,"
             " i.getBoundingClientRect().width])); });</script></body>")
    checker = report.tmp / "check" / "labels.html"
    checker.parent.mkdir(exist_ok=True)
    checker.write_text(html.replace("</body>", probe, 1))
    title = re.search(r"<title>(.*?)</title>", dump_dom(report.tmp, checker), re.S).group(1)
    shown = json.loads(unescape(title))
    assert len(shown) == 3 * 3
    for src, natural, width in shown:
        png = report.out / unquote(src)
        assert natural == Image.open(png).size[0] and width > 0, (src, natural, width)
        assert label_px(png, width) >= 10, f"{src}: smallest text {label_px(png, width):.1f} px at {width:.0f} px wide"


def test_chromium_loads_every_image(report):
    srcs = sorted({src for p in report.pages.values() for src in Page(p.read_text()).attrs("img", "src")})
    assert len(srcs) == 2 * len(CATEGORIES) * 3
    # A test-only page, outside the report, loading the same relative paths against the
    # report folder; its title becomes the count of images Chromium could not decode.
    checker = report.tmp / "check" / "images.html"
    checker.parent.mkdir(exist_ok=True)
    imgs = "\n".join(f'<img src="{src}">' for src in srcs)
    checker.write_text(
        f'<!doctype html><html><head><base href="{report.out.as_uri()}/"><title>pending</title></head>'
        f"<body>{imgs}<script>window.addEventListener('load', () => {{"
        "const all = [...document.images];"
        "document.title = 'broken=' + all.filter(i => !i.complete || i.naturalWidth === 0).length"
        " + ' total=' + all.length; });</script></body></html>"
    )
    dom = dump_dom(report.tmp, checker)
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title == f"broken=0 total={len(srcs)}", title


# --------------------------------------------------------------------------- what is not there


def test_missing_runs_categories_and_figures_give_the_real_reason(tmp_path):
    out = tmp_path / "site"
    images, masks, maps, scores, labels = fake_category(seed=1)
    fig_dir = out / "figures"
    one_class = {"qualitative": F.qualitative(fig_dir, "normal_only", images, masks, maps, scores, np.zeros(6, int),
                                              [str(i) for i in range(6)]),
                 "histograms": F.histograms(fig_dir, "normal_only", scores, np.zeros(6, int))}
    assert F.curves(fig_dir, "normal_only", scores, np.zeros(6, int)) is None
    rows = pd.DataFrame([
        {"dataset": "d", "category": "no_figures", "image_auroc": 0.9, "n_images": 47, "n_anomalous": 21},
        {"dataset": "d", "category": "normal_only", "image_auroc": math.nan, "n_images": 6, "n_anomalous": 0},
        {"dataset": "d", "category": "gone", "image_auroc": 0.8, "n_images": 10, "n_anomalous": 5},
    ])
    runs = [
        RunData("musc", "", rows, {"backbone": "x"}, False, figures={
            ("d", "normal_only"): {k: f"figures/{v}" for k, v in one_class.items()},
            ("d", "gone"): {"qualitative": "figures/deleted.png", "histograms": "../../etc/passwd"},
        }),
        RunData("random_vit", "", None, {}, True),  # nothing materialized yet
    ]
    configured = [("d", "no_figures"), ("d", "normal_only"), ("d", "gone"), ("d", "later"), ("e", "other")]
    index = render_reports(out, runs, None, categories=configured)

    run_text = Page((out / "musc_d.html").read_text()).all_text()
    assert "the labelled images hold only one class" not in run_text
    assert "not yet materialized: musc/category_figures has not been materialized for this category" in run_text
    assert "no ROC / PR curves: none of the 6 images is labelled defective" in run_text
    assert "figure file figures/deleted.png is missing from the report folder" in run_text
    assert "figure path ../../etc/passwd lies outside the report folder" in run_text
    assert "Not yet materialized in this run: later" in run_text

    index_text = " ".join(Page(index.read_text()).all_text().split())
    assert "Not yet materialized: no category of this run has metrics" in index_text  # random_vit
    assert "e: not yet materialized in this run (1 category: other)" in index_text
    assert {p.name for p in out.glob("*.html")} == {"index.html", "musc_d.html", "compare_musc_vs_random_vit.html"}
    assert "not yet materialized in run random_vit" in index.read_text()  # headline cells' reason


def test_html_report_asset_renders_before_any_category_is_materialized(tmp_path, mini_root):
    from conftest import small_settings
    from dagster import AssetKey, DagsterInstance

    from musc_pipeline.definitions import build_definitions
    from musc_pipeline.reports.studies import STUDIES
    from musc_pipeline.settings import BackboneSettings, ProfileSettings

    settings = small_settings(tmp_path, mini_root)
    settings = settings.model_copy(update={"profiles": {
        **settings.profiles, "random_vit": ProfileSettings(backbone=BackboneSettings(name="ViT-B-16", weights="random"))}})
    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=DagsterInstance.ephemeral(), asset_selection=[AssetKey("html_report")])
    assert result.success
    index = Path(settings.reports_dir) / "index.html"
    text = " ".join(Page(index.read_text()).all_text().split())
    assert text.count("Not yet materialized: no category of this run has metrics") == 2
    assert "mini: not yet materialized in this run (1 category: cat1)" in text
    assert 'href="studies.html"' in index.read_text()  # the study pages: "not yet" until study_pages runs
    studies = (index.parent / "studies.html").read_text()
    assert 'href="study_backbones.html"' in studies and (index.parent / "study_backbones.html").is_file()
    assert Page(studies).all_text().count("none yet") == len(STUDIES)
    sections = dict(re.findall(r'<article class="run[^"]*"[^>]*data-profile="([^"]+)">(.*?)</article>',
                               index.read_text(), re.S))
    assert BANNER in sections["random_vit"] and BANNER not in sections["musc"]  # from the settings
