"""The box-filter kernel of MSM (:mod:`msm`, ``strategy="box_filter"``): a small C function
(:mod:`native`: compiled on first use in a process, 1.5–3 s here).

Why C: per image pair the r×r box filter over both patch grids, the scaling by the inverse
window norms and the row and column maxima are a few operations per element of the P×P
block, against 2C for the product that made it. Done with torch operations that is some 30
passes over memory per block, more than the product itself on a 2-core CPU; in C it is one
pass while the block is in cache (13–15 % of the product's time, measured). Without a C
compiler MSM uses ``per_degree`` (same results).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
from collections.abc import Sequence

import torch

from musc_pipeline.core import native

NORMS_CHUNK_BYTES = 2 * 2**20  # inverse_window_norms: images at a time, to stay in cache


def inverse_window_norms(maps_: torch.Tensor, degrees: Sequence[int]) -> torch.Tensor:
    """1/‖window sum_r(Y)[m]‖ per degree (what the kernel's sums need): N×h×w×C -> R×N×P.

    Shifted adds over the grid axes (C stays contiguous); the clamp is F.normalize's on
    the window mean, as in per_degree. A few images at a time (≈ 2 MB), so the copies and
    adds stay in cache: ≈ 4× faster than on whole N×h×w×C tensors, with the same arithmetic."""
    y = maps_.float()
    n, h, w, c = y.shape
    step = max(1, NORMS_CHUNK_BYTES // (h * w * c * 4))
    out = torch.empty(len(degrees), n, h * w)
    for start in range(0, n, step):
        part = y[start : start + step]
        for q, r in enumerate(degrees):
            s = part
            for axis in (1, 2):
                reach = min(r // 2, s.shape[axis] - 1)
                if reach == 0:
                    continue
                acc = s.clone()
                for d in range(1, reach + 1):
                    acc.narrow(axis, d, s.shape[axis] - d).add_(s.narrow(axis, 0, s.shape[axis] - d))
                    acc.narrow(axis, 0, s.shape[axis] - d).add_(s.narrow(axis, d, s.shape[axis] - d))
                s = acc
            norm = torch.linalg.vector_norm(s, dim=-1).reshape(len(part), -1)
            out[q, start : start + len(part)] = 1.0 / torch.maximum(norm, torch.tensor(r * r * 1e-12))
    return out


# Per image pair X = Y_i Y_jᵀ (P×P, a view into the block G) and degree r = 2k+1, in cache:
#   along wj and hj (each row m, the key grid)   -> a   (P×P work rows)
#   along hi (rows m ± d·w, the query grid)      -> b   (P×P work rows)
#   along wi (rows m ± d), summed on the fly into S[m, ·], and reduced at once:
#   rows[m] = iq[m]·max_n S[m,n]·ik[n],  cols[n] = ik[n]·max_m S[m,n]·iq[m]
# Zero padding is counted like avg_pool's count_include_pad: off-grid neighbours add nothing.
# Sums are float32 over at most r per axis (the error of avg_pool2d), maxima are exact.

# G of one worker's block pair, 10 images of ViT-B/16: stays in L3 from the product to the kernel
# (the 2-core CPU: 8 MB, 7 images, was 25 % slower: MKL multiplies 1372-wide blocks badly).
BLOCK_BYTES = 16 * 2**20

_SOURCE = r"""
#include <string.h>
#define L 16
#define NEG (-__builtin_inff())

/* Sum the rows p[0..taps) into one row of S and fold it into the maxima (L lanes, so it
   vectorizes): returns max_n S[n]·ik[n]; colmax[n] = max(colmax[n], S[n]·qm) unless 0. */
static inline float reduce(const float *const *p, const int taps, const float *restrict ik, float qm,
                           float *restrict colmax, int P)
{
    float acc[L], best = NEG;
    for (int l = 0; l < L; l++) acc[l] = NEG;
    int n = 0;
    for (; n + L <= P; n += L)
        for (int l = 0; l < L; l++) {
            float v = p[0][n + l];
            for (int d = 1; d < taps; d++) v += p[d][n + l];
            float r = v * ik[n + l], c = v * qm;
            acc[l] = r > acc[l] ? r : acc[l];
            if (colmax) colmax[n + l] = c > colmax[n + l] ? c : colmax[n + l];
        }
    for (; n < P; n++) {
        float v = p[0][n];
        for (int d = 1; d < taps; d++) v += p[d][n];
        float r = v * ik[n], c = v * qm;
        best = r > best ? r : best;
        if (colmax) colmax[n] = c > colmax[n] ? c : colmax[n];
    }
    for (int l = 0; l < L; l++) best = acc[l] > best ? acc[l] : best;
    return best;
}

/* One pair X (row stride ldx) on an h×w grid, half-width k (a constant once inlined). */
static inline void pair(const float *restrict x, long ldx, int h, int w, const int k,
                        const float *restrict iq, const float *restrict ik, float *rows, long rs,
                        float *cols, long cs, float *restrict a, float *restrict b, float *restrict t,
                        const float *restrict mask, const float *restrict zero, float *restrict colmax)
{
    const int P = h * w;
    const float *p[2 * k + 1];
    const float *src = x;
    long ld = ldx;
    if (cols) for (int n = 0; n < P; n++) colmax[n] = NEG;
    if (k > 0) {
        for (int m = 0; m < P; m++) {
            const float *restrict xm = x + m * ldx;
            /* along wj into t: mask[d][n] is 1 where column n % w + d is on the grid */
            for (int n = k; n < P - k; n++) {
                float v = xm[n];
                for (int d = 1; d <= k; d++) v += mask[(k - d) * P + n] * xm[n - d] + mask[(k + d) * P + n] * xm[n + d];
                t[n] = v;
            }
            for (int n = 0; n < P; n++) { /* the first and last k columns: bounds checked */
                if (n == k && P - k > k) n = P - k;
                float v = 0.f;
                for (int d = -k; d <= k; d++) { int e = n % w + d; if (e >= 0 && e < w) v += xm[n + d]; }
                t[n] = v;
            }
            /* along hj: t has k·w zeros before and after */
            float *restrict am = a + (long)m * P;
            for (int n = 0; n < P; n++) {
                float v = t[n];
                for (int d = 1; d <= k; d++) v += t[n - d * w] + t[n + d * w];
                am[n] = v;
            }
        }
        for (int m = 0; m < P; m++) { /* along hi */
            const int hi = m / w;
            for (int d = -k; d <= k; d++) p[d + k] = hi + d >= 0 && hi + d < h ? a + (long)(m + d * w) * P : zero;
            float *restrict bm = b + (long)m * P;
            for (int n = 0; n < P; n++) {
                float v = p[k][n];
                for (int d = 1; d <= k; d++) v += p[k - d][n] + p[k + d][n];
                bm[n] = v;
            }
        }
        src = b;
        ld = P;
    }
    for (int m = 0; m < P; m++) { /* along wi, reduced at once */
        const int wi = m % w;
        p[0] = src + m * ld;
        for (int d = 1, e = 1; d <= k; d++) {
            p[e++] = wi - d >= 0 ? src + (m - d) * ld : zero;
            p[e++] = wi + d < w ? src + (m + d) * ld : zero;
        }
        rows[m * rs] = reduce(p, 2 * k + 1, ik, iq[m], cols ? colmax : 0, P) * iq[m];
    }
    if (cols) for (int n = 0; n < P; n++) cols[n * cs] = colmax[n] * ik[n];
}

/* Every image pair (i, j) of a block G (bi query images × bj key images, P rows/columns each,
   row stride ldg), every half-width ks[q]. iq + q·iqs + i·P: inverse norms of query image i,
   likewise ik; rows[q, i, m, j] and cols[q, j, n, i] by the given strides (cols may be 0).
   work: 2·P·P + (2·kmax + 4)·P + 2·kmax·w floats. */
void msm_box_pairs(const float *g, long ldg, int h, int w, int nk, const int *ks,
                   const float *iq, long iqs, const float *ik, long iks,
                   float *rows, long r_q, long r_i, long r_m, long r_j,
                   float *cols, long c_q, long c_j, long c_n, long c_i,
                   int bi, int bj, float *work)
{
    const int P = h * w;
    int kmax = 0;
    for (int q = 0; q < nk; q++) kmax = ks[q] > kmax ? ks[q] : kmax;
    float *a = work, *b = a + (long)P * P, *zero = b + (long)P * P, *colmax = zero + P;
    float *mask = colmax + P, *t = mask + (2 * kmax + 1) * P + kmax * w;
    memset(zero, 0, sizeof(float) * P);
    memset(t - kmax * w, 0, sizeof(float) * kmax * w);
    memset(t + P, 0, sizeof(float) * kmax * w);
    for (int d = -kmax; d <= kmax; d++)
        for (int n = 0; n < P; n++) { int e = n % w + d; mask[(d + kmax) * P + n] = e >= 0 && e < w; }
    for (int i = 0; i < bi; i++)
    for (int j = 0; j < bj; j++) {
        const float *x = g + (long)i * P * ldg + (long)j * P;
        for (int q = 0; q < nk; q++) {
            const float *qi = iq + q * iqs + (long)i * P, *kj = ik + q * iks + (long)j * P;
            const float *mk = mask + (kmax - ks[q]) * P;
            float *ro = rows + q * r_q + i * r_i + j * r_j, *co = cols ? cols + q * c_q + j * c_j + i * c_i : 0;
            switch (ks[q]) { /* constant k: the tap loops unroll and the row loops vectorize */
            case 0: pair(x, ldg, h, w, 0, qi, kj, ro, r_m, co, c_n, a, b, t, mk, zero, colmax); break;
            case 1: pair(x, ldg, h, w, 1, qi, kj, ro, r_m, co, c_n, a, b, t, mk, zero, colmax); break;
            case 2: pair(x, ldg, h, w, 2, qi, kj, ro, r_m, co, c_n, a, b, t, mk, zero, colmax); break;
            default: pair(x, ldg, h, w, ks[q], qi, kj, ro, r_m, co, c_n, a, b, t, mk, zero, colmax);
            }
        }
    }
}
"""


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel, compiled once per process (1.5–3 s here) for this CPU; None without cc."""
    return native.compile_library("MSM box_filter kernel", _SOURCE, "using per_degree", {"msm_box_pairs": (None, [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
        ctypes.c_void_p, *[ctypes.c_long] * 4, ctypes.c_void_p, *[ctypes.c_long] * 4,
        ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ])})


class BoxKernel:
    """One block pair: its product G, then the kernel over its image pairs, writing rows (and,
    symmetric, columns) straight into ``out``. Called from worker threads (ctypes releases
    the GIL); block pairs write disjoint parts of ``out``."""

    def __init__(self, degrees, grid, q_inv, k_inv, out):
        self.lib, (self.h, self.w), self.out = load(), grid, out
        self.symmetric = k_inv is None
        self.q_inv, self.k_inv = q_inv, q_inv if k_inv is None else k_inv
        self.ks = torch.tensor([r // 2 for r in degrees], dtype=torch.int32)
        p, kmax = self.h * self.w, int(self.ks.max())
        self.work_size = 2 * p * p + (2 * kmax + 4) * p + 2 * kmax * self.w

    def __call__(self, q_feats: torch.Tensor, k_feats: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        if self.symmetric and i0 == j0:  # a diagonal block: its upper half as halves, no self-pairs
            if i1 - i0 > 1:
                mid = (i0 + i1) // 2
                self(q_feats, k_feats, i0, mid, mid, i1)
                self(q_feats, k_feats, i0, mid, i0, mid)
                self(q_feats, k_feats, mid, i1, mid, i1)
            return
        # (bi·P)×C @ C×(bj·P) -> G: (bi·P)×(bj·P) float32, image pair (i, j) at rows i·P, columns j·P
        g = (q_feats[i0:i1].flatten(0, 1) @ k_feats[j0:j1].flatten(0, 1).T).float()
        out, work = self.out, torch.empty(self.work_size)
        s_q, s_i, s_m, s_j = out.stride()
        self.lib.msm_box_pairs(
            g.data_ptr(), g.shape[1], self.h, self.w, len(self.ks), self.ks.data_ptr(),
            self.q_inv[:, i0:].data_ptr(), self.q_inv.stride(0), self.k_inv[:, j0:].data_ptr(), self.k_inv.stride(0),
            out[:, i0:, :, j0:].data_ptr(), s_q, s_i, s_m, s_j,  # rows[q, i, m, j]
            out[:, j0:, :, i0:].data_ptr() if self.symmetric else None, s_q, s_i, s_m, s_j,  # cols[q, j, n, i]
            i1 - i0, j1 - j0, work.data_ptr(),
        )


def run_pairs(queries, keys, degrees, pairs, out, dtype, progress=None) -> None:
    """Every block pair ((i0, i1), (j0, j1)) through :class:`BoxKernel`, filling ``out``
    (R×N×P×M, −inf); symmetric when keys is None. One worker per torch thread, each
    multiplying (single-threaded) and filtering whole block pairs: no synchronisation between
    the product and the kernel, and each block stays in cache."""
    n, h, w, c = queries.shape
    symmetric = keys is None
    q_feats = queries.reshape(n, h * w, c).to(dtype)
    k_feats = q_feats if symmetric else keys.reshape(len(keys), h * w, c).to(dtype)
    kernel = BoxKernel(degrees, (h, w), inverse_window_norms(queries, degrees),
                       None if symmetric else inverse_window_norms(keys, degrees), out)
    threads = torch.get_num_threads()
    try:
        with concurrent.futures.ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            jobs = [pool.submit(kernel, q_feats, k_feats, *q, *k) for q, k in pairs]
            for done, job in enumerate(concurrent.futures.as_completed(jobs), 1):
                job.result()
                if progress is not None:
                    progress(done, len(pairs))
    finally:
        torch.set_num_threads(threads)  # the workers' setting is also the default of later threads
