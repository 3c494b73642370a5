"""The one pass of :func:`ablation.reaggregate` over the sorted similarities: distances and
their prefix sums at the positions the MSM variants read.

Per row of S (one image, stage, degree and patch; descending over the other images):

    a[k] = √(max(2 − 2 S[k], 0))   float64, ascending   (as :func:`msm.interval_mean_distance`)
    sums[q]  = a[0] + … + a[sums_at[q] − 1]   summed in order, as torch.cumsum
    dists[q] = a[dist_at[q]]

In C (:mod:`native`) this is one pass over S, eight rows at a time while they are in cache,
rows split over torch's threads; with torch operations (the path without a compiler) it is
some six passes over a float64 copy, a few images at a time. Both give the same bits. At the
musc profile's shapes (N = 96, 28×28 grid, 4 stages × 3 degrees) the whole
:func:`ablation.reaggregate` of the 6 interval starts takes 0.12 s instead of 0.32 s, of the 22
settings of the three MSM studies 0.27 s instead of 0.80 s (2 cores).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from musc_pipeline.core import native

#: the torch path's float64 working copy (distances and prefix sums) per chunk of images: small
#: enough to stay in cache (8 MB: 1.9× faster than 57 MB chunks at the musc profile's shapes)
CHUNK_BYTES = 8 * 2**20
#: the kernel's rows per thread at least (fewer rows: fewer threads)
MIN_PART_ROWS = 4096

_SOURCE = r"""
#include <math.h>
#define B 8
/* Rows r0 … r0+nb−1 (nb ≤ B): their distances first (contiguous, so the square roots
   vectorize), then the prefix sums with the rows as independent lanes (each row still summed
   in order over k; the additions' latency overlaps). a: B×end scratch. */
static inline void rows_block(const float *s, long rows, long r0, const int nb, long ld, int end, const int *sums_at,
                              int n_sums, const int *dist_at, int n_dist, double *sums, double *dists,
                              double *restrict a)
{
    for (int b = 0; b < nb; b++) {
        const float *restrict x = s + (r0 + b) * ld;
        double *restrict ab = a + b * end;
        for (int k = 0; k < end; k++) {
            const double d = (double)x[k] * -2.0 + 2.0;
            ab[k] = sqrt(d < 0.0 ? 0.0 : d);
        }
        for (int t = 0; t < n_dist; t++) dists[t * rows + r0 + b] = ab[dist_at[t]];
    }
    double acc[B] = {0.0};
    int q = 0;
    for (int k = 0; k < end; k++) {
        for (; q < n_sums && sums_at[q] == k; q++)
            for (int b = 0; b < nb; b++) sums[q * rows + r0 + b] = acc[b];
        for (int b = 0; b < nb; b++) acc[b] += a[b * end + k];
    }
    for (; q < n_sums; q++)
        for (int b = 0; b < nb; b++) sums[q * rows + r0 + b] = acc[b];
}

/* Rows [r_begin, r_end) of rows (row stride ld) -> sums: n_sums×rows, dists: n_dist×rows. */
void distance_sums(const float *s, long rows, long r_begin, long r_end, long ld, int end, const int *sums_at,
                   int n_sums, const int *dist_at, int n_dist, double *sums, double *dists)
{
    double a[B * end];
    long r = r_begin;
    for (; r + B <= r_end; r += B) rows_block(s, rows, r, B, ld, end, sums_at, n_sums, dist_at, n_dist, sums, dists, a);
    for (; r < r_end; r++) rows_block(s, rows, r, 1, ld, end, sums_at, n_sums, dist_at, n_dist, sums, dists, a);
}
"""


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel, compiled once per process; None without cc."""
    return native.compile_library("re-aggregation kernel", _SOURCE, "using torch operations", {"distance_sums": (None, [
        ctypes.c_void_p, *[ctypes.c_long] * 4, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
    ])})


def distance_sums(sims: torch.Tensor, end: int, sums_at: Sequence[int],
                  dist_at: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """sims: …×W float32, descending along W; reads its first ``end`` ≤ W columns. sums_at
    (each in 0…end) and dist_at (each < end) ascending -> (len(sums_at)×…, len(dist_at)×…)
    float64, as in the module doc: one contiguous tensor per position, as the variants read them."""
    sums = torch.empty((len(sums_at), *sims.shape[:-1]), dtype=torch.float64)
    dists = torch.empty((len(dist_at), *sims.shape[:-1]), dtype=torch.float64)
    lib = load()
    if lib is None:
        _torch_pass(sims, end, list(sums_at), list(dist_at), sums, dists)
        return sums, dists
    sims = sims.float().contiguous()
    rows = math.prod(sims.shape[:-1])
    s_at, d_at = torch.tensor(sums_at, dtype=torch.int32), torch.tensor(dist_at, dtype=torch.int32)

    def run(lo: int, hi: int) -> None:
        lib.distance_sums(sims.data_ptr(), rows, lo, hi, sims.shape[-1], end, s_at.data_ptr(), len(s_at),
                          d_at.data_ptr(), len(d_at), sums.data_ptr(), dists.data_ptr())

    parts = max(1, min(torch.get_num_threads(), rows // MIN_PART_ROWS))
    bounds = [rows * k // parts for k in range(parts + 1)]
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))
    return sums, dists


def _torch_pass(sims, end, sums_at, dist_at, sums, dists) -> None:
    """The same with torch operations, a few images (CHUNK_BYTES of float64) at a time."""
    n = sims.shape[0]
    step = max(1, CHUNK_BYTES // (math.prod(sims.shape[1:-1]) * (end + 1) * 8))
    for start in range(0, n, step):
        part = slice(start, min(start + step, n))
        dist = sims[part, ..., :end].double().mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()  # ascending
        prefix = torch.zeros((*dist.shape[:-1], end + 1), dtype=torch.float64)
        torch.cumsum(dist, dim=-1, out=prefix[..., 1:])  # prefix[..., k] = Σ of the k smallest
        for q, k in enumerate(sums_at):
            sums[q, part] = prefix[..., k]
        for t, k in enumerate(dist_at):
            dists[t, part] = dist[..., k]
