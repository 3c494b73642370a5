"""SNAMD: Similarity Neighbourhood Aggregation with Multiple Degrees (MuSc-V2, 2-D part).

MuSc-V2 (Li, Xue, Zhou, TPAMI 2026, arXiv 2511.10047) replaces LNAMD's plain r×r window mean
by *similarity-weighted pooling* (SWPooling): a neighbour counts in proportion to how similar
it is to the window's centre, so a small defect is not averaged away by the normal texture
around it and a noisy neighbour does not leak into a normal patch. For one stage map
``Y ∈ R^{h×w×C}`` (here the layer-normed map of :func:`lnamd.layer_norm_map`), position ``m``
and degree ``r``::

    w_{m,n}   = exp(−‖Y[n] − Y[m]‖₂)                      n in the r×r window W_r(m)
    Ŷ_r[m]    = Σ_{n∈W_r(m)} w_{m,n} Y[n] / Σ_{n∈W_r(m)} w_{m,n}
    Z_l[m]    = mean_{r∈R} Ŷ_r[m] / ‖mean_{r∈R} Ŷ_r[m]‖₂   one unit vector per stage

Details taken from the authors' released code (HUST-SLOW/MuSc-V2, MIT, ``models/modules/
_SNAMD.py``, read and re-implemented here from the formulas above, not copied):

- windows are cut from one r_max×r_max unfold with zero padding of (r_max − 1)/2: a position
  outside the map is a zero feature Y[n] = 0 whose weight exp(−‖Y[m]‖) stays in the
  denominator (it pulls the pooled feature towards 0 near the border, as LNAMD's counted
  zeros do); the r×r windows are the centred sub-windows of the r_max one;
- the degrees are averaged *per stage* before the L2 normalisation, so MSM scores one
  feature set per stage (not one per stage and degree as with LNAMD): a third of the
  products of LNAMD's per-degree MSM for R = {1, 3, 5}.

One choice of ours: their 2-D backbone (DINO) hands over tokens that passed the ViT's final
LayerNorm; we pool the map-wise LayerNorm Y_l that LNAMD and the ``lnamd_features`` asset
already use, so the weights see features on one scale whatever the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from musc_pipeline.core import lnamd, msm

#: Images pooled at once (bounds the r_max²-fold working set of one stage).
CHUNK = 16


def _check_degrees(degrees: Sequence[int]) -> tuple[int, ...]:
    degrees = tuple(int(r) for r in degrees)
    if not degrees or any(r < 1 or r % 2 == 0 for r in degrees):
        raise ValueError(f"SNAMD degrees must be positive odd integers, got {degrees}")
    return degrees


def _pool_chunk(y: torch.Tensor, degrees: tuple[int, ...]) -> torch.Tensor:
    """mean_r Ŷ_r of a few images. y: n×h×w×C -> n×h×w×C (not normalised)."""
    half = max(degrees) // 2
    x = y.permute(0, 3, 1, 2)  # n×C×h×w
    n, c, h, w = x.shape
    padded = F.pad(x, (half, half, half, half))  # zero features outside the map
    # Ring o holds the neighbours at Chebyshev distance o from the centre: W_r = rings 0..r//2.
    ring_num = [torch.zeros_like(x) for _ in range(half + 1)]  # Σ w·Y[n]   n×C×h×w
    ring_den = [x.new_zeros(n, 1, h, w) for _ in range(half + 1)]  # Σ w    n×1×h×w
    for dy in range(2 * half + 1):
        for dx in range(2 * half + 1):
            o = max(abs(dy - half), abs(dx - half))
            neighbour = padded[:, :, dy : dy + h, dx : dx + w]
            weight = torch.exp(-torch.linalg.vector_norm(neighbour - x, dim=1, keepdim=True))
            ring_num[o] += weight * neighbour
            ring_den[o] += weight
    out = torch.zeros_like(x)
    num, den = torch.zeros_like(x), x.new_zeros(n, 1, h, w)
    for o in range(half + 1):
        num, den = num + ring_num[o], den + ring_den[o]
        if 2 * o + 1 in degrees:
            out += num / den
    return (out / len(degrees)).permute(0, 2, 3, 1)


def aggregate(y: torch.Tensor, degrees: Sequence[int] = lnamd.DEGREES) -> torch.Tensor:
    """Z_l of one stage. y: N×h×w×C layer-normed map -> N×h×w×C unit vectors (float32)."""
    degrees = _check_degrees(degrees)
    if y.ndim != 4:
        raise ValueError(f"y must be N×h×w×C, got shape {tuple(y.shape)}")
    y = y.float()
    pooled = torch.cat([_pool_chunk(y[s : s + CHUNK], degrees) for s in range(0, len(y), CHUNK)])
    return F.normalize(pooled, dim=-1)


def score_stages(
    stage_maps: Sequence[torch.Tensor],
    groups: Sequence[Sequence[int]],
    degrees: Sequence[int] = lnamd.DEGREES,
    interval: msm.Interval | str = msm.PAPER_INTERVAL,
    *,
    references: Sequence[torch.Tensor] | None = None,
    **msm_options,
) -> torch.Tensor:
    """MSM on SNAMD features: every stage, each subset on its own. -> N×L×1×P float32.

    stage_maps (and references, for the few-shot modes): L tensors N×h×w×C of layer-normed
    maps Y_l. Each stage is aggregated here and handed to :func:`msm.score_stages` as unit
    features with the single degree 1 (whose window mean is the identity), so MSM's
    blocking, precision and subsets apply unchanged. The degree axis of the result has
    length 1: the degrees were averaged inside SNAMD. ``msm_options`` are
    :func:`msm.score_stages`'s keyword options (mode, device, budgets, dtype, progress).
    """
    z = [aggregate(y, degrees) for y in stage_maps]
    z_refs = None if references is None else [aggregate(y, degrees) for y in references]
    return msm.score_stages(z, groups, (1,), interval, references=z_refs, **msm_options)
