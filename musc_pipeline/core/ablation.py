"""Ablations by re-aggregation (paper §4.2 and appendix A.2): pure torch/numpy, no I/O.

Everything MuSc does after the MSM products is cheap, so the studies keep the products' result
and re-aggregate it instead of re-running the method:

- MSM (Tab. 5 a–f, the selection percentage of Fig. 8, the interval start of Tab. 10): the
  per-pair maxima of :func:`msm.max_similarities`, sorted once per image and patch::

      S_{l,r}(i, m) = [max_n cos(Z_{l,r,i}[m], Z_{l,r,j}[n])]_{j ≠ i}   descending, N×L×R×P×(N−1)

  The distances a_{i,m}(j) = √(2 − 2S) then ascend along the last axis, so every interval of
  them reduced by min or max is one element, and by mean a sum of segment sums
  (:func:`reaggregate`, all of a study's variants in one pass): s_{l,r}(i, m) without a product.
- Aggregation degrees (Tab. 3, Tab. 9): A(i, m) averages s_{l,r}(i, m) over a chosen set of r.
- RsCIN (Tab. 5, Fig. 8, Tab. 11): re-scores image scores only (:func:`rscin_settings`).

:func:`evaluate` is what the pipeline does from s_{l,r}(i, m) on (maps, image score c_i, RsCIN,
metrics), so a re-aggregated setting and a fresh run of the same setting agree exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from musc_pipeline.core import auroc, maps, metrics, msm, reaggregate_kernel, rscin

Reduce = Literal["mean", "min", "max"]
#: The metrics of the paper's ablation tables: AC = image AUROC (and F1-max / AP for RsCIN),
#: AS = pixel AUROC. Pixel F1-max, AP and PRO are left to ``category_metrics`` (each costs a
#: sort of every pixel per setting).
STUDY_METRICS = (*metrics.IMAGE_METRICS, "pixel_auroc")


@dataclass(frozen=True)
class Reduction:
    """Which of the ascending distances a_{i,m}(j) are kept (``interval``) and how they are reduced."""

    interval: msm.Interval
    reduce: Reduce = "mean"


#: Tab. 5: (a)–(c) over all N − 1 distances, (d)–(f) over the lowest 30 %; (f) is MuSc.
MSM_VARIANTS: dict[str, Reduction] = {
    "(a) min": Reduction((0.0, 1.0), "min"),
    "(b) max": Reduction((0.0, 1.0), "max"),
    "(c) mean": Reduction((0.0, 1.0), "mean"),
    "(d) 30% + min": Reduction((0.0, 0.3), "min"),
    "(e) 30% + max": Reduction((0.0, 0.3), "max"),
    "(f) 30% + mean": Reduction((0.0, 0.3), "mean"),
}
#: Fig. 8: the mean of the lowest x % (x = 10 … 100).
PERCENTAGES: dict[str, Reduction] = {f"{p}%": Reduction((0.0, p / 100)) for p in range(10, 101, 10)}
#: Tab. 10: a 30 % wide interval moved away from the minimum.
INTERVAL_STARTS: dict[str, Reduction] = {
    f"[{a}%, {a + 30}%]": Reduction((a / 100, (a + 30) / 100)) for a in (0, 5, 10, 15, 20, 25)
}


def sorted_similarities(
    stage_maps: Sequence[torch.Tensor],
    groups: Sequence[Sequence[int]],
    degrees: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    memory_budget: int = msm.DEFAULT_MEMORY_BUDGET,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_{l,r}(i, m), descending, for every stage and degree, each subset scored on its own.

    stage_maps: L tensors N×h×w×C (layer-normed Y_l); groups as in :func:`msm.score_stages`.
    Returns (N×L×R×P×W float32 with W = largest subset − 1, padded with −inf for smaller
    subsets; pool size N, int64: how many scoring images each image had).
    """
    n, h, w, _ = stage_maps[0].shape
    degrees = tuple(degrees)
    width = max(len(g) for g in groups) - 1
    out = torch.full((n, len(stage_maps), len(degrees), h * w, width), -torch.inf, dtype=torch.float32)
    pool = torch.zeros(n, dtype=torch.long)
    for idx in groups:
        idx = torch.as_tensor(idx, dtype=torch.long)
        k = len(idx) - 1
        for l, y in enumerate(stage_maps):
            sims = msm.max_similarities(y[idx].to(device), None, degrees, memory_budget=memory_budget, dtype=dtype)
            top = sims.sort(dim=-1, descending=True).values[..., :k]  # R×n×P×k, the −inf self-pair dropped
            out[idx, l, :, :, :k] = top.permute(1, 0, 2, 3).cpu()
            del sims, top
        pool[idx] = k
    return out, pool


def reaggregate(sims: torch.Tensor, pool: torch.Tensor, reductions: Mapping[str, Reduction]) -> dict[str, torch.Tensor]:
    """s_{l,r}(i, m) of every MSM variant in ``reductions``, in one pass over S. -> {name: N×L×R×P float32}.

    sims: N×L×R×P×W descending (:func:`sorted_similarities`), pool: N. The kept positions are
    :func:`msm.interval_slice` of each image's pool size, so ``Reduction(interval)`` equals
    ``msm.score_stages(..., interval)``: min and max exactly, the mean up to float64 rounding of
    the prefix sums (~1e-14). The distances (float64, as MSM; float32 sums of ~N values would
    move a one-value interval by more than 1e-6) and their prefix sums are made once for all the
    variants (:mod:`reaggregate_kernel`); padding (−inf similarity) is never read.
    """
    pools = pool.unique().tolist()
    keep = {(n_valid, name): msm.interval_slice(n_valid, r.interval) for n_valid in pools for name, r in reductions.items()}
    # the positions read: prefix sums at the ends of the means, distances at the min / max
    sums_at = sorted({e for (_, name), k in keep.items() if reductions[name].reduce == "mean" for e in (k.start, k.stop)})
    dist_at = sorted({k.start if reductions[name].reduce == "min" else k.stop - 1
                      for (_, name), k in keep.items() if reductions[name].reduce != "mean"})
    end = max(k.stop for k in keep.values())  # distances past every interval are not needed
    sums, dists = reaggregate_kernel.distance_sums(sims, end, sums_at, dist_at)
    out = {}
    for name, r in reductions.items():
        per_pool = []
        for n_valid in pools:
            k = keep[n_valid, name]
            if r.reduce == "mean":
                v = (sums[sums_at.index(k.stop)] - sums[sums_at.index(k.start)]).div_(k.stop - k.start)
            else:
                v = dists[dist_at.index(k.start if r.reduce == "min" else k.stop - 1)]
            per_pool.append(v.float())
        value = per_pool[0]
        for n_valid, v in zip(pools[1:], per_pool[1:]):
            rows = pool == n_valid
            value[rows] = v[rows]
        out[name] = value
    return out


def degree_sets(stored: Sequence[int], extra: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Tab. 3: every non-empty subset of the stored degrees; Tab. 9: the stored set plus each
    extra degree in turn ({1, 3, 5, 7}, {1, 3, 5, 7, 9}). Names like "{1, 3}"."""
    stored, sets = tuple(stored), []
    for mask in range(1, 2 ** len(stored)):
        sets.append(tuple(r for b, r in enumerate(stored) if mask >> b & 1))
    sets.sort(key=lambda s: (len(s), s))
    sets += [stored + tuple(extra[: i + 1]) for i in range(len(extra))]
    return {"{" + ", ".join(map(str, s)) + "}": s for s in sets}


def select_degrees(scores: torch.Tensor, degrees: Sequence[int], chosen: Sequence[int]) -> torch.Tensor:
    """The degrees ``chosen`` of s_{l,r}(i, m). scores: N×L×R×P (R = ``degrees``) -> N×L×|chosen|×P."""
    missing = [r for r in chosen if r not in degrees]
    if missing:
        raise ValueError(f"degrees {missing} were not computed (have {list(degrees)})")
    return scores[:, :, [list(degrees).index(r) for r in chosen]]


def rscin_settings(windows: Sequence[int]) -> dict[str, tuple[int, ...] | None]:
    """RsCIN variants (Tab. 5 on/off, Fig. 8 single / full / multi window). None = without RsCIN;
    () = the full window k = N, no mask. ``windows``: the dataset's default multi-window."""
    windows = tuple(windows)
    wide = tuple(k for k in windows if k > 1)
    out: dict[str, tuple[int, ...] | None] = {"w/o RsCIN": None}
    out |= {f"single window {{{k}}}": (k,) for k in wide}
    out["full window (k = N)"] = ()
    if wide != windows:
        out["multi-window {" + ", ".join(map(str, wide)) + "} (paper's text)"] = wide
    out["multi-window {" + ", ".join(map(str, windows)) + "} (default)"] = windows
    return out


def rescore(scores: torch.Tensor, class_tokens: torch.Tensor, windows: tuple[int, ...] | None,
            precision: str = "float32") -> torch.Tensor:
    """Image scores after one RsCIN variant (``rscin_settings``). scores: N -> N float64."""
    if windows is None:
        return scores.double()
    return rscin.rescore(scores, class_tokens, windows or (len(scores),), precision)


def score_metrics(labels: np.ndarray | None, image_scores: np.ndarray, masks: np.ndarray | None = None,
                  amaps: np.ndarray | None = None) -> dict[str, float]:
    """STUDY_METRICS (NaN where undefined): image metrics on ``image_scores``, pixel AUROC on the
    maps — the same calls as ``category_metrics``."""
    values = {k: math.nan for k in STUDY_METRICS}
    if labels is not None:
        values |= metrics.image_metrics(labels, image_scores).values
    if masks is not None and amaps is not None:
        values["pixel_auroc"] = auroc.pixel_auroc(masks, amaps)
    return values


def evaluate(scores: torch.Tensor, grid: tuple[int, int], size: int, rescoring: rscin.Neighbourhoods,
             labels: np.ndarray | None, masks: np.ndarray | None, smoothing_sigma: float = 0.0,
             image_score: str = "max", image_score_q: float = 0.01,
             maps_out: torch.Tensor | None = None) -> dict[str, float]:
    """The pipeline from s_{l,r}(i, m) on: maps, c_i, RsCIN, STUDY_METRICS. scores: N×L×R×P.
    ``rescoring``: the category's RsCIN operators (:func:`rscin.neighbourhoods`, made once for
    all the settings); ``maps_out``: an N×S×S float32 scratch for the maps, for the settings to
    share (:func:`maps.anomaly_maps`).

    Also returns ``rescore_s`` (maps and RsCIN) and ``evaluate_s`` (metrics), in seconds.
    """
    t0 = time.perf_counter()
    amaps, c = maps.from_msm_scores(scores, grid, size, smoothing_sigma, image_score, image_score_q,
                                    maps_out)  # N×S×S, N
    final = rescoring.rescore(c)
    t1 = time.perf_counter()
    values = score_metrics(labels, final.numpy(), masks, amaps.numpy())
    return values | {"rescore_s": t1 - t0, "evaluate_s": time.perf_counter() - t1}
