"""Any timm or open_clip backbone by name: spec from the library's own configs, weights through
its own pretrained path (seeded files in a hand-written hub cache, offline), taps and embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hub_cache
from musc_pipeline.core.backbone import build
from musc_pipeline.core.registry import OPENAI_MEAN, get_spec
from musc_pipeline.resources import hub
from musc_pipeline.resources.weights import load_extractor
from musc_pipeline.settings import BackboneSettings


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    hub_cache.point_hub_at(cache, monkeypatch)
    return cache


def _seeded_file(cache, name: str):
    spec = get_spec(name)
    where = hub.hub_files(spec)
    return hub_cache.write_file(cache, where.repo, where.filenames[0], hub_cache.seeded_state(spec, seed=3))


def _image(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_timm_cnn_stages_from_feature_info_and_pooled_embedding(cache):
    spec = get_spec("timm:test_resnet")
    # the model's pretrained config: 160 px, mean 0.5, bilinear; stages layer1..layer4 (strides 4..32)
    assert (spec.family, spec.default_size, spec.mean, spec.interpolation) == ("timm_cnn", 160, (0.5,) * 3, "bilinear")
    assert spec.taps == (1, 2, 3, 4) and spec.arch == "test_resnet"
    path = _seeded_file(cache, "timm:test_resnet")
    assert path.name == "model.safetensors" and "models--timm--test_resnet.r160_in1k" in str(path)
    extractor, identity = load_extractor(BackboneSettings(name="timm:test_resnet"))
    assert identity.weights == str(path) and identity.weights_revision == hub_cache.revision_of("timm/test_resnet.r160_in1k")
    net = extractor.network
    file = hub_cache.seeded_state(spec, seed=3)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in file.items() if not k.startswith("fc."))
    out = extractor(_image(160))
    assert [tuple(t.shape) for t in out.taps] == [(2, 10, 10, c) for c in (32, 48, 192, 96)]  # stride-16 grid
    seen = {}
    hook = net.layer2.register_forward_hook(lambda m, i, o: seen.setdefault("layer2", o))
    with torch.no_grad():
        pooled = net(_image(160))  # num_classes=0: the global-average-pooled feature
    hook.remove()
    torch.testing.assert_close(out.embedding, F.normalize(pooled, dim=-1))
    torch.testing.assert_close(out.taps[1], F.adaptive_avg_pool2d(seen["layer2"], 10).permute(0, 2, 3, 1))


def test_timm_cnn_taps_can_be_named_like_patchcores_layers_2_and_3(cache):
    _seeded_file(cache, "timm:test_resnet")
    extractor, identity = load_extractor(BackboneSettings(name="timm:test_resnet", taps=(2, 3), image_size=128))
    assert identity.taps == "2,3"
    assert [tuple(t.shape) for t in extractor(_image(128)).taps] == [(2, 8, 8, 48), (2, 8, 8, 192)]


def test_timm_vit_evenly_spaced_blocks_and_class_token(cache):
    spec = get_spec("timm:test_vit")
    assert (spec.family, spec.taps, spec.default_size) == ("timm_vit", (0, 2, 3, 5), 160)  # 6 blocks
    _seeded_file(cache, "timm:test_vit")
    extractor, _ = load_extractor(BackboneSettings(name="timm:test_vit"))
    net, images = extractor.network, _image(160)
    out = extractor(images)
    assert [tuple(t.shape) for t in out.taps] == [(2, 10, 10, 64)] * 4
    with torch.no_grad():
        tokens = net.patch_embed(images)
        tokens = net.norm_pre(net._pos_embed(tokens))
        for block in net.blocks[:4]:
            tokens = block(tokens)
        whole = net(images)  # the class token after the final norm (num_classes=0)
    torch.testing.assert_close(out.taps[2], tokens[:, net.num_prefix_tokens:].reshape(2, 10, 10, 64))
    torch.testing.assert_close(out.embedding, F.normalize(whole, dim=-1))  # final norm applied once


def test_open_clip_by_arch_and_tag(cache):
    name = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    spec = get_spec(name)
    assert (spec.arch, spec.pretrained, spec.taps, spec.default_size) == ("ViT-B-32", "laion2b_s34b_b79k", (2, 5, 8, 11), 224)
    assert spec.mean == OPENAI_MEAN and not spec.quick_gelu and get_spec("open_clip:ViT-B-16/openai").quick_gelu
    where = hub.hub_files(spec)
    assert where.repo == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert where.filenames == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    path = _seeded_file(cache, name)
    extractor, identity = load_extractor(BackboneSettings(name=name))
    assert identity.weights == str(path) and identity.activation == "gelu"  # trained without QuickGELU
    out = extractor(_image(224))
    assert [tuple(t.shape) for t in out.taps] == [(2, 7, 7, 768)] * 4 and tuple(out.embedding.shape) == (2, 512)


@pytest.mark.parametrize("name, taps, shapes", [
    ("timm:wide_resnet50_2", (2, 3), [(1, 14, 14, 512), (1, 14, 14, 1024)]),  # PatchCore's layers 2 and 3
    ("timm:vit_small_patch14_reg4_dinov2", None, [(1, 16, 16, 384)] * 4),  # 4 register tokens dropped
])
def test_documented_examples(name, taps, shapes):
    spec = get_spec(name, taps)
    extractor = build(spec, 224)  # random weights: shapes only
    assert [tuple(t.shape) for t in extractor(torch.zeros(1, 3, 224, 224)).taps] == shapes


@pytest.mark.parametrize("name, closest", [
    ("ViT-L-14-33", "ViT-L-14-336"),
    ("timm:wide_resnet50", "wide_resnet50_2.racm_in1k"),
    ("timm:vit_base_patch16_224.dinoo", "vit_base_patch16_224.dino"),
    ("open_clip:ViT-B-23/openai", "ViT-B-32"),
    ("open_clip:ViT-B-32/laion2b", "laion2b_e16"),
])
def test_unknown_names_say_the_closest(name, closest):
    with pytest.raises(ValueError, match="unknown") as err:
        get_spec(name)
    assert closest in str(err.value).split("(closest: ")[1].split(")")[0].split(", "), str(err.value)


def test_bad_taps_and_name_forms_are_refused():
    with pytest.raises(ValueError, match="taps can be chosen for timm: and open_clip: backbones only"):
        get_spec("ViT-B-16", (1, 2))
    with pytest.raises(ValueError, match=r"taps \[2, 5\] must be increasing indices in 0\.\.4"):
        get_spec("timm:test_resnet", (2, 5))
    with pytest.raises(ValueError, match="open_clip:<arch>/<pretrained tag>"):
        BackboneSettings(name="open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="open_clip:<arch>/<pretrained tag>"):
        BackboneSettings(name="torchvision:resnet50")
