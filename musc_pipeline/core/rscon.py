"""RsCon: Re-scoring with Constrained Neighbourhood (MuSc-V2, 2-D part).

RsCIN (:mod:`rscin`) smooths each image score over the images whose *class tokens* are
nearest. A class token describes the whole image, so for a small defect on a textured part
the nearest images by class token are just those of similar texture, anomalous or not.
MuSc-V2 (Li, Xue, Zhou, TPAMI 2026, arXiv 2511.10047) builds the image graph from
*anomaly-salient features* instead: each image is represented by the patch feature at the
location its own anomaly map finds most anomalous, so an image is re-scored by the images
whose worst patch looks like its worst patch::

    m*_i = argmax_m A(i, m)                        A: grid-level patch score (mean over stages)
    t_i  = Z_{l*}(i)[m*_i]                          the aggregated unit feature of stage l*
    score = RsCIN(c, T = [t_i], K_list)             min–max, top-k rows, D_k⁻¹ W_k c, mean over k

Details taken from the authors' released code (HUST-SLOW/MuSc-V2, MIT, ``models/muscv2.py``
and ``models/modules/_RsCon.py``, re-implemented here, not copied):

- l* is the second-to-last tapped stage (:data:`SALIENT_STAGE`); the argmax is over the
  h×w grid before upsampling;
- the windows are K_list = {1, 7}, and k = 1 (the image itself) is always added;
- the re-scoring arithmetic is RsCIN's (min–max normalised scores, keep the k largest
  similarities of each row, self included, row-normalise, average over k), so it is
  :func:`rscin.rescore` called with these features and windows.

The stage feature is the one the aggregation in use scores: SNAMD's per-stage Z_l, or, with
LNAMD, the same construction from its window means (mean over degrees of B_r(Y), L2
normalised) — our choice, so ``rescoring: rscon`` also works with ``aggregation: lnamd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from musc_pipeline.core import lnamd, rscin, snamd

Aggregation = Literal["lnamd", "snamd"]
#: Index of the stage whose features describe an image (the authors': second to last).
SALIENT_STAGE = -2
DEFAULT_WINDOWS = (1, 7)


def stage_features(y: torch.Tensor, degrees: Sequence[int], aggregation: Aggregation) -> torch.Tensor:
    """One unit feature per position of one stage. y: N×h×w×C -> N×h×w×C."""
    if aggregation == "snamd":
        return snamd.aggregate(y, degrees)
    if aggregation == "lnamd":
        pooled = torch.stack([lnamd.window_mean(y.float(), r) for r in degrees]).mean(dim=0)
        return F.normalize(pooled, dim=-1)
    raise ValueError(f"unknown aggregation {aggregation!r}; use lnamd or snamd")


def salient_features(
    y: torch.Tensor, patch_scores: torch.Tensor, degrees: Sequence[int], aggregation: Aggregation
) -> torch.Tensor:
    """t_i: the stage feature at each image's most anomalous patch.

    y: N×h×w×C layer-normed map of stage l*; patch_scores: N×P grid-level A(i, m)
    (:func:`maps.patch_scores`). Returns N×C unit vectors (first position on ties).
    """
    n, h, w, c = y.shape
    if patch_scores.shape != (n, h * w):
        raise ValueError(f"patch scores {tuple(patch_scores.shape)} do not match the {n}×{h}×{w} map")
    feats = stage_features(y, degrees, aggregation).reshape(n, h * w, c)
    worst = torch.argmax(patch_scores, dim=1)  # N
    return feats[torch.arange(n), worst]


def rescore(
    scores: torch.Tensor, salient: torch.Tensor, windows: Sequence[int] = DEFAULT_WINDOWS
) -> torch.Tensor:
    """scores: N image scores, salient: N×C -> N float64 re-scored (k = 1 always included)."""
    return rscin.rescore(scores, salient, tuple(sorted({1, *windows})))
