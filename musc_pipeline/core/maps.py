"""Patch scores -> anomaly maps and image scores (SPEC §4).

A(i, m) is the mean of s_{l,r}(i, m) over stages and degrees; reshaped to h×w it is upsampled
bilinearly (align_corners=True, as the authors) to S×S. The image score before re-scoring is
c_i = max over the pixels of the S×S map. Gaussian smoothing is an option, off by default
(the authors' final code applies none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur


def patch_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mean over stages and degrees. scores: N×L×R×P -> N×P."""
    return scores.mean(dim=(1, 2))


def anomaly_maps(
    scores: torch.Tensor, grid: tuple[int, int], size: int, smoothing_sigma: float = 0.0
) -> torch.Tensor:
    """scores: N×P patch scores -> N×S×S float32 maps."""
    n = scores.shape[0]
    x = scores.float().reshape(n, 1, *grid)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    if smoothing_sigma > 0:
        k = 2 * math.ceil(4 * smoothing_sigma) + 1
        x = gaussian_blur(x, kernel_size=[k, k], sigma=[smoothing_sigma, smoothing_sigma])
    return x[:, 0]


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """c_i = max over pixels. N×S×S -> N."""
    return maps.flatten(1).amax(dim=1)


def from_msm_scores(
    scores: torch.Tensor, grid: tuple[int, int], size: int, smoothing_sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSM scores N×L×R×P -> (N×S×S anomaly maps, N image scores c_i): this module in one call."""
    amaps = anomaly_maps(patch_scores(scores), grid, size, smoothing_sigma)
    return amaps, image_scores(amaps)
