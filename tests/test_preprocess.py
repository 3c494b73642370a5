"""Image and mask preprocessing (SPEC §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_pipeline.core import preprocess
from musc_pipeline.core.registry import OPENAI_MEAN, OPENAI_STD


# --------------------------------------------------------------------------- images


def test_grayscale_is_replicated():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = preprocess.to_rgb_uint8(g)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for k in range(3):
        np.testing.assert_array_equal(out[:, :, k], g)
    np.testing.assert_array_equal(preprocess.to_rgb_uint8(g[:, :, None]), out)


def test_grayscale_with_alpha():
    la = np.stack([np.full((2, 2), 90, np.uint8), np.full((2, 2), 255, np.uint8)], axis=-1)
    out = preprocess.to_rgb_uint8(la)
    assert out.shape == (2, 2, 3) and (out == 90).all()


def test_rgba_drops_alpha():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    out = preprocess.to_rgb_uint8(rgba)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_rgb_uint8_unchanged():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.to_rgb_uint8(rgb), rgb)


def test_sixteen_bit_scaled_to_eight_bit():
    a = np.array([[0, 257, 65535], [32896, 1000, 128]], dtype=np.uint16)
    out = preprocess.to_rgb_uint8(a)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    # x / 257, rounded: 0, 1, 255, 128, 3.89 → 4, 0.498 → 0
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 255], [128, 4, 0]])
    # a dark 16-bit image (all values ≤ 255) is still scaled, by dtype
    dark = np.full((2, 2), 200, np.uint16)
    assert (preprocess.to_rgb_uint8(dark) == 1).all()


def test_sixteen_bit_rgb():
    a = np.full((2, 2, 3), 65535, np.uint16)
    a[..., 1] = 0
    out = preprocess.to_rgb_uint8(a)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all()


def test_float_and_bool_images():
    assert (preprocess.to_rgb_uint8(np.ones((2, 2), np.float32)) == 255).all()
    assert (preprocess.to_rgb_uint8(np.array([[True, False]])) == [[255] * 3, [0] * 3]).all()


@pytest.mark.parametrize("shape", [(4,), (2, 2, 5), (1, 2, 2, 3)])
def test_not_an_image_raises(shape):
    with pytest.raises(ValueError, match="not an image"):
        preprocess.to_rgb_uint8(np.zeros(shape, np.uint8))


def test_image_tensor_resizes_and_normalises():
    rgb = np.zeros((10, 30, 3), np.uint8)
    rgb[..., 0] = 255
    x = preprocess.image_tensor(rgb, 16, OPENAI_MEAN, OPENAI_STD)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32  # aspect ratio ignored
    want = [(1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0], -OPENAI_MEAN[1] / OPENAI_STD[1], -OPENAI_MEAN[2] / OPENAI_STD[2]]
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), want, atol=1e-5)


# --------------------------------------------------------------------------- masks


def _block_mask(value: int = 255) -> np.ndarray:
    """4×4 mask with a 2×2 anomalous block at rows/cols 1–2."""
    m = np.zeros((4, 4), np.uint8)
    m[1:3, 1:3] = value
    return m


def _square(lo: int, hi: int, size: int = 8) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[lo : hi + 1, lo : hi + 1] = True
    return out


def test_mask_nearest():
    # ×2 nearest: source row floor(i/2) → output rows/cols 2..5
    out = preprocess.mask_array(_block_mask(), 8, "nearest")
    assert out.dtype == bool and out.shape == (8, 8)
    np.testing.assert_array_equal(out, _square(2, 5))


def test_mask_authors_mvtec_erodes():
    """Bilinear ×2 (align_corners=False) profile along one axis of the block:
    output i samples source i/2 − 1/4 → [0, .25, .75, 1, 1, .75, .25, 0];
    only pixels that stay exactly 1 are kept → rows/cols 3..4 (the edges erode)."""
    out = preprocess.mask_array(_block_mask(), 8, "authors_mvtec")
    np.testing.assert_array_equal(out, _square(3, 4))


def test_mask_authors_visa_dilates():
    # same profile; every pixel > 0 is kept → rows/cols 1..6 (the edges dilate)
    out = preprocess.mask_array(_block_mask(), 8, "authors_visa")
    np.testing.assert_array_equal(out, _square(1, 6))


@pytest.mark.parametrize("rule", preprocess.MASK_RULES)
def test_mask_rules_accept_0_1_masks_and_3_channels(rule):
    a = preprocess.mask_array(_block_mask(255), 8, rule)
    np.testing.assert_array_equal(preprocess.mask_array(_block_mask(1), 8, rule), a)
    np.testing.assert_array_equal(preprocess.mask_array(np.repeat(_block_mask(255)[..., None], 3, -1), 8, rule), a)


@pytest.mark.parametrize("rule", preprocess.MASK_RULES)
def test_empty_mask_stays_empty(rule):
    assert not preprocess.mask_array(np.zeros((5, 7), np.uint8), 8, rule).any()


def test_nearest_threshold_is_above_127():
    m = np.array([[0, 100], [128, 255]], np.uint8)
    out = preprocess.mask_array(m, 2, "nearest")
    np.testing.assert_array_equal(out, [[False, False], [True, True]])


def test_mask_same_size_is_identity_for_all_rules():
    m = (np.random.default_rng(2).uniform(size=(6, 6)) > 0.5).astype(np.uint8) * 255
    for rule in preprocess.MASK_RULES:
        np.testing.assert_array_equal(preprocess.mask_array(m, 6, rule), m > 0)


def test_unknown_mask_rule_raises():
    with pytest.raises(ValueError, match="mask rule"):
        preprocess.mask_array(_block_mask(), 8, "bicubic")


@pytest.mark.parametrize(("size", "interpolation"), [(224, "bicubic"), (518, "bicubic"), (96, "bicubic"), (256, "bilinear")])
def test_image_tensor_is_the_authors_transform(size, interpolation):
    """Bit for bit what the authors feed the network: torchvision's Resize((S, S)) on the PIL
    image, ToTensor, Normalize (their open_clip transform; DINO: bilinear)."""
    from PIL import Image
    from torchvision import transforms

    rgb = np.random.default_rng(size).integers(0, 256, (128, 127, 3), dtype=np.uint8)
    mode = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
    authors = transforms.Compose([transforms.Resize((size, size), interpolation=mode[interpolation]),
                                  transforms.ToTensor(), transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
    want = authors(Image.fromarray(rgb))
    got = preprocess.image_tensor(rgb, size, OPENAI_MEAN, OPENAI_STD, interpolation)
    assert torch.equal(got, want)


def test_authors_mvtec_rule_tests_the_rounded_8_bit_value():
    """PIL rounds the bilinear result to uint8 before the authors' test: a pixel at 254.6/255
    counts as defect (it is stored as 255), which a test on the float value would miss."""
    m = np.zeros((4, 4), np.uint8)
    m[1:3, :] = 255  # a band: PIL's horizontal pass is exact, its vertical pass rounds once
    size = 1200  # ×300: bilinear weights come within 1/510 of 1 next to the block's plateau
    out = preprocess.mask_array(m, size, "authors_mvtec")
    # PIL's upsampling bilinear filter is the align_corners=False triangle filter
    y = torch.nn.functional.interpolate(torch.from_numpy(m / 255.0)[None, None], size=(size, size),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
    assert out[y >= 1.0].all() and (out & (y < 1.0)).sum() >= 1200  # ≥ 254.5 rounds up to 255: kept
    # PIL's fixed-point arithmetic rounds like round(y·255) away from the .5 boundary
    clear = np.abs(y * 255 - 254.5) > 0.01
    np.testing.assert_array_equal(out[clear], (np.round(y * 255) >= 255)[clear])


def test_mask_rule_auto_follows_the_layout():
    assert preprocess.resolve_mask_rule("auto", "mvtec") == "authors_mvtec"
    assert preprocess.resolve_mask_rule("auto", "btad") == "authors_mvtec"
    assert preprocess.resolve_mask_rule("auto", "visa") == "authors_visa"
    assert preprocess.resolve_mask_rule("auto", "mvtec_loco") == "nearest"
    assert preprocess.resolve_mask_rule("nearest", "mvtec") == "nearest"
    with pytest.raises(ValueError, match="mask rule"):
        preprocess.resolve_mask_rule("bicubic", "mvtec")
