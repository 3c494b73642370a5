"""RsCIN: Re-scoring with Constrained Image-level Neighbourhood (paper §3.4, SPEC §5).

Inputs: image scores c (N) and class tokens T (N×D), L2-normalised here.

    ĉ     = (c − min c) / (max c − min c)
    W     = T Tᵀ                              cosine similarities, W_ii = 1
    W_k   = W with only the k largest entries of each row kept (self included)
    c^(k) = D_k⁻¹ W_k ĉ                       row-normalised neighbourhood average
    score = mean over k ∈ K_list of c^(k)

Windows (authors' code): MVTec AD {1, 2, 3}, VisA {1, 8, 9}, others {1, 2, 3}; the paper writes
{2, 3} / {8, 9}: k = 1 keeps only the image itself, i.e. averages the original score in.
Usable on any method's image scores given class tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

WINDOWS_BY_DATASET = {"mvtec_ad": (1, 2, 3), "visa": (1, 8, 9)}
DEFAULT_WINDOWS = (1, 2, 3)


def windows_for(dataset: str) -> tuple[int, ...]:
    return WINDOWS_BY_DATASET.get(dataset, DEFAULT_WINDOWS)


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """Min–max normalisation; all-equal scores map to zeros."""
    scores = scores.double()
    span = scores.max() - scores.min()
    if span == 0:
        return torch.zeros_like(scores)
    return (scores - scores.min()) / span


def rescore(
    scores: torch.Tensor, class_tokens: torch.Tensor, windows: Sequence[int] = DEFAULT_WINDOWS
) -> torch.Tensor:
    """scores: N, class_tokens: N×D (any scale) -> N float64 re-scored image scores."""
    n = scores.shape[0]
    if class_tokens.shape[0] != n:
        raise ValueError(f"{n} scores but {class_tokens.shape[0]} class tokens")
    if not windows or any(k < 1 for k in windows):
        raise ValueError(f"RsCIN windows must be positive integers, got {tuple(windows)}")
    c = min_max(scores)
    t = F.normalize(class_tokens.double(), dim=1)  # cosine similarities whatever the backbone's scale
    w = t @ t.T  # N×N
    out = torch.zeros_like(c)
    for k in windows:
        k = min(int(k), n)
        top = torch.topk(w, k=k, dim=1)
        w_k = torch.zeros_like(w).scatter_(1, top.indices, top.values)
        sums = w_k.sum(dim=1, keepdim=True)
        zero = sums[:, 0].abs() < 1e-9  # the self-similarity 1 cancelled by opposite neighbours
        if zero.any():
            raise ValueError(
                f"RsCIN window k = {k}: the class-token similarities of image(s) "
                f"{torch.nonzero(zero)[:5, 0].tolist()} to their {k} nearest images sum to zero "
                "(opposite embeddings), so their weighted average is undefined; use smaller "
                "windows (method.rscin_windows)"
            )
        out += (w_k / sums) @ c
    return out / len(windows)
