"""MSM: Mutual Scoring Module (paper §3.3, SPEC §3) — the hot loop.

For test image ``i``, patch ``m`` and every other image ``j`` of the scoring pool::

    a_{i,m}(j) = min_n ‖Z_i[m] − Z_j[n]‖₂                 (nearest patch of image j)
    s(i,m)     = mean of a_{i,m}(j) over the interval [a, b] of their ascending order

With the default interval (0, 0.3) that is the mean of the lowest K = floor(0.3·(N−1)) values.
``K = max(1, ·)``: for N ≤ 4 the floor is 0 and the authors' code returns NaN; we keep at least
the smallest value (the authors suggest ceil instead; both agree for N > 4 whenever 0.3·(N−1)
is an integer and differ by one value otherwise — we keep floor to match their numbers).

How it is computed (all exact, see SPEC §3):

- On unit vectors ``‖a − b‖ = √(2 − 2a·b)``, so the nearest patch is the largest dot product;
  distances are only formed for the few values the interval keeps.
- One product ``Y_i Y_jᵀ`` serves both directions: its row maxima score image i against j,
  its column maxima score j against i. Only blocks with J ≥ I are computed.
- ``<B_r(Y_i)[m], B_r(Y_j)[n]>`` is the box filter of the r = 1 product over both patch grids
  (:mod:`lnamd`), and ``cos = <·,·>/(‖B_r Y_i[m]‖·‖B_r Y_j[n]‖)``, so every degree comes from
  one product per image pair (``strategy="box_filter"``, the CPU default). Filtering costs a few
  adds per element against 2C for the product, but only if it happens in cache: a small C
  kernel (compiled on first use) filters each pair's P×P block and reduces it to row and column
  maxima at once. The same with torch operations runs at memory speed, one pass per operation,
  and some 30 passes per block cost more than the product itself on this CPU.
  ``per_degree`` multiplies the LNAMD features of each degree instead (three products; any
  device and dtype; the default where the kernel is not available).
- ``precision="lowp_rerank"`` (:mod:`msm_lowp`): bfloat16/float16 products only find the
  candidates of each maximum, their float32 similarities give it: the same maxima.
- Image pairs are processed in blocks (:mod:`msm_blocks`) whose size is derived from a memory budget, so peak
  memory for the similarity blocks is bounded whatever N is. The per-pair result
  (R × N × P × N similarities) is what grows with N.

The seam for speed work is :func:`max_similarities`; everything else is selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from musc_pipeline.core import lnamd, msm_blocks, msm_kernel, msm_lowp
from musc_pipeline.core.msm_blocks import block_pairs, block_size

Interval = tuple[float, float]
Mode = Literal["zero_shot", "few_shot", "musc_plus"]
ProgressFn = Callable[[int, int], None]

PAPER_INTERVAL: Interval = (0.0, 0.3)
#: The ablation variants of the paper as intervals of the sorted distances.
NAMED_INTERVALS: dict[str, Interval] = {
    "min": (0.0, 0.0),
    "max": (1.0, 1.0),
    "mean": (0.0, 1.0),
    "paper": PAPER_INTERVAL,
}
# Bounds the similarity blocks: per_degree holds one block pair (32 MB measured fastest for it
# on the 2-core CPU, benchmarks/msm.py; GPUs want larger blocks); box_filter one per worker
# thread, each at most msm_kernel.BLOCK_BYTES (cache), so 16 MB each with 2 threads.
DEFAULT_MEMORY_BUDGET = 32 * 2**20
DEFAULT_RESULT_BUDGET = 2 * 2**30


def resolve_interval(interval: Interval | str) -> Interval:
    if isinstance(interval, str):
        try:
            return NAMED_INTERVALS[interval]
        except KeyError:
            raise ValueError(
                f"unknown MSM aggregation {interval!r}; use one of {sorted(NAMED_INTERVALS)} "
                "or an interval (a, b) with 0 <= a <= b <= 1"
            ) from None
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"MSM interval must satisfy 0 <= a <= b <= 1, got {interval!r}")
    return lo, hi


def interval_slice(n: int, interval: Interval | str) -> slice:
    """Positions kept from n ascending distances: [floor(a·n), max(start+1, floor(b·n)))."""
    if n < 1:
        raise ValueError("the interval average needs at least one scoring image")
    lo, hi = resolve_interval(interval)
    start = min(math.floor(lo * n), n - 1)
    stop = min(n, max(start + 1, math.floor(hi * n)))
    return slice(start, stop)


Strategy = Literal["auto", "box_filter", "per_degree"]


def resolve_strategy(strategy: str, device: torch.device | str = "cpu") -> str:
    """``auto``: ``box_filter`` on the CPU when its kernel compiles here, else ``per_degree``."""
    if strategy not in ("auto", "box_filter", "per_degree"):
        raise ValueError(f"unknown MSM strategy {strategy!r}; use auto, box_filter or per_degree")
    if torch.device(device).type != "cpu":
        if strategy == "box_filter":
            raise ValueError("strategy='box_filter' runs on the CPU; use per_degree on an accelerator")
        return "per_degree"
    if strategy == "auto":
        return "box_filter" if msm_kernel.load() is not None else "per_degree"
    if strategy == "box_filter" and msm_kernel.load() is None:
        raise RuntimeError("strategy='box_filter' needs a C compiler (cc) to build its kernel")
    return strategy


Precision = Literal["exact_fp32", "lowp_rerank"]


def _as_grids(queries, keys, degrees):
    """N×P×C features (degree 1 only) as N×P×1×C grids; the degrees as a tuple."""
    degrees = tuple(degrees)
    if queries.ndim == 3:
        if degrees != (1,):
            raise ValueError("degrees > 1 need the patch grid: pass N×h×w×C maps")
        return queries.unsqueeze(2), None if keys is None else keys.unsqueeze(2), degrees
    return queries, keys, degrees


def max_similarities(
    queries: torch.Tensor,
    keys: torch.Tensor | None,
    degrees: Sequence[int],
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    dtype: torch.dtype = torch.float32,
    strategy: Strategy = "auto",
    precision: Precision = "exact_fp32",
    lowp_dtype: torch.dtype = torch.bfloat16,
    counter: msm_lowp.Candidates | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """For each degree, query patch and key image: the best cosine similarity to that image.

    queries: N×h×w×C layer-normed maps Y (or N×P×C with degrees == (1,)).
    keys: M×h×w×C, or None to score the queries against themselves (symmetric: each image
    pair is multiplied once; the self-pairs are set to −inf).
    precision ``exact_fp32`` — strategy (:func:`resolve_strategy`):
      - ``box_filter``: one product Y_i Y_jᵀ per image pair; every degree from it by the box
        filter over both grids, scaled by the inverse window norms, reduced to row and column
        maxima pair by pair in cache (:mod:`msm_kernel`).
      - ``per_degree``: one product Z_{r,i} Z_{r,j}ᵀ per degree on the LNAMD features (any
        device and dtype; maxima are exact in any precision, so blocks stay in ``dtype``).
    precision ``lowp_rerank``: per degree, a ``lowp_dtype`` product finds candidates, their
    float32 similarities give the maxima (:mod:`msm_lowp`; ``counter`` counts candidates).
    Returns R×N×P×M float32, ``max_n cos(B_r(Y_i)[m], B_r(Y_j)[n])``.
    """
    if dtype == torch.bfloat16:
        raise ValueError("bfloat16 similarities lose rank order (SPEC §3); use float16 or float32")
    if precision not in ("exact_fp32", "lowp_rerank"):
        raise ValueError(f"unknown MSM precision {precision!r}; use exact_fp32 or lowp_rerank")
    queries, keys, degrees = _as_grids(queries, keys, degrees)
    n, h, w, c = queries.shape
    p = h * w
    symmetric = keys is None
    m = n if symmetric else keys.shape[0]
    out = torch.full((len(degrees), n, p, m), -torch.inf, dtype=torch.float32, device=queries.device)
    if precision == "lowp_rerank":
        pairs = block_pairs(n, m, block_size(p, memory_budget, itemsize=lowp_dtype.itemsize + 1), symmetric)
        msm_lowp.max_similarities(queries, keys, degrees, pairs, out, lowp_dtype, counter, progress)
    elif resolve_strategy(strategy, queries.device) == "box_filter":
        # the block G of each worker, capped at what stays in cache; work rows come on top
        b = block_size(p, min(memory_budget // max(1, torch.get_num_threads()), msm_kernel.BLOCK_BYTES))
        msm_kernel.run_pairs(queries, keys, degrees, block_pairs(n, m, b, symmetric), out, dtype, progress)
    else:
        pairs = block_pairs(n, m, block_size(p, memory_budget, itemsize=dtype.itemsize), symmetric)
        msm_blocks.per_degree(queries, keys, degrees, pairs, out, dtype, progress)
    if symmetric:
        idx = torch.arange(n, device=out.device)
        out[:, idx, :, idx] = -torch.inf
    return out


def interval_mean_distance(similarities: torch.Tensor, n_valid: int, interval: Interval | str) -> torch.Tensor:
    """Mean of the kept distances. similarities: …×M (invalid entries −inf) -> … float64.

    Distances ascend as similarities descend, so the kept positions are the top-k
    similarities; only those are turned into distances √(2 − 2s).
    """
    keep = interval_slice(n_valid, interval)
    top = torch.topk(similarities, k=keep.stop, dim=-1, largest=True, sorted=True).values
    kept = top[..., keep.start : keep.stop].double()
    return torch.sqrt(torch.clamp(2.0 - 2.0 * kept, min=0.0)).mean(dim=-1)


def scores_by_degree(
    maps: torch.Tensor,
    degrees: Sequence[int] = lnamd.DEGREES,
    interval: Interval | str = PAPER_INTERVAL,
    *,
    references: torch.Tensor | None = None,
    mode: Mode = "zero_shot",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    result_budget: int = DEFAULT_RESULT_BUDGET,
    dtype: torch.dtype = torch.float32,
    strategy: Strategy = "auto",
    precision: Precision = "exact_fp32",
    lowp_dtype: torch.dtype = torch.bfloat16,
    counter: msm_lowp.Candidates | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """MSM scores s_{l,r}(i, m) of one stage for every degree. -> R×N×P float64.

    Memory: ``memory_budget`` bounds each block of similarities; ``result_budget`` bounds the
    per-pair result (R × N × P × pool float32). While the whole result fits, every image pair
    is multiplied once; beyond it the test images are scored in row chunks that fit, each
    against the whole pool and reduced at once — twice the products, memory flat in N.

    maps: N×h×w×C layer-normed stage maps Y of the test images (:func:`lnamd.layer_norm_map`).
    mode:
      - ``zero_shot`` (MuSc): the pool of image i is every other test image.
      - ``few_shot`` (appendix A.6): the pool is the other test images plus ``references``.
      - ``musc_plus`` (MuSc+): the pool is ``references`` only and the interval average
        becomes the minimum over references (``interval`` is ignored).
    """
    n = maps.shape[0]
    kw = dict(memory_budget=memory_budget, dtype=dtype, strategy=strategy, precision=precision,
              lowp_dtype=lowp_dtype, counter=counter)
    if mode in ("few_shot", "musc_plus") and (references is None or references.shape[0] == 0):
        raise ValueError(f"MSM mode {mode!r} needs at least one normal reference image")
    if mode == "musc_plus":
        sims = max_similarities(maps, references, degrees, progress=progress, **kw)
        return interval_mean_distance(sims, references.shape[0], "min")
    if n < 2:
        raise ValueError(
            f"MSM needs at least 2 test images to score each other, got {n}: "
            "a category with one image cannot be scored zero-shot"
        )
    if mode not in ("zero_shot", "few_shot"):
        raise ValueError(f"unknown MSM mode {mode!r}; use zero_shot, few_shot or musc_plus")
    n_refs = references.shape[0] if mode == "few_shot" else 0
    n_valid = n - 1 + n_refs
    patches = maps.shape[1] * (maps.shape[2] if maps.ndim == 4 else 1)
    row_bytes = len(tuple(degrees)) * patches * (n + n_refs) * 4
    if n * row_bytes <= result_budget:
        sims = max_similarities(maps, None, degrees, progress=progress, **kw)
        if n_refs:
            sims = torch.cat([sims, max_similarities(maps, references, degrees, **kw)], dim=-1)
        return interval_mean_distance(sims, n_valid, interval)
    rows = max(1, result_budget // row_bytes)
    out = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        sims = max_similarities(maps[start:stop], maps, degrees, **kw)  # R×rows×P×N
        own = torch.arange(start, stop, device=sims.device)
        sims[:, own - start, :, own] = -torch.inf  # an image does not score itself
        if n_refs:
            sims = torch.cat([sims, max_similarities(maps[start:stop], references, degrees, **kw)], dim=-1)
        out.append(interval_mean_distance(sims, n_valid, interval))
        if progress is not None:
            progress(stop, n)
    return torch.cat(out, dim=1)


def mutual_scores(
    z: torch.Tensor,
    interval: Interval | str = PAPER_INTERVAL,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """MSM for one stage and degree on given LNAMD features. z: N×P×C unit vectors -> N×P float64."""
    if z.ndim != 3:
        raise ValueError(f"z must be N×P×C, got shape {tuple(z.shape)}")
    return scores_by_degree(z.unsqueeze(2), (1,), interval, memory_budget=memory_budget)[0]


def score_stages(
    stage_maps: Sequence[torch.Tensor],
    groups: Sequence[Sequence[int]],
    degrees: Sequence[int] = lnamd.DEGREES,
    interval: Interval | str = PAPER_INTERVAL,
    *,
    references: Sequence[torch.Tensor] | None = None,
    mode: Mode = "zero_shot",
    device: torch.device | str = "cpu",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    result_budget: int = DEFAULT_RESULT_BUDGET,
    dtype: torch.dtype = torch.float32,
    precision: Precision = "exact_fp32",
    lowp_dtype: torch.dtype = torch.bfloat16,
    progress: Callable[[str, int, int], None] | None = None,
) -> torch.Tensor:
    """MSM of a whole category: every stage l, every degree r, each subset on its own.

    stage_maps: L tensors N×h×w×C (layer-normed Y_l, any device); groups: the image indices
    of each subset (:func:`musc_pipeline.core.subsets.divide`); references: L tensors of the
    normal references' maps for the few-shot modes. precision, lowp_dtype: as in
    :func:`max_similarities`. Each subset and stage is moved to
    ``device`` in turn, so the device holds one subset of one stage at a time.
    Returns s_{l,r}(i, m) as N×L×R×P float32 on the CPU.
    """
    n, h, w, _ = stage_maps[0].shape
    out = torch.zeros((n, len(stage_maps), len(tuple(degrees)), h * w), dtype=torch.float32)
    for gi, idx in enumerate(groups):
        idx = torch.as_tensor(idx, dtype=torch.long)
        for l, y in enumerate(stage_maps):
            label = f"subset {gi + 1}/{len(groups)}, stage {l + 1}/{len(stage_maps)}"
            s = scores_by_degree(
                y[idx].to(device), degrees, interval,
                references=None if references is None else references[l].to(device), mode=mode,
                memory_budget=memory_budget, result_budget=result_budget, dtype=dtype, precision=precision,
                lowp_dtype=lowp_dtype, progress=None if progress is None else (lambda done, total, label=label: progress(label, done, total)),
            )  # R×n_sub×P
            out[idx, l] = s.permute(1, 0, 2).float().cpu()
    return out
