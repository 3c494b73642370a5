"""Ablation studies (issue #12): re-aggregation equals fresh runs, the Dagster assets and jobs,
the ``ablation_results`` view, and the study pages in headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance

from conftest import DEMO, make_category
from musc_pipeline import run_studies
from musc_pipeline.core import ablation, auroc, lnamd, maps, metrics, msm, reaggregate_kernel, rscin, subsets
from musc_pipeline.definitions import build_definitions
from musc_pipeline.reports.studies import STUDIES, page_name
from musc_pipeline.settings import BackboneSettings, DatasetSettings, ProfileSettings, Settings, StudySettings
from test_reports import dump_dom

TOL = 1e-6
PIPELINE = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps", "rscin_scores",
            "category_metrics"]


def _maps(n: int = 9, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [lnamd.layer_norm_map(torch.randn(n, 5, 5, 16, generator=g)) for _ in range(2)]


@pytest.mark.parametrize("s", [1, 2])
def test_reaggregated_intervals_equal_fresh_msm_runs(s):
    ys = _maps()
    groups = subsets.divide(["good"] * 5 + ["bad"] * 4, s)
    sims, pool = ablation.sorted_similarities(ys, groups, (1, 3, 5))
    assert sims.shape == (9, 2, 3, 25, max(len(g) for g in groups) - 1)
    chosen = {k: ablation.PERCENTAGES[k] for k in ("10%", "50%", "100%")} | {
        k: ablation.INTERVAL_STARTS[k] for k in ("[5%, 35%]", "[25%, 55%]")}
    got = ablation.reaggregate(sims, pool, chosen)  # one pass, overlapping intervals
    for name, reduction in chosen.items():
        fresh = msm.score_stages(ys, groups, (1, 3, 5), reduction.interval)
        assert torch.allclose(got[name], fresh, rtol=0, atol=TOL), name


@pytest.mark.parametrize("threads", [1, 2])
def test_reaggregation_kernel_gives_the_torch_path_s_bits_in_any_chunk_of_images(monkeypatch, threads):
    ys = _maps(n=7)
    sims, pool = ablation.sorted_similarities(ys, [np.arange(4), np.arange(4, 7)], (1, 3))  # pools of 3 and 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr(reaggregate_kernel, "MIN_PART_ROWS", 100)  # 700 rows: one part a thread
    try:
        kernel = ablation.reaggregate(sims, pool, ablation.PERCENTAGES | ablation.MSM_VARIANTS)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(reaggregate_kernel, "load", lambda: None)  # no C compiler: torch operations
    for chunk in (1, reaggregate_kernel.CHUNK_BYTES):  # one image a chunk; all at once
        monkeypatch.setattr(reaggregate_kernel, "CHUNK_BYTES", chunk)
        for name, scores in ablation.reaggregate(sims, pool, ablation.PERCENTAGES | ablation.MSM_VARIANTS).items():
            assert torch.equal(scores, kernel[name]), (chunk, name)


def test_msm_variants_follow_their_definition():
    """Tab. 5: min / max / mean over all N − 1 distances or over the lowest 30 %."""
    ys = _maps(n=11)
    got = ablation.reaggregate(*ablation.sorted_similarities(ys, [np.arange(11)], (1,)), ablation.MSM_VARIANTS)
    sim = msm.max_similarities(ys[0], None, (1,))[0]  # N×P×N, self −inf
    dist = torch.sqrt(torch.clamp(2 - 2 * sim.double(), min=0)).sort(dim=-1).values[..., :10]  # ascending, self dropped
    k = msm.interval_slice(10, (0, 0.3)).stop  # 3 lowest
    expected = {"(a) min": dist[..., 0], "(b) max": dist[..., -1], "(c) mean": dist.mean(-1),
                "(d) 30% + min": dist[..., 0], "(e) 30% + max": dist[..., k - 1], "(f) 30% + mean": dist[..., :k].mean(-1)}
    for name in ablation.MSM_VARIANTS:
        assert torch.allclose(got[name][:, 0, 0].double(), expected[name], atol=TOL), name


@pytest.mark.parametrize("kernel", [True, False])  # the C merge; NumPy's searches (no compiler)
@pytest.mark.parametrize("shape, threads", [((3, 16, 16), 1), ((3, 1024, 1024), 3)])  # one part; sorted in threads
def test_pixel_auroc_by_ranks_equals_sklearn_with_ties(monkeypatch, shape, threads, kernel):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    masks = rng.random(shape) < 0.2
    levels = rng.integers(0, 50, size=masks.shape) + 10 * masks  # defects higher, many ties within and across classes
    amaps = levels.astype(np.float32) / 7
    expected = roc_auc_score(masks.ravel(), amaps.ravel().astype(np.float64))
    assert 0.6 < expected < 0.95
    if kernel:
        monkeypatch.setattr(auroc, "PART_VALUES", 2**20 // 3)  # 10 parts over 3 threads
    else:
        monkeypatch.setattr(auroc, "load", lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert abs(auroc.pixel_auroc(masks, amaps) - expected) <= 1e-12
        assert abs(auroc.pixel_auroc(masks, amaps.astype(np.float64)) - expected) <= 1e-12  # NumPy's path
        assert np.isnan(auroc.pixel_auroc(np.zeros_like(masks), amaps))  # one class: undefined
        assert np.isnan(auroc.pixel_auroc(np.ones_like(masks), amaps))
    finally:
        torch.set_num_threads(before)


def test_degree_sets_and_rscin_settings():
    sets = ablation.degree_sets((1, 3, 5), (7, 9))
    assert list(sets) == ["{1}", "{3}", "{5}", "{1, 3}", "{1, 5}", "{3, 5}", "{1, 3, 5}", "{1, 3, 5, 7}", "{1, 3, 5, 7, 9}"]
    assert ablation.rscin_settings((1, 8, 9)) == {
        "w/o RsCIN": None, "single window {8}": (8,), "single window {9}": (9,), "full window (k = N)": (),
        "multi-window {8, 9} (paper's text)": (8, 9), "multi-window {1, 8, 9} (default)": (1, 8, 9)}
    with pytest.raises(ValueError, match=r"degrees \[7\] were not computed"):
        ablation.select_degrees(torch.zeros(2, 1, 3, 4), (1, 3, 5), (1, 7))


# --------------------------------------------------------------------------- the Dagster assets


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """One tiny category through the pipeline and every study, then the study pages."""
    tmp = tmp_path_factory.mktemp("studies")
    root = tmp / "data"
    make_category(root, "cat1", n=4)
    train = root / "cat1" / "train" / "good"  # few-shot references: normal images not in test/
    train.mkdir(parents=True)
    for i in range(10, 18):
        shutil.copy(DEMO / "PA_BDP01_TL" / "test" / "good" / f"{i:03d}.png", train / f"{i:03d}.png")
    imported = tmp / "other_method.parquet"
    paths = sorted(str(p) for p in (root / "cat1" / "test").rglob("*.png"))
    pd.DataFrame({"path": paths, "score": np.random.default_rng(0).random(len(paths))}).to_parquet(imported)
    settings = Settings(
        storage=str(tmp / "store"), reports_dir=str(tmp / "reports"),
        datasets={"mini": DatasetSettings(root=str(root))},
        profiles={"musc": ProfileSettings(backbone=BackboneSettings(name="efficientnet_lite0", image_size=224))},
        studies=StudySettings(imported_scores={"other": str(imported)}),
    )
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    assert defs.resolve_job_def("musc_categories").execute_in_process(
        partition_key="mini/cat1", instance=instance,
        asset_selection=[AssetKey(["musc", n]) for n in PIPELINE]).success
    result = defs.resolve_job_def("studies").execute_in_process(partition_key="mini/cat1", instance=instance)
    assert result.success
    assert defs.resolve_job_def("study_report").execute_in_process(instance=instance).success
    return settings, result


def _table(settings: Settings, study: str) -> pd.DataFrame:
    return pd.read_parquet(Path(settings.storage) / "musc" / f"study_{study}" / "mini" / "cat1.parquet")


def _stored(settings: Settings, asset: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(settings.storage) / "musc" / asset / "mini" / "cat1.safetensors"))


def _fresh(settings, degrees, interval, s=1, windows=(1, 2, 3)) -> dict[str, float]:
    """A direct recomputation: MSM from the LNAMD maps, maps, RsCIN, metrics."""
    from musc_pipeline.assets.ground_truth import ground_truth

    ys = [torch.from_numpy(a).float() for _, a in sorted(_stored(settings, "lnamd_features").items())]
    tokens = torch.from_numpy(_stored(settings, "backbone_features")["class_tokens"])
    manifest = pd.read_parquet(Path(settings.storage) / "musc" / "image_manifest" / "mini" / "cat1.parquet")
    scores = msm.score_stages(ys, subsets.divide(list(manifest["defect_type"]), s), degrees, interval)
    amaps, c = maps.from_msm_scores(scores, (ys[0].shape[1], ys[0].shape[2]), 224)
    labels = manifest["label"].to_numpy(int)
    values = metrics.image_metrics(labels, rscin.rescore(c, tokens, windows).numpy()).values
    px = metrics.pixel_metrics(ground_truth(manifest, 224, "authors_mvtec"), amaps.numpy()).values
    return values | {"pixel_auroc": px["pixel_auroc"]}


def _values(df: pd.DataFrame, setting: str) -> dict[str, float]:
    part = df[df["setting"] == setting]
    assert len(part), f"no rows for {setting!r}: {sorted(df['setting'].unique())}"
    return dict(zip(part["metric"], part["value"]))


@pytest.mark.parametrize("study, setting, degrees, interval, s", [
    ("percentage", "50%", (1, 3, 5), (0.0, 0.5), 1),
    ("interval_start", "[10%, 40%]", (1, 3, 5), (0.1, 0.4), 1),
    ("msm_variants", "(c) mean", (1, 3, 5), (0.0, 1.0), 1),
    ("degrees", "{1, 5}", (1, 5), (0.0, 0.3), 1),
    ("degrees", "{1, 3, 5, 7, 9}", (1, 3, 5, 7, 9), (0.0, 0.3), 1),
    ("subsets", "s = 3", (1, 3, 5), (0.0, 0.3), 3),
])
def test_study_numbers_equal_a_direct_recomputation(studied, study, setting, degrees, interval, s):
    settings, _ = studied
    got, fresh = _values(_table(settings, study), setting), _fresh(settings, degrees, interval, s)
    for metric, value in fresh.items():
        assert abs(got[metric] - value) <= TOL, (metric, got[metric], value)


def test_rscin_studies_equal_a_direct_rescoring(studied):
    settings, _ = studied
    scores = pd.read_parquet(Path(settings.storage) / "musc" / "rscin_scores" / "mini" / "cat1.parquet")
    tokens = torch.from_numpy(_stored(settings, "backbone_features")["class_tokens"])
    labels = scores["label"].to_numpy(int)
    c = torch.from_numpy(scores["score_msm"].to_numpy(copy=True))
    table = _table(settings, "rscin")
    for setting, windows in [("single window {2}", (2,)), ("full window (k = N)", (len(c),)),
                             ("multi-window {1, 2, 3} (default)", (1, 2, 3))]:
        expected = metrics.image_metrics(labels, rscin.rescore(c, tokens, windows).numpy()).values
        got = _values(table, setting)
        assert all(abs(got[k] - v) <= TOL for k, v in expected.items()), setting
    assert _values(table, "w/o RsCIN")["image_auroc"] == pytest.approx(
        metrics.image_metrics(labels, c.numpy()).values["image_auroc"], abs=TOL)
    stored = scores["score_rscin"].to_numpy()  # the pipeline's own RsCIN = the default setting
    assert _values(table, "multi-window {1, 2, 3} (default)")["image_auroc"] == pytest.approx(
        metrics.image_metrics(labels, stored).values["image_auroc"], abs=TOL)
    plugin = _table(settings, "rscin_plugin")
    imported = pd.read_parquet(settings.studies.imported_scores["other"]).set_index("path").loc[scores["path"], "score"]
    expected = metrics.image_metrics(labels, rscin.rescore(torch.from_numpy(imported.to_numpy(copy=True)), tokens, (1, 2, 3)).numpy())
    assert _values(plugin, "other: w RsCIN")["image_auroc"] == pytest.approx(expected.values["image_auroc"], abs=TOL)
    assert set(plugin["setting"]) == {"musc (MSM image score): w/o RsCIN", "musc (MSM image score): w RsCIN",
                                      "other: w/o RsCIN", "other: w RsCIN"}


def test_ablation_results_view_and_metadata(studied):
    settings, result = studied
    con = duckdb.connect(str(Path(settings.storage) / "catalog.duckdb"), read_only=True)
    try:
        got = dict(con.execute("SELECT study, count(DISTINCT setting) FROM ablation_results GROUP BY study").fetchall())
    finally:
        con.close()
    assert got == {"degrees": 9, "msm_variants": 6, "percentage": 10, "interval_start": 6, "rscin": 6, "rscin_plugin": 4,
                   "subsets": 3, "fewshot": 9, "backbones": 1}
    issue, every = (run_studies.sweep_timing(Path(settings.storage), studies) for studies in run_studies.SWEEPS.values())
    assert list(issue["profile"]) == list(every["profile"]) == ["musc"]  # what `make studies` prints
    assert 0 < issue["sweep_s"][0] < every["sweep_s"][0] and 0 < issue["sweep_over_msm"][0] < issue["with_metrics_over_msm"][0]
    materializations = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    recomputed = {m.asset_key.path[-1]: m.metadata.get("recomputed") for m in materializations}
    assert "msm_scores_extra_degrees" in recomputed["study_degrees"].value
    assert recomputed["study_percentage"].value.startswith("nothing")
    assert recomputed["study_backbones"].value == "nothing: read the category_metrics of musc"
    assert recomputed["study_interval_start"].value.endswith("one pass shared by msm_variants, percentage, interval_start")
    tables = {m.asset_key.path[-1]: m.metadata["results"].value for m in materializations if "results" in m.metadata}
    for study, settings_n in (("study_degrees", 9), ("study_rscin", 6)):  # one row per setting, none all-NaN
        rows = tables[study].splitlines()[2:]
        assert len(rows) == settings_n, tables[study]
        assert not [r for r in rows if all(c.strip() in ("nan", "") for c in r.strip("|").split("|")[1:])]
    subsets_table = _table(settings, "subsets")
    timing = subsets_table[subsets_table["metric"].isin(["msm_ms_per_image", "peak_rss_mb"])]
    assert len(timing) == 6 and (timing["value"] > 0).all()
    assert _values(subsets_table, "s = 3")["subset_max"] == 4  # 8 images: 4, 2, 2 (types dealt in runs of 3)


def test_a_study_job_runs_its_own_study_of_the_shared_reaggregation(studied):
    """study_percentage selects one output of the MSM re-aggregation multi-asset: only it is made."""
    settings, _ = studied
    before = _table(settings, "percentage")
    result = build_definitions(settings).resolve_job_def("study_percentage").execute_in_process(
        partition_key="mini/cat1", instance=DagsterInstance.ephemeral())
    made = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(made) == {"msm_similarities", "study_percentage"}
    assert made["study_percentage"]["recomputed"].value.endswith("one pass shared by percentage")
    after = _table(settings, "percentage")
    kept = ~after["metric"].str.endswith("_s")  # timings differ from run to run, results do not
    assert after[kept].reset_index(drop=True).equals(before[~before["metric"].str.endswith("_s")].reset_index(drop=True))


#: Opened in Chromium (one page of each kind: a table, a table with a plot, the transposed backbones
#: table, the listing); every page is also checked in its source (one template renders them all).
IN_CHROMIUM = ("msm_variants", "subsets", "backbones")


def test_study_pages_open_in_chromium_with_tables_and_plots(studied, tmp_path):
    settings, _ = studied
    reports = Path(settings.reports_dir)
    listing = dump_dom(tmp_path, reports / "studies.html")
    for study in STUDIES:
        assert f'href="{page_name(study.name)}"' in listing, study.name
        page = reports / page_name(study.name)
        dom = dump_dom(tmp_path, page) if study.name in IN_CHROMIUM else page.read_text()
        assert study.title in dom and 'class="metrics study"' in dom, study.name
        heading = "Mean over categories on" if study.name == "backbones" else "Profile <code>musc</code> on"
        assert f"{heading} <code>mini</code>" in dom, study.name
        if study.plot_x:
            png = reports / f"study_{study.name}.png"
            assert png.is_file() and png.stat().st_size > 5_000 and f'src="{png.name}"' in dom
        if study.name == "msm_variants":
            assert "(f) 30% + mean" in dom and "The paper has no numbers" in dom  # mini is not a paper dataset
        if study.name == "backbones":
            assert "<th class=\"metric\">efficientnet_lite0 @ 224</th>" in dom and "Pixel PRO" in dom


def test_fewshot_equals_a_direct_run_with_the_same_references(studied):
    """MuSc k = 2 and MuSc+ k = 4 (one embedding of the references serves both)."""
    from musc_pipeline.assets.ground_truth import ground_truth
    from musc_pipeline.assets.study_runs import reference_images
    from musc_pipeline.resources.backbone import ModelResource
    from musc_pipeline.resources.datasets import read_image

    settings, _ = studied
    refs = reference_images(settings.datasets["mini"].root, "cat1", 42, 8)[:4]
    assert len(refs) == 4 and all("train" in str(f) for f in refs)
    emb = ModelResource().embed(settings.profiles["musc"].backbone, (read_image(f) for f in refs), len(refs))
    ref_maps = [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps]
    ys = [torch.from_numpy(a).float() for _, a in sorted(_stored(settings, "lnamd_features").items())]
    manifest = pd.read_parquet(Path(settings.storage) / "musc" / "image_manifest" / "mini" / "cat1.parquet")
    tokens = torch.from_numpy(_stored(settings, "backbone_features")["class_tokens"])
    truth = ground_truth(manifest, 224, "authors_mvtec")
    table = _table(settings, "fewshot")
    for setting, mode, k in [("MuSc k = 2", "few_shot", 2), ("MuSc+ k = 4", "musc_plus", 4)]:
        scores = msm.score_stages(ys, [np.arange(len(manifest))], (1, 3, 5), references=[r[:k] for r in ref_maps],
                                  mode=mode)
        amaps, c = maps.from_msm_scores(scores, (ys[0].shape[1], ys[0].shape[2]), 224)
        expected = metrics.image_metrics(manifest["label"].to_numpy(int), rscin.rescore(c, tokens, (1, 2, 3)).numpy()).values
        expected["pixel_auroc"] = metrics.pixel_metrics(truth, amaps.numpy()).values["pixel_auroc"]
        got = _values(table, setting)
        for metric, value in expected.items():
            assert abs(got[metric] - value) <= TOL, (setting, metric, got[metric], value)


def test_backbones_study_tabulates_each_named_profiles_category_metrics(studied, tmp_path):
    """Two profiles (backbone × size), named in reverse order: one column each holding what their
    category_metrics rows hold, nothing recomputed. The rows: the studied category's real musc
    row, and a copy of it as another backbone × size with other values."""
    from musc_pipeline.assets.study_backbones import BACKBONE_METRICS, BACKBONES_KEY
    from musc_pipeline.reports.studies import render_study_pages

    settings, _ = studied
    musc = pd.read_parquet(Path(settings.storage) / "musc" / "category_metrics" / "mini" / "cat1.parquet")
    rand = musc.assign(profile="rand", random_init=True, image_size=160, image_auroc=0.5, pixel_pro=0.25,
                       msm_ms_per_image=3 * musc["msm_ms_per_image"])
    store = tmp_path / "store"
    for name, row in (("musc", musc), ("rand", rand)):
        (store / name / "category_metrics" / "mini").mkdir(parents=True)
        row.to_parquet(store / name / "category_metrics" / "mini" / "cat1.parquet")
    two = settings.model_copy(update={
        "storage": str(store), "reports_dir": str(tmp_path / "reports"),
        "profiles": {"musc": settings.profiles["musc"], "rand": ProfileSettings(
            backbone=BackboneSettings(name="efficientnet_lite0", weights="random", image_size=160))},
        "studies": StudySettings(backbone_profiles=("rand", "musc"))})
    result = build_definitions(two).resolve_job_def("study_backbones").execute_in_process(
        partition_key="mini/cat1", instance=DagsterInstance.ephemeral())
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [BACKBONES_KEY]  # no stage ran

    table = pd.read_parquet(store / "studies" / "study_backbones" / "mini" / "cat1.parquet")
    columns = {"rand": "efficientnet_lite0 (random weights) @ 160", "musc": "efficientnet_lite0 @ 224"}
    assert list(dict.fromkeys(table["setting"])) == list(columns.values())
    for (profile, setting), row in zip(columns.items(), (rand, musc)):
        got = table[table["setting"] == setting]
        assert set(got["profile"]) == {profile} and list(got["metric"]) == list(BACKBONE_METRICS)
        for metric, value in zip(got["metric"], got["value"]):
            assert value == pytest.approx(row[metric].item(), nan_ok=True), (setting, metric)
    assert musc["msm_ms_per_image"].item() > 0 and musc["peak_rss_mb"].item() > 0  # the real row is timed

    render_study_pages(tmp_path / "reports", table)
    html = (tmp_path / "reports" / page_name("backbones")).read_text()
    assert html.index(columns["rand"]) < html.index(columns["musc"])
    assert "features ms / image" in html and "peak RSS MB" in html


def test_backbone_profiles_must_name_profiles():
    with pytest.raises(ValueError, match=r"studies.backbone_profiles names \['nope'\]"):
        Settings(profiles={"musc": ProfileSettings()}, studies=StudySettings(backbone_profiles=("nope",)))
