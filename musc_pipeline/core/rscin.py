"""RsCIN: Re-scoring with Constrained Image-level Neighbourhood (paper §3.4, SPEC §5).

Inputs: image scores c (N) and class tokens T (N×D), L2-normalised.

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

import numpy as np
import torch

WINDOWS_BY_DATASET = {"mvtec_ad": (1, 2, 3), "visa": (1, 8, 9)}
DEFAULT_WINDOWS = (1, 2, 3)
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


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
    scores: torch.Tensor,
    class_tokens: torch.Tensor,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    precision: str = "float32",
) -> torch.Tensor:
    """scores: N, class_tokens: N×D L2-normalised -> N float64 re-scored image scores.

    ``precision="float32"`` is the authors' arithmetic, operation for operation: W = T Tᵀ as a
    float32 NumPy product, each row's N − k smallest entries zeroed, P = D⁻¹W_k and P ĉ in
    float32 — so near-tied neighbours (1e-7 apart) fall the way they fall in the authors' code.
    ``float64`` computes the same formula in double precision.
    """
    return neighbourhoods(class_tokens, windows, precision).rescore(scores)


class Neighbourhoods:
    """D_k⁻¹ W_k for every window k: all of RsCIN that depends on the class tokens alone, made
    once for the many score columns of one category (the studies re-score each setting's)."""

    def __init__(self, operators: list[torch.Tensor]):
        self.operators = operators  # N×N each, in the arithmetic's precision

    def rescore(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: N -> N float64: the mean over the windows of P_k ĉ."""
        n = self.operators[0].shape[0]
        if scores.shape[0] != n:
            raise ValueError(f"{scores.shape[0]} scores but {n} class tokens")
        c = min_max(scores).to(self.operators[0].dtype)
        return torch.cat([p @ c[:, None] for p in self.operators], dim=1).mean(dim=1).double()


def neighbourhoods(class_tokens: torch.Tensor, windows: Sequence[int] = DEFAULT_WINDOWS,
                   precision: str = "float32") -> Neighbourhoods:
    """The operators of :func:`rescore` for these class tokens (N×D, L2-normalised)."""
    n = class_tokens.shape[0]
    if not windows or any(k < 1 for k in windows):
        raise ValueError(f"RsCIN windows must be positive integers, got {tuple(windows)}")
    dtype = PRECISIONS.get(precision)
    if dtype is None:
        raise ValueError(f"RsCIN precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    # the check in NumPy: torch's threaded norm would wake its thread pool, which then competes
    # with NumPy's BLAS for the product below (≈ 4× the whole call's time at N = 96 on 2 cores)
    t64 = class_tokens.detach().cpu().double().numpy()
    norms = np.sqrt(np.einsum("ij,ij->i", t64, t64))
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("RsCIN needs L2-normalised class tokens (SPEC §5); "
                         f"got norms from {norms.min():.4g} to {norms.max():.4g}")
    t = class_tokens.detach().cpu().to(dtype).numpy()
    w = torch.from_numpy(t @ t.T)  # N×N cosine similarities, W_ii = 1
    operators = []
    for k in windows:
        k = min(int(k), n)
        w_k = w.clone()
        if k < n:
            dropped = torch.topk(w, n - k, dim=1, largest=False, sorted=True).indices
            w_k.scatter_(1, dropped, 0.0)
        sums = w_k.sum(dim=1)
        zero = sums.abs() < 1e-6  # the self-similarity 1 cancelled by opposite neighbours
        if zero.any():
            raise ValueError(
                f"RsCIN window k = {k}: the class-token similarities of image(s) "
                f"{torch.nonzero(zero)[:5, 0].tolist()} to their {k} nearest images sum to zero "
                "(opposite embeddings), so their weighted average is undefined; use smaller "
                "windows (method.rscin_windows)"
            )
        operators.append((1.0 / sums)[:, None] * w_k)  # D⁻¹ W_k
    return Neighbourhoods(operators)
