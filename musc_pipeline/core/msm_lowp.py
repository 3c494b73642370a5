"""MSM with low-precision products and an exact re-rank (``precision="lowp_rerank"``).

A bfloat16 or float16 product of the unit LNAMD features finds, for every query patch m and
key image j, the **candidates**: the patches n whose approximate similarity is close enough to
the best that one of them must be the true nearest patch. Only those are recomputed as
float32 dot products, so the maxima (and every score after them) are the float32 path's.

The bound (unit vectors x, y in float32, C channels; u the unit roundoff of the low
precision — bfloat16 2⁻⁸, float16 2⁻¹¹ — and v = 2⁻²⁴ float32's; η the absolute underflow
error of the conversion — float16 2⁻²⁵ below its smallest normal, bfloat16 none above
float32's; γ = Cv / (1 − Cv), and ‖x‖, ‖y‖ ≤ ν = 1 + γ after F.normalize)::

    conversion + exact products   A = ν²(2u + u²) + 2η(1 + u)·ν√C + Cη²
    fp32 accumulation of C terms  γ·B,   B = ν²(1 + u)² + 2η(1 + u)·ν√C + Cη²  (≥ Σ|x̂_k ŷ_k|)
    rounding of the output        u·(ν² + A + γB)  (torch returns the product in the low precision)
    e = A + γB + u(ν² + A + γB)   ≥ |ŝ − x·y|

Products of two bfloat16 (8 + 8 bits) or float16 (11 + 11) significands are exact in float32,
and γ holds for any order and blocking of the sum (oneDNN, cuBLAS split-K), as long as the
sums are float32: on CUDA the reduced-precision reductions are switched off around the
products. The inner dimension is never chunked: the accumulation term is for C terms.
The float32 re-rank has its own error δ = γν² (the float32 path's is the same order), so a
patch is a candidate when ``ŝ(m, n) ≥ max_n' ŝ(m, n') − 2(e + δ)``: the true maximum n* has
ŝ(n*) ≥ s(n*) − e ≥ s(n̂) − e ≥ ŝ(n̂) − 2e, and any n within 2δ of it is kept too, so the
maximum over the candidates' float32 values equals the float32 path's up to float32 rounding.
For ViT-B (C = 768): bfloat16 e + δ = 0.0118, float16 0.0015.

Every degree gets its own low-precision product of its unit features Z_r (R products).
Through the box-filter identity (one product of Y for all degrees, as ``box_filter`` does in
float32) the error of ŝ_r(m, n) carries the window norm ratios instead:
``e · ρ_r(m) · ρ_r(n)`` with ``ρ_r(m) = Σ_{m'∈W(m)} ‖y_m'‖ / ‖Σ_{m'∈W(m)} y_m'‖`` (the mean
norm of the window over the norm of its mean, ≥ 1; :func:`window_norm_ratios`), because
the error of each product entry scales with ‖y_m'‖‖y_n'‖ and the window sum adds r² of them
per side before the division by the window norms. docs/msm-precision.md measures how many
candidates that leaves; it is why the degrees are multiplied separately here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from musc_pipeline.core import lnamd

LOWP_DTYPES = (torch.bfloat16, torch.float16)
#: Gathered candidate rows per step of the re-rank (two C-vectors each): bounds its memory.
RERANK_CHUNK = 1 << 16


def unit_roundoffs(dtype: torch.dtype) -> tuple[float, float]:
    """(u, η): relative rounding and absolute underflow error of converting float32 to dtype."""
    if dtype == torch.bfloat16:
        return 2.0**-8, 0.0  # float32's exponent range: only float32 subnormals underflow
    if dtype == torch.float16:
        return 2.0**-11, 2.0**-25  # half the spacing of float16's subnormals
    raise ValueError(f"low-precision MSM products are bfloat16 or float16, not {dtype}")


def product_error(channels: int, dtype: torch.dtype) -> float:
    """e: bound on |ŝ − x·y| of one low-precision product of unit float32 vectors (module doc)."""
    u, eta = unit_roundoffs(dtype)
    gamma = channels * 2.0**-24 / (1 - channels * 2.0**-24)
    nu2 = (1 + gamma) ** 2
    root = 2 * eta * (1 + u) * math.sqrt(nu2 * channels)
    a = nu2 * (2 * u + u * u) + root + channels * eta * eta
    b = nu2 * (1 + u) ** 2 + root + channels * eta * eta
    return a + gamma * b + u * (nu2 + a + gamma * b)


def candidate_margin(channels: int, dtype: torch.dtype) -> float:
    """2(e + δ): a patch is a candidate when its ŝ is within this of the row's best ŝ."""
    gamma = channels * 2.0**-24 / (1 - channels * 2.0**-24)
    return 2 * (product_error(channels, dtype) + gamma * (1 + gamma) ** 2)


def window_norm_ratios(y: torch.Tensor, r: int) -> torch.Tensor:
    """ρ_r(m) = Σ_W ‖y‖ / ‖Σ_W y‖ (the box-filter identity's error factor). N×h×w×C -> N×h×w."""
    norms = torch.linalg.vector_norm(y.float(), dim=-1)
    return lnamd.window_mean(norms.unsqueeze(-1), r)[..., 0] / lnamd.window_norms(y.float(), r).clamp_min(1e-12)


@dataclass
class Candidates:
    """Counts of the re-rank (the benchmark prints ``per_patch``): candidates over query rows."""

    candidates: int = 0
    rows: int = 0  # (degree, query patch, key image) triples whose maximum was re-ranked

    @property
    def per_patch(self) -> float:
        return self.candidates / max(1, self.rows)


@contextlib.contextmanager
def float32_sums(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce bfloat16/float16 products in their own precision: not for the bound."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    before = m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = before


def rerank_block(zq: torch.Tensor, zk: torch.Tensor, zq_low: torch.Tensor, zk_low: torch.Tensor,
                 margin: float, both: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair: bi×P×C queries against bj×P×C keys (float32 and low-precision copies).

    Returns the candidates' (i, m, j, n) indices (K×4) and their float32 similarities; with
    ``both`` the candidates cover every column's maximum too (the symmetric case).
    """
    bi, p, c = zq.shape
    bj = zk.shape[0]
    approx = (zq_low.reshape(-1, c) @ zk_low.reshape(-1, c).T).view(bi, p, bj, p)
    keep = approx >= (approx.amax(dim=3, keepdim=True).float() - margin)
    if both:
        keep |= approx >= (approx.amax(dim=1, keepdim=True).float() - margin)
    del approx
    idx = keep.nonzero()
    del keep
    exact = torch.empty(len(idx), device=zq.device)
    for s in range(0, len(idx), RERANK_CHUNK):
        i, m, j, n = idx[s : s + RERANK_CHUNK].unbind(1)
        exact[s : s + RERANK_CHUNK] = (zq[i, m] * zk[j, n]).sum(dim=-1)
    return idx, exact


def scatter_max(out: torch.Tensor, index: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    """out[index] = max(out[index], values), repeated indices included (out is contiguous)."""
    flat = torch.zeros_like(values, dtype=torch.long)
    for size, ix in zip(out.shape, index):
        flat = flat * size + ix
    out.view(-1).scatter_reduce_(0, flat, values, "amax")


def max_similarities(queries: torch.Tensor, keys: torch.Tensor | None, degrees: Sequence[int],
                     pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]], out: torch.Tensor,
                     dtype: torch.dtype, counter: Candidates | None = None, progress=None) -> None:
    """:func:`msm.max_similarities` with ``precision="lowp_rerank"``: fills ``out`` (R×N×P×M,
    −inf) for the given block pairs ((i0, i1), (j0, j1)); symmetric when keys is None."""
    symmetric = keys is None
    n, h, w, c = queries.shape
    p = h * w
    margin = candidate_margin(c, dtype)

    unit = lambda maps_, r: lnamd.unit_features(maps_.float(), r).reshape(len(maps_), p, c)  # noqa: E731

    with float32_sums(queries.device):
        for ri, r in enumerate(degrees):  # one degree's features at a time (memory)
            zq = unit(queries, r)
            zk = zq if symmetric else unit(keys, r)
            zq_low = zq.to(dtype)
            zk_low = zq_low if symmetric else zk.to(dtype)
            for done, ((i0, i1), (j0, j1)) in enumerate(pairs, 1):
                both = symmetric and j0 != i0
                idx, exact = rerank_block(zq[i0:i1], zk[j0:j1], zq_low[i0:i1], zk_low[j0:j1], margin, both)
                i, m, j, nn = idx.unbind(1)
                degree = torch.full_like(i, ri)
                scatter_max(out, (degree, i + i0, m, j + j0), exact)
                if both:
                    scatter_max(out, (degree, j + j0, nn, i + i0), exact)
                if counter is not None:
                    counter.candidates += len(idx)
                    counter.rows += (i1 - i0) * p * (j1 - j0) * (2 if both else 1)
                if progress is not None:
                    progress(ri * len(pairs) + done, len(degrees) * len(pairs))
            del zq, zk, zq_low, zk_low
