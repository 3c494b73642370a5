"""LNAMD: Local Neighbourhood Aggregation with Multiple Degrees (paper §3.2, SPEC §2).

For one stage ``l`` the ViT's patch tokens form a map ``F ∈ R^{C×h×w}``. For a degree ``r``:

    Y       = LayerNorm(F)                 over (C, h, w) jointly, no affine
    B_r(Y)  = r×r window mean of Y         zero padding, zeros counted (count_include_pad)
    Z_{l,r} = B_r(Y) / ‖B_r(Y)‖₂           per position

The authors implement step 2 as unfold + adaptive 1-D average pooling from C·r² to C values,
which is exactly this per-channel window mean.

Because ``B_r`` is linear, ``<B_r(Y_i)[m], B_r(Y_j)[n]>`` is the r×r×r×r box filter of the
r = 1 product ``Y_i Y_jᵀ`` over both patch grids; :mod:`msm` uses that to score all degrees
from one matrix product. This module therefore also exposes the two factors separately:
:func:`layer_norm_map` (``Y``) and :func:`window_norms` (``‖B_r(Y)‖``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEGREES = (1, 3, 5)
LAYER_NORM_EPS = 1e-5


def _check_degree(r: int) -> None:
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD degree r must be a positive odd integer, got {r}")


def layer_norm_map(tokens: torch.Tensor) -> torch.Tensor:
    """LayerNorm of each image's whole token map. tokens: N×h×w×C -> N×h×w×C (Y)."""
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be N×h×w×C, got shape {tuple(tokens.shape)}")
    return F.layer_norm(tokens, tokens.shape[1:], eps=LAYER_NORM_EPS)


def window_mean(y: torch.Tensor, r: int) -> torch.Tensor:
    """r×r window mean with zero padding counted in the mean. N×h×w×C -> N×h×w×C (B_r(Y))."""
    _check_degree(r)
    if r == 1:
        return y
    x = y.permute(0, 3, 1, 2)  # N×C×h×w
    x = F.avg_pool2d(x, kernel_size=r, stride=1, padding=r // 2, count_include_pad=True)
    return x.permute(0, 2, 3, 1)


def window_norms(y: torch.Tensor, r: int) -> torch.Tensor:
    """‖B_r(Y)[m]‖₂ per position. N×h×w×C -> N×h×w."""
    return torch.linalg.vector_norm(window_mean(y, r), dim=-1)


def unit_features(y: torch.Tensor, r: int) -> torch.Tensor:
    """Z_r = B_r(Y) / ‖B_r(Y)‖ from layer-normed maps Y: unit vectors. N×h×w×C -> N×h×w×C."""
    return F.normalize(window_mean(y, r), dim=-1)


def aggregate(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """Z_{l,r}: LNAMD of one stage's tokens. tokens: N×h×w×C -> N×h×w×C, unit vectors."""
    return unit_features(layer_norm_map(tokens), r)
