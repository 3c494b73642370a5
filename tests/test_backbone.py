"""Backbone registry and stage taps (SPEC §1), on randomly initialised (seeded) networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musc_pipeline.core import registry
from musc_pipeline.core.backbone import build, resolve_activation
from musc_pipeline.core.registry import get_spec


@pytest.fixture(scope="module")
def vit_b16():
    return build(get_spec("ViT-B-16"), 224)


EFF_SPEC = get_spec("efficientnet_lite0")
# CNN taps are resized to the grid of the spec's stride (8 at first, 16 later): pick the input
# size that gives a 28×28 grid either way
EFF_STRIDE = getattr(EFF_SPEC, "grid_stride", 8)
EFF_SIZE = 28 * EFF_STRIDE


@pytest.fixture(scope="module")
def effnet():
    return build(EFF_SPEC, EFF_SIZE)


def _images(b: int, size: int = 224) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


def _capture(modules):
    store, handles = {}, []
    for idx, mod in modules:
        handles.append(mod.register_forward_hook(lambda m, i, o, idx=idx: store.__setitem__(idx, o.detach().clone())))
    return store, handles


def _hooked_forward(forward, modules):
    store, handles = _capture(modules)
    try:
        with torch.no_grad():
            result = forward()
    finally:
        for h in handles:
            h.remove()
    return result, store


# --------------------------------------------------------------------------- ViT-B-16 (open_clip)

VIT_BLOCKS = (2, 5, 8, 11)  # blocks 3, 6, 9, 12 in 1-based counting


@pytest.fixture(scope="module")
def vit_run(vit_b16):
    """One extractor call and one plain forward of the network with hooks on the tap blocks."""
    images = _images(1)
    out = vit_b16(images)
    net = vit_b16.network
    plain, store = _hooked_forward(lambda: net(images), [(k, net.transformer.resblocks[k]) for k in VIT_BLOCKS])
    if not getattr(net.transformer, "batch_first", True):
        store = {k: v.permute(1, 0, 2) for k, v in store.items()}
    return out, plain, store


def test_vit_taps_shapes_and_embedding(vit_b16, vit_run):
    out, plain, _ = vit_run
    assert vit_b16.grid == (14, 14)
    assert len(out.taps) == 4
    for t in out.taps:
        assert t.shape == (1, 14, 14, 768)
    assert out.embedding.shape == (1, 512)
    np.testing.assert_allclose(out.embedding.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    # the projected CLIP image embedding of the same image, normalised
    np.testing.assert_allclose(out.embedding.numpy(), F.normalize(plain, dim=-1).numpy(), atol=1e-5)
    # the four stages are really different tensors
    assert all((out.taps[k] - out.taps[k + 1]).abs().max() > 1e-3 for k in range(3))


def test_vit_taps_are_outputs_of_blocks_3_6_9_12(vit_b16, vit_run):
    out, _, store = vit_run
    assert len(vit_b16.network.transformer.resblocks) == 12
    for tap, k in zip(out.taps, VIT_BLOCKS):
        seq = store[k]
        assert seq.shape == (1, 1 + 196, 768)
        want = seq[:, 1:].reshape(1, 14, 14, 768)  # class token dropped, row-major grid
        np.testing.assert_allclose(tap.numpy(), want.numpy(), rtol=0, atol=1e-5)
    # and not a neighbouring block's (guard against an off-by-one)
    assert (out.taps[0] - store[5][:, 1:].reshape(1, 14, 14, 768)).abs().max() > 1e-2


def test_vit_uses_quick_gelu_at_native_size(vit_b16):
    assert vit_b16.activation == "quick_gelu"
    names = {type(m).__name__ for m in vit_b16.network.modules()}
    assert "QuickGELU" in names


# --------------------------------------------------------------------------- EfficientNet-Lite0

EFF_BLOCKS = (1, 2, 4, 6)


def _to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """Average pooling down, bilinear up, identity at the grid size."""
    if x.shape[-1] > side:
        return F.adaptive_avg_pool2d(x, side)
    if x.shape[-1] < side:
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x


def test_effnet_taps_are_outputs_of_blocks_1_2_4_6(effnet):
    images = _images(2, EFF_SIZE)
    assert effnet.grid == (28, 28)
    net = effnet.network
    feats, store = _hooked_forward(lambda: net.forward_features(images), [(k, net.blocks[k]) for k in EFF_BLOCKS])
    out = effnet(images)
    assert [t.shape for t in out.taps] == [(2, 28, 28, c) for c in (24, 40, 112, 320)]
    # the tapped blocks have strides 4, 8, 16, 32
    assert [store[k].shape[-1] for k in EFF_BLOCKS] == [EFF_SIZE // s for s in (4, 8, 16, 32)]
    want = [_to_grid(store[k], 28) for k in EFF_BLOCKS]
    for tap, w in zip(out.taps, want):
        np.testing.assert_allclose(tap.numpy(), w.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)
    assert out.embedding.shape == (2, 1280)
    np.testing.assert_allclose(out.embedding.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.embedding.numpy(), F.normalize(feats.mean(dim=(2, 3)), dim=-1).numpy(), atol=1e-5)


def test_build_is_seeded(effnet):
    images = _images(1, 64)
    again = build(EFF_SPEC, EFF_SIZE, seed=0)
    other = build(EFF_SPEC, EFF_SIZE, seed=1)
    a, b, c = (fe.network.forward_features(images) for fe in (effnet, again, other))
    np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    assert (a - c).abs().max() > 1e-3


# --------------------------------------------------------------------------- registry


def test_unknown_backbone_names_known_ones():
    with pytest.raises(ValueError) as err:
        get_spec("resnet50")
    msg = str(err.value)
    assert "resnet50" in msg
    for name in ("ViT-L-14-336", "ViT-B-16", "efficientnet_lite0", "dinov2_vitb14"):
        assert name in msg


def test_registry_taps():
    assert get_spec("ViT-L-14-336").taps == (5, 11, 17, 23)
    assert get_spec("ViT-B-16").taps == (2, 5, 8, 11)
    assert get_spec("dinov2_vitl14").taps == (5, 11, 17, 23)
    assert get_spec("dinov2_vitb14").tap_final_norm and not get_spec("dino_vitb16").tap_final_norm
    assert registry.PAPER_BACKBONE == "ViT-L-14-336" and get_spec("ViT-L-14-336").default_size == 518


@pytest.mark.parametrize(
    "name, size, requested, want",
    [
        ("ViT-L-14-336", 518, "auto", "gelu"),
        ("ViT-L-14-336", 336, "auto", "quick_gelu"),
        ("ViT-L-14-336", 518, "quick_gelu", "quick_gelu"),
        ("ViT-L-14-336", 336, "gelu", "gelu"),
        ("ViT-B-16", 224, "auto", "quick_gelu"),
        ("ViT-B-16-plus-240", 240, "auto", "gelu"),  # laion weights: never QuickGELU
        ("dinov2_vitb14", 224, "quick_gelu", "gelu"),
        ("efficientnet_lite0", 224, "auto", "gelu"),
    ],
)
def test_resolve_activation(name, size, requested, want):
    assert resolve_activation(get_spec(name), size, requested) == want


def test_resolve_activation_rejects_unknown():
    with pytest.raises(ValueError, match="activation"):
        resolve_activation(get_spec("ViT-B-16"), 224, "relu")


def test_position_embeddings_resize_like_the_authors():
    """Bicubic, align_corners=False, no antialias; the class token's entry kept; native size untouched."""
    from musc_pipeline.core.backbone import resize_position_embedding

    pos = torch.randn(1 + 14 * 14, 8)
    out = resize_position_embedding(pos, (16, 16))
    assert out.shape == (1 + 16 * 16, 8) and torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(256, 8)
    aa = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1).reshape(256, 8)
    assert torch.equal(out[1:], plain) and not torch.allclose(out[1:], aa, atol=1e-3)  # open_clip 3.3 antialiases
    assert resize_position_embedding(pos, (14, 14)) is pos
    half = resize_position_embedding(pos.half(), (16, 16))  # float16 checkpoints resize in float32
    assert half.dtype == torch.float16 and torch.allclose(half.float(), out, atol=1e-2)


def test_backbone_precision_is_the_authors_autocast_on_cuda_only():
    from musc_pipeline.resources.model import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "float32"
    assert resolve_precision("float16_autocast", cpu) == "float32"  # float32 remains the CPU path
    assert resolve_precision("auto", cuda) == "float16_autocast"
    assert resolve_precision("float32", cuda) == "float32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("bfloat16", cuda)
