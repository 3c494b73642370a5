"""RsCIN: Re-scoring with Constrained Image-level Neighbourhood (paper §3.4, SPEC §5).

Inputs: image scores c (N) and L2-normalised class tokens T (N×D).

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
    """scores: N, class_tokens: N×D (L2-normalised) -> N float64 re-scored image scores."""
    n = scores.shape[0]
    if class_tokens.shape[0] != n:
        raise ValueError(f"{n} scores but {class_tokens.shape[0]} class tokens")
    if not windows or any(k < 1 for k in windows):
        raise ValueError(f"RsCIN windows must be positive integers, got {tuple(windows)}")
    c = min_max(scores)
    t = class_tokens.double()
    w = t @ t.T  # N×N
    out = torch.zeros_like(c)
    for k in windows:
        k = min(int(k), n)
        top = torch.topk(w, k=k, dim=1)
        w_k = torch.zeros_like(w).scatter_(1, top.indices, top.values)
        p_k = w_k / w_k.sum(dim=1, keepdim=True)
        out += p_k @ c
    return out / len(windows)
