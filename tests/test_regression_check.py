"""regression_vs_previous as a paired test against the score history: fires on a real
regression, silent on an identical re-run and on a re-run whose noise changed but not its
expectation; the history keeps the newest runs and is a DuckDB view."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance

from conftest import small_settings
from musc_pipeline.assets.ground_truth import ground_truth

from musc_pipeline.assets.metric_intervals import category_uncertainty
from musc_pipeline.core import maps, metrics
from musc_pipeline.core.preprocess import resolve_mask_rule
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources.score_history import ScoredRun, ScoreHistory
from musc_pipeline.resources.storage import rebuild_catalog
from musc_pipeline.settings import Settings

N, GRID, SIZE = 48, 6, 24


def _truth(rng: np.random.Generator):
    labels = np.r_[np.ones(N // 2, int), np.zeros(N // 2, int)]
    masks = np.zeros((N, SIZE, SIZE), dtype=bool)
    for i in range(N // 2):
        y, x = rng.integers(0, SIZE - 8, 2)
        masks[i, y:y + 8, x:x + 6] = True
    return labels, masks


def _run(run_id: str, labels, masks, signal: float, seed: int, when: str) -> ScoredRun:
    """Grid maps = signal × (defect share of each patch) + noise; the image score their max."""
    rng = np.random.default_rng(seed)
    share = masks.reshape(N, GRID, SIZE // GRID, GRID, SIZE // GRID).mean(axis=(2, 4))
    patch = (signal * share + rng.normal(scale=0.3, size=share.shape)).astype(np.float32)
    full = maps.anomaly_maps(torch.from_numpy(patch).flatten(1), (GRID, GRID), SIZE).numpy()
    scores = full.reshape(N, -1).max(1).astype(np.float64)
    values = metrics.image_metrics(labels, scores).values | metrics.pixel_metrics(masks, full).values
    return ScoredRun(run_id=run_id, materialized_at=when, config="cfg", backbone="bb",
                     image_ids=[f"{i:03d}" for i in range(N)], labels=labels, scores=scores, patch_maps=patch,
                     image_size=SIZE, smoothing_sigma=0.0, metrics=values)


def _check(settings: Settings, previous: ScoredRun, current: ScoredRun, masks):
    category_uncertainty(settings, "musc", "demo/cat", previous, masks, _full(previous))
    return category_uncertainty(settings, "musc", "demo/cat", current, masks, _full(current))


def _full(run: ScoredRun) -> np.ndarray:
    return maps.anomaly_maps(torch.from_numpy(run.patch_maps).flatten(1), (GRID, GRID), SIZE).numpy()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage=str(tmp_path / "store"), intervals={"resamples": 200, "history_runs": 3})


def test_first_run_is_skipped_and_intervals_hold_the_value(settings):
    labels, masks = _truth(np.random.default_rng(0))
    run = _run("r1", labels, masks, 1.0, seed=1, when="2026-01-01")
    columns, regression = category_uncertainty(settings, "musc", "demo/cat", run, masks, _full(run))
    assert regression.description.startswith("Skipped:") and "no previous run" in regression.description
    for k in metrics.METRIC_NAMES:
        assert columns[f"{k}_lo"] <= run.metrics[k] <= columns[f"{k}_hi"]
        assert columns[f"{k}_hi"] - columns[f"{k}_lo"] > 0


def test_identical_rerun_is_silent(settings):
    labels, masks = _truth(np.random.default_rng(0))
    first = _run("r1", labels, masks, 1.0, seed=1, when="2026-01-01")
    again = _run("r2", labels, masks, 1.0, seed=1, when="2026-01-02")
    _, regression = _check(settings, first, again, masks)
    assert regression.passed
    assert all(d["delta"] == 0.0 for d in regression.metadata["deltas"].value.values())


def test_rerun_with_other_noise_of_the_same_expectation_is_silent(settings):
    labels, masks = _truth(np.random.default_rng(0))
    first = _run("r1", labels, masks, 1.0, seed=1, when="2026-01-01")
    other = _run("r2", labels, masks, 1.0, seed=2, when="2026-01-02")  # like a different subset seed
    _, regression = _check(settings, first, other, masks)
    assert regression.passed, regression.metadata["moved"].value
    assert any(d["delta"] != 0.0 for d in regression.metadata["deltas"].value.values())


def test_real_regression_fires(settings):
    labels, masks = _truth(np.random.default_rng(0))
    first = _run("r1", labels, masks, 1.0, seed=1, when="2026-01-01")
    degraded = _run("r2", labels, masks, 0.4, seed=1, when="2026-01-02")  # a weaker backbone: less signal
    _, regression = _check(settings, first, degraded, masks)
    assert not regression.passed
    moved = regression.metadata["moved"].value
    assert {"pixel_auroc", "pixel_ap", "image_auroc"} <= set(moved)
    assert all(m["hi"] < 0 for m in moved.values())


def test_history_keeps_the_newest_runs_and_is_a_catalog_view(settings):
    labels, masks = _truth(np.random.default_rng(0))
    history = ScoreHistory(settings.storage)
    for k in range(5):
        history.append("musc", "demo/cat", _run(f"r{k}", labels, masks, 1.0, seed=k, when=f"2026-01-0{k + 1}"),
                       keep=3)
    stored = history.read("musc", "demo/cat")
    assert sorted(stored["run_id"].unique()) == ["r2", "r3", "r4"] and len(stored) == 3 * N
    latest = history.latest("musc", "demo/cat")
    expected = _run("r4", labels, masks, 1.0, seed=4, when="2026-01-05")
    assert latest.run_id == "r4" and np.array_equal(latest.patch_maps, expected.patch_maps)
    assert latest.metrics == pytest.approx(expected.metrics)
    con = duckdb.connect(str(rebuild_catalog(settings.storage)), read_only=True)
    assert con.execute("SELECT count(DISTINCT run_id), count(*) FROM score_history").fetchone() == (3, 3 * N)
    con.close()


def test_other_images_are_not_paired(settings):
    labels, masks = _truth(np.random.default_rng(0))
    first = _run("r1", labels, masks, 1.0, seed=1, when="2026-01-01")
    second = _run("r2", labels, masks, 1.0, seed=1, when="2026-01-02")
    second = ScoredRun(**{**second.__dict__, "image_ids": [f"x{i}" for i in range(N)]})
    _, regression = _check(settings, first, second, masks)
    assert regression.description.startswith("Skipped:") and "scored other images" in regression.description


def test_materialized_rerun_against_an_injected_better_run_warns(tmp_path, mini_root):
    """A real materialization: intervals in the row; then the history's last run is replaced
    by a perfect one (maps = the masks), and re-materializing category_metrics warns."""
    settings = small_settings(tmp_path, mini_root)
    defs, instance = build_definitions(settings), DagsterInstance.ephemeral()
    job = defs.resolve_job_def("musc_categories")

    def materialize(names):
        return job.execute_in_process(partition_key="mini/cat1", instance=instance,
                                      asset_selection=[AssetKey(["musc", n]) for n in names])

    assert materialize(["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                        "rscin_scores", "category_metrics"]).success
    row = pd.read_parquet(tmp_path / "store" / "musc" / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
    assert row["pixel_auroc_lo"] < row["pixel_auroc"] < row["pixel_auroc_hi"] and row["intervals_ms_per_image"] > 0
    history = ScoreHistory(settings.storage)
    run = history.latest("musc", "mini/cat1")
    manifest = pd.read_parquet(tmp_path / "store" / "musc" / "image_manifest" / "mini" / "cat1.parquet")
    masks = ground_truth(manifest, run.image_size, resolve_mask_rule("auto", "mvtec"))
    share = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], run.patch_maps.shape[1:])
    perfect = ScoredRun(**{**run.__dict__, "run_id": "injected", "materialized_at": "9999", "scores": run.labels * 10.0,
                           "patch_maps": share[:, 0].numpy(), "metrics": {}})
    history.append("musc", "mini/cat1", perfect, keep=3)
    second = materialize(["category_metrics"])
    regression = {ev.check_name: ev for ev in second.get_asset_check_evaluations()}["regression_vs_previous"]
    assert not regression.passed and "injected" in regression.metadata["compared_with"].value


def test_interval_settings_version_the_metrics_only():
    from musc_pipeline.assets.context import code_versions
    from musc_pipeline.settings import IntervalSettings, ProfileSettings

    base = code_versions(ProfileSettings())
    more = code_versions(ProfileSettings(), intervals=IntervalSettings(resamples=500))
    looser = code_versions(ProfileSettings(), intervals=IntervalSettings(min_effect=0.05, history_runs=9))
    assert {k for k in base if base[k] != more[k]} == {"metrics"} and looser == base
