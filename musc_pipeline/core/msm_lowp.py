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
The float32 re-rank has its own error δ = γν² (the float32 path's is the same order). With n̂
the approximate best of a row and s̃(n̂) its float32 similarity, a patch is a candidate when
``ŝ(m, n) ≥ s̃(n̂) − (e + 3δ)``: the true best n* has ŝ(n*) ≥ s(n*) − e ≥ s(n̂) − e ≥ s̃(n̂) − δ − e,
and every n within 2δ of it is kept too, so the maximum of the candidates' float32 values is
the float32 path's up to float32 rounding. (Thresholding at the exact s̃(n̂) instead of
max ŝ − 2e halves the window: one float32 dot per row buys it.)
For ViT-B (C = 768): e + 3δ = 0.0118 in bfloat16, 0.0015 in float16.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from musc_pipeline.core import lnamd

#: Gathered candidate rows per step of the re-rank (two C-vectors each): bounds its memory.
RERANK_CHUNK = 1 << 12


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
    """e + 3δ: a patch is a candidate when its ŝ is at least the float32 similarity of the
    row's approximate best minus this (module doc)."""
    gamma = channels * 2.0**-24 / (1 - channels * 2.0**-24)
    return product_error(channels, dtype) + 3 * gamma * (1 + gamma) ** 2


def window_norm_ratios(y: torch.Tensor, r: int) -> torch.Tensor:
    """ρ_r(m) = Σ_W ‖y‖ / ‖Σ_W y‖ (the box-filter identity's error factor). N×h×w×C -> N×h×w."""
    norms = torch.linalg.vector_norm(y.float(), dim=-1)
    return lnamd.window_mean(norms.unsqueeze(-1), r)[..., 0] / lnamd.window_norms(y.float(), r).clamp_min(1e-12)


@dataclass
class Candidates:
    """Counts of the re-rank (the benchmark prints ``per_patch``): candidates per maximum."""

    candidates: int = 0
    rows: int = 0  # maxima re-ranked: rows (query patch, key image) and, symmetric, columns

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


def _dots(rows_q: torch.Tensor, rows_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float32 dot products of the row pairs (rows_q[q[t]], rows_k[k[t]]), a chunk at a time."""
    out = torch.empty(len(q), device=rows_q.device)
    for s in range(0, len(q), RERANK_CHUNK):
        part = slice(s, s + RERANK_CHUNK)
        # einsum: one fused pass (vecdot is a product and a sum here); the gathers cost most
        out[part] = torch.einsum("kc,kc->k", rows_q.index_select(0, q[part]), rows_k.index_select(0, k[part]))
    return out


def rerank_block(zq: torch.Tensor, zk: torch.Tensor, zq_low: torch.Tensor, zk_low: torch.Tensor,
                 margin: float, both: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair: bi×P×C queries against bj×P×C keys (float32 and low-precision copies).

    Each row's threshold is the float32 similarity of its approximate best minus ``margin``
    (:func:`candidate_margin`). Returns the candidates' (i, m, j, n) indices (K×4) and their
    float32 similarities; with ``both`` they cover every column's maximum too (symmetric).
    """
    bi, p, c = zq.shape
    bj = zk.shape[0]
    rows_q, rows_k = zq.reshape(-1, c), zk.reshape(-1, c)
    approx = (zq_low.reshape(-1, c) @ zk_low.reshape(-1, c).T).view(bi, p, bj, p)
    i, m, j = (ix.reshape(-1) for ix in torch.meshgrid(*(torch.arange(s, device=zq.device) for s in (bi, p, bj)),
                                                        indexing="ij"))
    best = approx.argmax(dim=3).reshape(-1)  # (i, m, j) -> n̂
    floor = (_dots(rows_q, rows_k, i * p + m, j * p + best) - margin).view(bi, p, bj, 1)
    keep = approx >= floor
    if both:
        best = approx.argmax(dim=1).permute(0, 2, 1).reshape(-1)  # (i, j, n) -> m̂, as (i, n, j) runs
        floor = (_dots(rows_q, rows_k, i * p + best, j * p + m) - margin).view(bi, p, bj).permute(0, 2, 1)
        keep |= approx >= floor.unsqueeze(1)
    del approx, floor
    idx = keep.nonzero()
    del keep
    return idx, _dots(rows_q, rows_k, idx[:, 0] * p + idx[:, 1], idx[:, 2] * p + idx[:, 3])


def scatter_max(out: torch.Tensor, index: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    """out[index] = max(out[index], values), repeated indices included (out is contiguous)."""
    flat = torch.zeros_like(values, dtype=torch.long)
    for size, ix in zip(out.shape, index):
        flat = flat * size + ix
    out.view(-1).scatter_reduce_(0, flat, values, "amax")


def max_similarities(queries: torch.Tensor, keys: torch.Tensor | None, degrees: Sequence[int],
                     pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]], out: torch.Tensor,
                     dtype: torch.dtype, counter: Candidates | None = None,
                     progress: Callable[[int, int], None] | None = None) -> None:
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


# --------------------------------------------------------------------------- precision "auto"

#: The re-rank's cost over its R low-precision products (argmax dots, candidate masks, the
#: gathers of candidate rows, the scatter), per device type: lowp_rerank's seconds over R
#: block products' at the low-precision peak, minus one. CPU: 6.2 measured with
#: benchmarks/msm.py at N = 24 on random features (2.7 candidates per maximum; real features
#: leave more, docs/msm-precision.md): the row gathers run at memory speed. CUDA: not
#: measured (no GPU was lent to this work); the gathers run at HBM speed there.
RERANK_OVERHEAD = {"cpu": 6.0, "cuda": 1.0}
#: The C kernel's cost over box_filter's one float32 product (13–15 % measured, msm_kernel).
BOX_KERNEL_OVERHEAD = 0.15
PEAK_SHAPE = (2048, 768, 2048)  # about one MSM block pair: 10 images of P = 196, ViT-B's C


@functools.cache
def measured_peaks(device: str) -> dict[str, float]:
    """GFLOP/s of a block-shaped product per precision on ``device`` (best of 3, ~0.3 s on a
    CPU). float16 only on accelerators: CPUs without float16 matrix units run it at 0.4–3
    GFLOP/s here, seconds for one timing."""
    dev = torch.device(device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type != "cpu" else [])
    m, k, n = PEAK_SHAPE
    out = {}
    for dtype in dtypes:
        a, b = torch.randn(m, k, device=dev).to(dtype), torch.randn(k, n, device=dev).to(dtype)
        best = math.inf
        for rep in range(4):  # the first one warms up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = best if rep == 0 else min(best, time.perf_counter() - t)
        out[str(dtype).removeprefix("torch.")] = round(2 * m * k * n / best / 1e9, 1)
    return out


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``msm_precision: auto`` chose, and from what (recorded in the run's metadata)."""

    precision: str  # exact_fp32 | lowp_rerank
    lowp_dtype: torch.dtype | None
    peaks_gflops: dict[str, float]
    reason: str

    def record(self) -> dict[str, object]:
        return {"precision": self.precision, "lowp_dtype": None if self.lowp_dtype is None
                else str(self.lowp_dtype).removeprefix("torch."), "peaks_gflops": self.peaks_gflops,
                "reason": self.reason}


def choose_precision(peaks: dict[str, float], degrees: int, exact_strategy: str,
                     device_type: str = "cpu") -> PrecisionChoice:
    """``auto``: lowp_rerank where its R low-precision products plus the re-rank
    (:data:`RERANK_OVERHEAD` of the device type; others count as CUDA) take less time than
    the exact path — box_filter: one float32 product plus the kernel; per_degree: R float32
    products — at the measured peaks; else exact_fp32. Ties keep exact_fp32."""
    exact = (1 + BOX_KERNEL_OVERHEAD if exact_strategy == "box_filter" else degrees) / peaks["float32"]
    # float16 first: its smaller roundoff leaves fewer candidates at the same speed
    name = max((d for d in ("float16", "bfloat16") if d in peaks), key=lambda d: peaks[d])
    lowp = degrees * (1 + RERANK_OVERHEAD.get(device_type, RERANK_OVERHEAD["cuda"])) / peaks[name]
    speed = f"{name} {peaks[name]:.0f} vs float32 {peaks['float32']:.0f} GFLOP/s"
    if lowp < exact:
        return PrecisionChoice("lowp_rerank", getattr(torch, name), peaks,
                               f"{speed}: {degrees} {name} products + re-rank beat {exact_strategy} by {exact / lowp:.1f}×")
    return PrecisionChoice("exact_fp32", None, peaks,
                           f"{speed}: {degrees} {name} products + re-rank would take {lowp / exact:.1f}× {exact_strategy}'s time")
