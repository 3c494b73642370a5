"""The hub paths, rehearsed offline: weights as open_clip and timm download them (tests/hub_cache.py).

With ``HF_HUB_OFFLINE=1`` and the hub cache at the fixture, ``backbone: auto`` must become the
paper's ViT-L-14-336 at 518 px read from open_clip's pretrained config, every DINO/DINOv2 entry
must load through ``timm.create_model(pretrained=True)``, and a broken cache file must fail
naming the file.
"""

from __future__ import annotations

import json

import pytest
import torch
from dagster import DagsterInstance
from safetensors.torch import load_file

import hub_cache
from conftest import make_category
from musc_pipeline.core import registry
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources import hub
from musc_pipeline.resources.weights import WeightsUnavailableError, load_extractor, locate_weights
from musc_pipeline.settings import BackboneSettings, DatasetSettings, ProfileSettings, Settings

OPEN_CLIP = [n for n, s in registry.BACKBONES.items() if s.family == "open_clip"]
TIMM = [n for n, s in registry.BACKBONES.items() if s.family == "timm_vit"]
#: name -> (grid side, channels) of each tap at the default size; embedding size
TAP_SHAPES = {"ViT-B-16": (14, 768, 512), "ViT-B-32": (7, 768, 512), "ViT-B-16-plus-240": (15, 896, 640),
              "dino_vitb16": (14, 768, 768), "dino_vitb8": (28, 768, 768), "dinov2_vitb14": (16, 768, 768),
              "dinov2_vitl14": (16, 1024, 1024)}


@pytest.fixture
def offline(registry_hub, monkeypatch):
    hub_cache.point_hub_at(registry_hub["cache"], monkeypatch)
    return registry_hub


def _sha256(path) -> str:
    """The hub names a blob by its SHA-256 (tests/hub_cache.py computed it while writing)."""
    return path.resolve().name


def _file_tensor(path, key: str) -> torch.Tensor:
    state = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    return state[key].float()


def test_auto_is_the_paper_backbone_read_through_open_clips_pretrained_config(offline):
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    want = offline["ViT-L-14-336"]
    assert download_pretrained(get_pretrained_cfg("ViT-L-14-336", "openai")) == str(want)  # open_clip's own lookup
    assert locate_weights(BackboneSettings(), download=False) == str(want)
    extractor, identity = load_extractor(BackboneSettings(name="auto"))
    assert (identity.backbone, identity.image_size, extractor.grid) == ("ViT-L-14-336", 518, (37, 37))
    assert identity.weights == str(want) and not identity.random_init
    assert identity.weights_sha256 == _sha256(want) and identity.weights_revision == hub_cache.revision_of(
        "timm/vit_large_patch14_clip_336.openai")
    assert identity.activation == "gelu" and identity.taps == "5,11,17,23"
    assert "authors" in identity.pos_embed_resize  # 24×24 -> 37×37 as the authors resize
    conv = extractor.network.conv1.weight
    assert torch.equal(conv, _file_tensor(want, "visual.conv1.weight"))  # the file's weights, not a random init
    assert len(extractor.network.transformer.resblocks) == 24


@pytest.mark.parametrize("name", [n for n in OPEN_CLIP if n != "ViT-L-14-336"])
def test_other_open_clip_backbones_are_found_where_open_clip_looks(offline, name):
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    spec = registry.get_spec(name)
    want = str(offline[name])
    assert download_pretrained(get_pretrained_cfg(spec.arch, spec.pretrained)) == want
    assert locate_weights(BackboneSettings(name=name), download=False) == want
    if name not in TAP_SHAPES:  # ViT-L-14 at 518: the same loading code as the paper's backbone
        return
    extractor, identity = load_extractor(BackboneSettings(name=name))
    assert identity.weights == want and identity.weights_revision == hub_cache.revision_of(hub.hub_files(spec).repo)
    _check_taps(name, extractor)


@pytest.mark.parametrize("name", TIMM)
def test_dino_backbones_load_through_timms_pretrained_path(offline, name):
    spec = registry.get_spec(name)
    want = offline[name]
    extractor, identity = load_extractor(BackboneSettings(name=name))
    assert identity.weights == str(want) and identity.weights_sha256 == _sha256(want)
    assert identity.weights_revision == hub_cache.revision_of(hub.hub_files(spec).repo)
    qkv = extractor.network.blocks[0].attn.qkv.weight
    assert torch.equal(qkv, _file_tensor(want, "blocks.0.attn.qkv.weight"))
    if spec.native_size != spec.default_size:  # DINOv2: timm's filter resized the 37×37 position grid
        assert identity.pos_embed_resize.startswith("timm")
    _check_taps(name, extractor)


def _check_taps(name: str, extractor) -> None:
    side, channels, dim = TAP_SHAPES[name]
    size = extractor.image_size
    out = extractor(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert [tuple(t.shape) for t in out.taps] == [(1, side, side, channels)] * 4
    assert tuple(out.embedding.shape) == (1, dim) and torch.isfinite(out.embedding).all()
    assert all((out.taps[k] - out.taps[k + 1]).abs().max() > 1e-4 for k in range(3))


def test_a_category_runs_through_the_assets_on_hub_weights(offline, tmp_path):
    root = tmp_path / "data"
    make_category(root, "cat", n=2)
    backbone = BackboneSettings(name="dino_vitb16", image_size=112)
    settings = Settings(storage=str(tmp_path / "store"), reports_dir=str(tmp_path / "reports"),
                        datasets={"mini": DatasetSettings(root=str(root))},
                        profiles={"dino": ProfileSettings(backbone=backbone)})
    result = build_definitions(settings).resolve_job_def("dino_categories").execute_in_process(
        partition_key="mini/cat", instance=DagsterInstance.ephemeral())
    assert result.success
    features = tmp_path / "store" / "dino" / "backbone_features" / "mini" / "cat.safetensors"
    from safetensors import safe_open

    with safe_open(str(features), "pt") as fh:
        identity = json.loads(json.loads(fh.metadata()["meta"])["identity"])
    assert identity["weights"] == str(offline["dino_vitb16"]) and identity["image_size"] == 112
    assert identity["weights_revision"] == hub_cache.revision_of("timm/vit_base_patch16_224.dino")
    assert identity["weights_sha256"] == _sha256(offline["dino_vitb16"])
    metrics = tmp_path / "store" / "dino" / "category_metrics" / "mini" / "cat.parquet"
    assert metrics.is_file()


@pytest.fixture
def broken_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    hub_cache.point_hub_at(cache, monkeypatch)
    return cache


def test_a_truncated_paper_checkpoint_is_named_not_replaced_by_the_offline_default(registry_hub, broken_hub):
    good = registry_hub["ViT-L-14-336"]
    blob = broken_hub / "truncated"
    blob.parent.mkdir(parents=True)
    with open(good, "rb") as src, open(blob, "wb") as dst:
        dst.write(src.read(1 << 20))  # the first MiB of a download cut short
    path = hub_cache.link_file(broken_hub, "timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors", blob)
    with pytest.raises(WeightsUnavailableError, match=f"{path}: cannot read checkpoint"):
        load_extractor(BackboneSettings(name="auto"))


def test_wrong_shaped_checkpoints_are_named(registry_hub, broken_hub):
    clip = hub_cache.link_file(broken_hub, "timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors",
                               registry_hub["ViT-B-32"].resolve())  # a ViT-B/32 where ViT-B/16 belongs
    with pytest.raises(WeightsUnavailableError, match=f"(?s){clip}: not an open_clip ViT-B-16 checkpoint.*size mismatch"):
        load_extractor(BackboneSettings(name="ViT-B-16"))
    dino = hub_cache.link_file(broken_hub, "timm/vit_base_patch16_224.dino", "model.safetensors",
                               registry_hub["dinov2_vitl14"].resolve())  # ViT-L/14 where ViT-B/16 belongs
    with pytest.raises(WeightsUnavailableError, match=f"{dino}: timm cannot load it as vit_base_patch16_224.dino"):
        load_extractor(BackboneSettings(name="dino_vitb16"))


def test_missing_hub_weights_name_the_repository_and_files(broken_hub):
    with pytest.raises(WeightsUnavailableError, match=r"timm/vit_base_patch8_224\.dino \(model\.safetensors or "
                                                      r"pytorch_model\.bin\) in the Hugging Face cache " + str(broken_hub)):
        locate_weights(BackboneSettings(name="dino_vitb8"), download=False)


def test_the_plan_says_auto_is_the_paper_backbone_from_the_hub_cache(offline, tmp_path):
    from musc_pipeline import plan

    settings = Settings(storage=str(tmp_path / "store"), profiles={"musc": ProfileSettings()})
    (musc,) = plan.plan(settings)
    assert musc.backbone == "auto -> ViT-L-14-336 @ 518 px (taps 5,11,17,23): its weights are in the hub cache"
    assert musc.weights == f"hub cache {offline['ViT-L-14-336']} (revision " \
                           f"{hub_cache.revision_of('timm/vit_large_patch14_clip_336.openai')})"
    assert musc.cost.source.startswith("measured default")
