"""End-to-end materializations of the Dagster graph on small real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import torch
from dagster import AssetKey, DagsterEventType, DagsterInstance, in_process_executor

from conftest import REPO, small_settings
from musc_pipeline.core import rscin
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources import model
from musc_pipeline.settings import load_settings

PER_CATEGORY = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics"]


def _materialize(defs, names, instance, key="mini/cat1"):
    job = defs.resolve_job_def("musc_categories")
    return job.execute_in_process(partition_key=key, instance=instance,
                                  asset_selection=[AssetKey(["musc", n]) for n in names])


def test_definitions_load_with_demo_partitions():
    defs = build_definitions(load_settings(REPO / "musc.yaml"))
    defs.get_repository_def()  # what `dagster dev` loads: every job at once (names must not clash with assets)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for profile in ("musc", "random_vit"):
        for name in PER_CATEGORY + ["metrics_table", "category_figures"]:
            assert f"{profile}/{name}" in keys
    assert {"results_catalog", "html_report"} <= keys
    parts = graph.get(AssetKey(["musc", "msm_scores"])).partitions_def.get_partition_keys()
    assert parts == ["demo/PA_BDP01_TL", "demo/PA_BRG02_RL", "demo/PA_GLA01_TL"]
    for job in ("musc_categories", "random_vit_categories", "reports"):
        defs.resolve_job_def(job)


def test_materialize_all_then_rerun_only_rscin(tmp_path, mini_root):
    settings = small_settings(tmp_path, mini_root)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    result = _materialize(defs, PER_CATEGORY, instance)
    assert result.success
    store = Path(settings.storage) / "musc"
    feats = store / "backbone_features" / "mini" / "cat1.safetensors"
    metrics_file = store / "category_metrics" / "mini" / "cat1.parquet"
    assert feats.is_file() and metrics_file.is_file()
    first = pd.read_parquet(metrics_file).iloc[0]
    assert first["image_auroc"] > 0.8 and first["pixel_auroc"] > 0.8
    assert first["backbone"] == "efficientnet_lite0" and not first["random_init"]
    checks = result.get_asset_check_evaluations()
    assert all(ev.passed for ev in checks) and all(ev.partition == "mini/cat1" for ev in checks)
    # first run, and a category the paper has no numbers for: those two checks say why they compared nothing
    assert {ev.check_name: ev.description for ev in checks} == {
        "features_shape": None, "metrics_in_unit_interval": None,
        "regression_vs_previous": "Skipped: no previous run of this category in the score history",
        "paper_reference": "Skipped: the paper has no numbers for mini/cat1"}
    # per stage: time per image and peak memory, the GPU peak only where a stage ran on CUDA (none here)
    assert all(first[f"{stage}_ms_per_image"] > 0 for stage in ("features", "msm", "maps"))
    assert first["peak_rss_mb"] > 100 and np.isnan(first["peak_gpu_mb"])
    meta = {ev.asset_key.path[-1]: ev.materialization.metadata for ev in result.get_asset_materialization_events()}
    assert meta["backbone_features"]["batch_size"].value == 16  # CPU_BATCH
    for stage in ("backbone_features", "lnamd_features", "msm_scores", "anomaly_maps"):
        assert meta[stage]["ms_per_image"].value > 0 and meta[stage]["peak_rss_mb"].value > 100
        assert "peak_gpu_mb" not in meta[stage]

    # Only the RsCIN window list changes: only rscin_scores and category_metrics get new code versions.
    settings2 = small_settings(tmp_path, mini_root, rscin_windows=(1, 5))
    defs2 = build_definitions(settings2)
    g1, g2 = defs.resolve_asset_graph(), defs2.resolve_asset_graph()
    changed = {n for n in PER_CATEGORY
               if g1.get(AssetKey(["musc", n])).code_version != g2.get(AssetKey(["musc", n])).code_version}
    assert changed == {"rscin_scores"}

    feats_mtime = feats.stat().st_mtime_ns
    result2 = _materialize(defs2, ["rscin_scores", "category_metrics"], instance)
    assert result2.success
    ran = {e.asset_key.path[-1] for e in result2.get_asset_materialization_events()}
    rerun_checks = {ev.check_name: ev for ev in result2.get_asset_check_evaluations()}
    assert set(rerun_checks) == {"metrics_in_unit_interval", "regression_vs_previous", "paper_reference"}
    assert rerun_checks["regression_vs_previous"].passed and rerun_checks["regression_vs_previous"].partition == "mini/cat1"
    assert rerun_checks["regression_vs_previous"].description is None  # it compared this time
    assert ran == {"rscin_scores", "category_metrics"}
    assert feats.stat().st_mtime_ns == feats_mtime  # features were not recomputed

    scores = pd.read_parquet(store / "rscin_scores" / "mini" / "cat1.parquet")
    assert json.loads(scores["rscin_windows"].iloc[0]) == [1, 5]
    from safetensors.numpy import load_file

    tokens = load_file(str(feats))["class_tokens"]
    expected = rscin.rescore(torch.from_numpy(scores["score_msm"].to_numpy()), torch.from_numpy(tokens), (1, 5))
    np.testing.assert_allclose(scores["score_rscin"], expected.numpy(), atol=1e-12)
    second = pd.read_parquet(metrics_file).iloc[0]
    assert second["previous_image_auroc"] == round(first["image_auroc"], 4)  # as the metadata shows it
    # Re-materializing replaced the partition's rows rather than appending.
    assert len(pd.read_parquet(metrics_file)) == 1 and len(scores) == 10


def test_catalog_views_query_with_sql(tmp_path, mini_root):
    settings = small_settings(tmp_path, mini_root)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    assert _materialize(defs, PER_CATEGORY, instance).success
    catalog_job = defs.resolve_implicit_global_asset_job_def()
    assert catalog_job.execute_in_process(instance=instance, asset_selection=[AssetKey(["results_catalog"])]).success
    con = duckdb.connect(str(Path(settings.storage) / "catalog.duckdb"), read_only=True)
    n, anomalous = con.execute(
        "SELECT count(*), sum(label) FROM rscin_scores WHERE dataset = 'mini' AND category = 'cat1'").fetchone()
    auroc = con.execute("SELECT image_auroc FROM category_metrics").fetchone()[0]
    con.close()
    assert (n, anomalous) == (10, 5)
    assert 0.5 < auroc <= 1.0


def test_cli_materialize_one_partition(tmp_path, mini_root):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(
        f"storage: {tmp_path / 'store'}\nreports_dir: {tmp_path / 'reports'}\n"
        f"datasets:\n  mini: {{root: {mini_root}}}\n"
        "profiles:\n  musc: {backbone: {name: efficientnet_lite0}}\n"
    )
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    dg = Path(sys.executable).parent / "dg"  # the CLI the installed Dagster recommends (README)
    proc = subprocess.run(
        [str(dg), "launch", "--assets", "*musc/category_metrics", "--partition", "mini/cat1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "warning" not in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "store" / "musc" / "category_metrics" / "mini" / "cat1.parquet").is_file()
    con = duckdb.connect(str(tmp_path / "store" / "catalog.duckdb"), read_only=True)
    rows = con.execute("SELECT count(*) FROM rscin_scores").fetchone()[0]
    auroc = con.execute("SELECT image_auroc FROM category_metrics WHERE category = 'cat1'").fetchone()[0]
    con.close()
    assert rows == 10 and 0.5 < auroc <= 1.0
    # the fast path: every step of the CLI's run executed in the one run process (one backbone load)
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        (run,) = instance.get_runs()
        pids = {e.dagster_event.event_specific_data.metadata["pid"].value
                for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
                if e.dagster_event.event_specific_data and "pid" in e.dagster_event.event_specific_data.metadata}
        steps = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)
    assert len(pids) == 1 and len(steps) == 6  # backbone_features and lnamd_features are one step


def test_every_job_runs_in_one_process_and_the_manifest_builds_no_model(tmp_path, mini_root):
    defs = build_definitions(small_settings(tmp_path, mini_root))
    assert defs.resolve_implicit_global_asset_job_def().executor_def is in_process_executor  # Materialize, CLI
    assert defs.resolve_job_def("musc_categories").executor_def is in_process_executor
    model._loaded.cache_clear()
    assert _materialize(defs, ["image_manifest"], DagsterInstance.ephemeral()).success
    assert model._loaded.cache_info().currsize == 0  # weights located, backbone not built


def test_few_shot_modes_through_the_assets(tmp_path, mini_root):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in (10, 11, 12):  # normal images that are not in the test set
        (refs / f"{i}.png").write_bytes((REPO / "data/demo/PA_BDP01_TL/test/good" / f"{i:03d}.png").read_bytes())
    scores = {}
    for mode in ("zero_shot", "few_shot", "musc_plus"):
        settings = small_settings(tmp_path / mode, mini_root, mode=mode, references=str(refs))
        result = _materialize(build_definitions(settings), PER_CATEGORY, DagsterInstance.ephemeral())
        assert result.success
        df = pd.read_parquet(Path(settings.storage) / "musc" / "category_metrics" / "mini" / "cat1.parquet")
        assert df["image_auroc"].iloc[0] > 0.8
        scores[mode] = pd.read_parquet(Path(settings.storage) / "musc" / "rscin_scores" / "mini" / "cat1.parquet")["score_msm"]
    assert not np.allclose(scores["zero_shot"], scores["few_shot"])
    assert not np.allclose(scores["few_shot"], scores["musc_plus"])


def test_figures_and_html_report_assets(tmp_path, mini_root):
    settings = small_settings(tmp_path, mini_root)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    result = _materialize(defs, PER_CATEGORY + ["category_figures"], instance)
    assert result.success
    meta = {ev.asset_key.path[-1]: ev.materialization.metadata for ev in result.get_asset_materialization_events()}
    figure = meta["category_figures"]["figure: qualitative maps"].value  # the figure itself, in the UI
    assert figure.startswith("**Figure: qualitative maps**\n\n![qualitative maps](data:image/png;base64,")
    assert Path(meta["category_figures"]["figure file: qualitative maps"].value).is_file()
    assert meta["anomaly_maps"]["figure: highest-scoring image"].value.startswith("**Figure: image, anomaly map and mask**")
    assert meta["rscin_scores"]["dagster/row_count"].value == 10
    job = defs.resolve_implicit_global_asset_job_def()
    keys = [AssetKey(["musc", "metrics_table"]), AssetKey(["html_report"])]
    assert job.execute_in_process(instance=instance, asset_selection=keys).success
    reports = Path(settings.reports_dir)
    figures = reports / "figures" / "musc" / "mini" / "cat1"
    assert {p.name for p in figures.glob("*.png")} >= {"cat1_qualitative.png", "cat1_histograms.png", "cat1_curves.png"}
    page = (reports / "musc_mini.html").read_text()
    assert "cat1" in page and "figures/musc/mini/cat1/" in page
    assert (reports / "index.html").is_file()
