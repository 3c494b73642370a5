"""What a run stores (issue #15): no array that is a cheap step from another, Y_l in float16,
sizes recorded per stage, and ``intermediates: drop`` dropping Y_l once a category is scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance
from upath import UPath

from conftest import small_settings
from musc_pipeline.assets.scoring import full_maps
from musc_pipeline.core import maps
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources.storage import ArrayBundle, ArrayIOManager

PER_CATEGORY = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics"]
ARRAY_STAGES = ["backbone_features", "lnamd_features", "msm_scores", "anomaly_maps"]


def _run(settings, names, instance):
    job = build_definitions(settings).resolve_job_def("musc_categories")
    result = job.execute_in_process(partition_key="mini/cat1", instance=instance,
                                    asset_selection=[AssetKey(["musc", n]) for n in names])
    assert result.success
    return result


def _load(settings, asset: str) -> ArrayBundle:
    store = Path(settings.storage)
    return ArrayIOManager(base_path=UPath(store)).load_from_path(
        None, UPath(store / "musc" / asset / "mini" / "cat1.safetensors"))


def _with_intermediates(settings, value: str):
    profile = settings.profiles["musc"].model_copy(update={"intermediates": value})
    return settings.model_copy(update={"profiles": {"musc": profile}})


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """One category materialized with the default ``intermediates: keep``."""
    from conftest import make_category

    tmp = tmp_path_factory.mktemp("kept")
    make_category(tmp / "data", "cat1")
    settings = small_settings(tmp, tmp / "data")
    result = _run(settings, PER_CATEGORY, DagsterInstance.ephemeral())
    return settings, result


def test_only_what_is_not_a_cheap_step_is_stored(kept):
    settings, _ = kept
    features, lnamd_maps, msm_out, amaps = (_load(settings, a) for a in ARRAY_STAGES)
    n = len(features.arrays["class_tokens"])
    assert set(features.arrays) == {"class_tokens"}  # the raw taps are never stored
    assert set(lnamd_maps.arrays) == {"y0", "y1", "y2", "y3"}
    assert all(y.dtype == np.float16 and len(y) == n for y in lnamd_maps.arrays.values())
    grid = tuple(lnamd_maps.arrays["y0"].shape[1:3])
    assert set(amaps.arrays) == {"patch_maps", "image_scores"} and amaps.arrays["patch_maps"].shape == (n, *grid)
    # the S×S maps rebuilt from the stored grid are the ones the image scores were computed from
    size = int(amaps.meta["image_size"])
    direct, image = maps.from_msm_scores(torch.from_numpy(msm_out.arrays["scores"]), grid, size)
    np.testing.assert_array_equal(full_maps(amaps), direct.numpy())
    np.testing.assert_array_equal(amaps.arrays["image_scores"], image.numpy())


def test_stored_bytes_per_image_are_recorded(kept):
    settings, result = kept
    store = Path(settings.storage) / "musc"
    row = pd.read_parquet(store / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
    n = int(row["n_images"])
    meta = {ev.asset_key.path[-1]: ev.materialization.metadata for ev in result.get_asset_materialization_events()}
    for stage in ARRAY_STAGES:
        size = (store / stage / "mini" / "cat1.safetensors").stat().st_size
        assert row[f"stored_{stage}_bytes_per_image"] == pytest.approx(size / n)
        assert meta[stage]["stored_bytes"].value == size
        assert meta[stage]["stored_bytes_per_image"].value == round(size / n)
    assert meta["rscin_scores"]["stored_bytes"].value == (store / "rscin_scores" / "mini" / "cat1.parquet").stat().st_size
    assert row["intermediates"] == "keep"


def test_drop_intermediates_then_recompute_on_demand(kept, tmp_path):
    kept_settings, _ = kept
    settings = _with_intermediates(small_settings(tmp_path, Path(kept_settings.datasets["mini"].root)), "drop")
    instance = DagsterInstance.ephemeral()
    result = _run(settings, PER_CATEGORY, instance)
    dropped = _load(settings, "lnamd_features")
    assert dropped.arrays == {} and "dropped" in dropped.meta and "identity" in dropped.meta
    (observed,) = [ev.event_specific_data.asset_observation for ev in result.get_asset_observation_events()]
    assert observed.asset_key == AssetKey(["musc", "lnamd_features"]) and observed.partition == "mini/cat1"
    assert observed.metadata["freed_bytes"].value > 0
    row, kept_row = (pd.read_parquet(Path(s.storage) / "musc" / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
                     for s in (settings, kept_settings))
    assert row["intermediates"] == "drop"
    assert row["stored_lnamd_features_bytes_per_image"] < kept_row["stored_lnamd_features_bytes_per_image"] / 100
    # same results as the run that kept everything
    np.testing.assert_array_equal(_load(settings, "msm_scores").arrays["scores"],
                                  _load(kept_settings, "msm_scores").arrays["scores"])
    # a re-run of MSM alone finds no stored Y_l and recomputes it: the same scores
    before = _load(settings, "msm_scores").arrays["scores"]
    _run(settings, ["msm_scores"], instance)
    np.testing.assert_array_equal(_load(settings, "msm_scores").arrays["scores"], before)
    assert _load(settings, "lnamd_features").arrays == {}


def test_run_page_facts_list_stored_kilobytes_per_stage(kept):
    from musc_pipeline.assets.summary import run_facts

    settings, _ = kept
    row = pd.read_parquet(Path(settings.storage) / "musc" / "category_metrics" / "mini" / "cat1.parquet")
    facts = run_facts("musc", settings.profiles["musc"], row)
    for stage in ARRAY_STAGES:
        kb = row[f"stored_{stage}_bytes_per_image"].iloc[0] / 1024
        assert facts[f"stored per image: {stage} (KB, mean over categories)"] == f"{kb:.1f}"
    assert facts["intermediates"] == "keep"
