"""Image and mask arrays -> backbone input and S×S ground truth (SPEC §1).

Decoding files is the caller's job; this module takes arrays. Images are resized to S×S
ignoring aspect ratio (CLIP: bicubic, DINO/EfficientNet: bilinear), then normalised with the
backbone's mean/std.

Mask rules (``MASK_RULES``), all giving S×S booleans:

- ``nearest`` (default): nearest-neighbour resize of the binary mask (value > 127).
- ``authors_mvtec``: bilinear resize of mask/255, keep pixels that stay exactly 1 (the
  authors truncate to int: edges erode slightly; their MVTec AD / BTAD rule).
- ``authors_visa``: bilinear resize, keep pixels > 0 (edges dilate slightly; their VisA rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

MASK_RULES = ("nearest", "authors_mvtec", "authors_visa")
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any decoded image (H×W, H×W×1/2/3/4; 8- or 16-bit) -> H×W×3 uint8.

    Grayscale is replicated, alpha dropped, 16-bit scaled to 8-bit.
    """
    a = np.asarray(pixels)
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.size and a.max() > 255):
        a = (a.astype(np.float64) / 257.0).round()
    elif a.dtype.kind == "f":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"not an image array: shape {a.shape}")
    if a.shape[2] in (1, 2):
        a = np.repeat(a[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def image_tensor(
    rgb: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """H×W×3 uint8 -> 3×S×S float32, resized (aspect ignored) and normalised."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    x = TF.resize(x, [size, size], interpolation=_INTERPOLATION[interpolation], antialias=True)
    x = x.float() / 255.0
    return TF.normalize(x, mean=list(mean), std=list(std))


def mask_array(mask: np.ndarray, size: int, rule: str = "nearest") -> np.ndarray:
    """H×W mask (0 = normal, >0 = anomalous; 0/255 or 0/1) -> S×S bool by ``rule``."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use one of {MASK_RULES}")
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    scale = 255.0 if m.max(initial=0) > 1 else 1.0
    x = torch.from_numpy((m.astype(np.float32) / scale)[None, None])
    if rule == "nearest":
        return (F.interpolate((x > 0.5).float(), size=(size, size), mode="nearest")[0, 0] > 0.5).numpy()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    if rule == "authors_mvtec":
        return (y >= 1.0).numpy()
    return (y > 0).numpy()
