"""Image and mask arrays -> backbone input and S×S ground truth (SPEC §1).

Decoding files is the caller's job; this module takes arrays. Images are resized to S×S
ignoring aspect ratio with PIL (CLIP and EfficientNet: bicubic, DINO: bilinear), exactly what
the authors' torchvision ``Resize((S, S))`` does to a PIL image, then scaled to [0, 1] and
normalised with the backbone's mean/std (``ToTensor`` + ``Normalize``).

Mask rules (``MASK_RULES``), all giving S×S booleans:

- ``nearest``: nearest-neighbour resize of the binary mask; for data outside the paper's
  datasets.
- ``authors_mvtec``: the authors' MVTec AD / BTAD rule: PIL bilinear resize of the 0/255 mask
  (which rounds to uint8), keep pixels that stay exactly 255 (they truncate the [0, 1] value to
  int: edges erode slightly).
- ``authors_visa``: the authors' VisA rule: the same resize, keep pixels > 0 (edges dilate).

``mask_rule: auto`` (:func:`resolve_mask_rule`) picks the authors' rule for the layouts of the
paper's datasets (``mvtec``, ``btad``: ``authors_mvtec``; ``visa``: ``authors_visa``) and
``nearest`` for every other layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

MASK_RULES = ("nearest", "authors_mvtec", "authors_visa")
AUTHORS_MASK_RULE = {"mvtec": "authors_mvtec", "btad": "authors_mvtec", "visa": "authors_visa"}
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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
    """H×W×3 uint8 -> 3×S×S float32: PIL resize (aspect ignored, uint8 result), /255, normalised."""
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), _PIL_RESAMPLE[interpolation])
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255.0)  # 3×S×S
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def resize_description(interpolation: str, size: int) -> str:
    """How :func:`image_tensor` resizes, in words: recorded with every run and compared with the authors'."""
    return f"PIL {interpolation} resize of the RGB image to {size}×{size}"


def resolve_mask_rule(rule: str, layout: str) -> str:
    """``auto`` -> the authors' rule for the paper datasets' layouts, else ``nearest``."""
    if rule == "auto":
        return AUTHORS_MASK_RULE.get(layout, "nearest")
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use auto or one of {MASK_RULES}")
    return rule


def mask_array(mask: np.ndarray, size: int, rule: str = "nearest") -> np.ndarray:
    """H×W mask (0 = normal, >0 = anomalous; 0/255 or 0/1) -> S×S bool by ``rule``."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use one of {MASK_RULES}")
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    binary = Image.fromarray(np.where(m > (127 if m.max(initial=0) > 1 else 0), 255, 0).astype(np.uint8))
    if rule == "nearest":
        return np.asarray(binary.resize((size, size), Image.Resampling.NEAREST)) > 127
    resized = np.asarray(binary.resize((size, size), Image.Resampling.BILINEAR))  # uint8, as PIL rounds
    if rule == "authors_mvtec":
        return resized == 255
    return resized > 0
