"""MSM (SPEC §3, §7) against the slow float64 reference, plus hand-made cases.

Both similarity strategies of :func:`msm.max_similarities` are checked: ``per_degree`` (one
product per LNAMD degree) and ``box_filter`` (one r = 1 product per pair, box-filtered over both
patch grids in the C kernel: the identity of SPEC §3; the CPU default).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import reference
from musc_pipeline.core import lnamd, msm

ATOL = 1e-4
STRATEGIES = ("per_degree", "box_filter")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (seconds on a
    loaded 2-core machine instead of milliseconds). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unit(seed: int, n: int, p: int, c: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, p, c))
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _tokens(seed: int, n: int, h: int, w: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, h, w, c)) * 2.0 + rng.normal(size=(n, 1, 1, c))


def _y(tokens: np.ndarray) -> torch.Tensor:
    return lnamd.layer_norm_map(torch.from_numpy(tokens).float())


def _ref_by_degree(tokens: np.ndarray, degrees, lo=0.0, hi=0.3, refs=None, plus=False) -> np.ndarray:
    n, h, w, c = tokens.shape
    out = []
    for r in degrees:
        z = reference.lnamd(tokens, r).reshape(n, h * w, c)
        zr = None if refs is None else reference.lnamd(refs, r).reshape(refs.shape[0], h * w, c)
        out.append(reference.msm(z, lo, hi, refs=zr, plus=plus))
    return np.stack(out)


def _pairs_used(y: torch.Tensor, budget: int, strategy: str, refs: torch.Tensor | None = None) -> int:
    """How many block pairs max_similarities multiplies for this budget (via progress)."""
    calls: list[tuple[int, int]] = []
    msm.max_similarities(y, refs, (1,), memory_budget=budget, strategy=strategy,
                         progress=lambda d, t: calls.append((d, t)))
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1))
    assert all(t == len(calls) for _, t in calls)
    return len(calls)


def _two_image_blocks_budget(p: int, strategy: str) -> int:
    """The smallest budget that puts more than one image into a block (float32 blocks; one
    worker thread here, so box_filter's per-worker share is the whole budget)."""
    budget = 1
    while msm.block_size(p, budget) < 2:
        budget *= 2
    return budget


# --------------------------------------------------------------------------- mutual_scores


@pytest.mark.parametrize("seed", [101, 102, 103])
@pytest.mark.parametrize(
    "interval, lohi",
    [
        ((0.0, 0.3), (0.0, 0.3)),
        ("min", (0.0, 0.0)),
        ("max", (1.0, 1.0)),
        ("mean", (0.0, 1.0)),
        ("paper", (0.0, 0.3)),
        ((0.2, 0.7), (0.2, 0.7)),
        ((0.5, 0.5), (0.5, 0.5)),
    ],
)
def test_mutual_scores_match_reference(seed, interval, lohi):
    z = _unit(seed, n=9, p=12, c=10)
    got = msm.mutual_scores(torch.from_numpy(z).float(), interval)
    assert got.dtype == torch.float64 and got.shape == (9, 12)
    want = reference.msm(z, *lohi)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL)


def test_intervals_are_really_different():
    """Guard against a test that passes because every interval gives the same numbers."""
    z = torch.from_numpy(_unit(7, n=9, p=12, c=10)).float()
    lo, mid, hi = (msm.mutual_scores(z, k) for k in ("min", "mean", "max"))
    assert (lo <= mid + 1e-9).all() and (mid <= hi + 1e-9).all()
    assert (hi - lo).min() > 1e-3


def test_mutual_scores_needs_n_p_c():
    with pytest.raises(ValueError, match="N×P×C"):
        msm.mutual_scores(torch.zeros(3, 2, 2, 4))


# --------------------------------------------------------------------------- scores_by_degree


_REF_CACHE: dict = {}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed, grid", [(201, (4, 4)), (202, (3, 5)), (203, (5, 4))])
def test_scores_by_degree_match_reference(seed, grid, strategy):
    """All degrees at once == LNAMD per degree + MSM, whatever the blocking.

    With strategy='box_filter' this checks the box-filter identity of SPEC §3."""
    h, w = grid
    n, p = 7, h * w
    tokens = _tokens(seed, n=n, h=h, w=w, c=12)
    y = _y(tokens)
    key = (seed, grid)
    if key not in _REF_CACHE:  # the slow reference once for both strategies
        _REF_CACHE[key] = _ref_by_degree(tokens, (1, 3, 5))
    want = _REF_CACHE[key]
    mid = _two_image_blocks_budget(p, strategy)
    # one image per block, a few per block, the default (one block for everything)
    budgets = (1, mid, msm.DEFAULT_MEMORY_BUDGET)
    pairs = [_pairs_used(y, b, strategy) for b in budgets]
    assert pairs[0] == n * (n + 1) // 2 and 1 < pairs[1] < pairs[0] and pairs[2] == 1
    results = []
    for b in budgets:
        got = msm.scores_by_degree(y, (1, 3, 5), memory_budget=b, strategy=strategy)
        assert got.shape == (3, n, p) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL)
        results.append(got.numpy())
    for other in results[1:]:  # independent of how the pairs were blocked
        np.testing.assert_allclose(other, results[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [211, 212])
def test_strategies_agree(seed):
    y = _y(_tokens(seed, n=8, h=5, w=5, c=24))
    a = msm.scores_by_degree(y, (1, 3, 5), strategy="per_degree")
    b = msm.scores_by_degree(y, (1, 3, 5), strategy="box_filter")
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="strategy"):
        msm.scores_by_degree(_y(_tokens(1, 3, 2, 2, 4)), (1,), strategy="fft")


def test_auto_strategy_is_the_kernel_on_cpu_and_per_degree_elsewhere(monkeypatch):
    assert msm.resolve_strategy("auto", "cpu") == "box_filter"  # cc is there wherever the tests run
    assert msm.resolve_strategy("auto", "cuda") == "per_degree"
    assert msm.resolve_strategy("per_degree", "cpu") == "per_degree"
    with pytest.raises(ValueError, match="CPU"):
        msm.resolve_strategy("box_filter", "cuda")
    monkeypatch.setattr(msm.msm_kernel, "load", lambda: None)  # no C compiler
    assert msm.resolve_strategy("auto", "cpu") == "per_degree"
    with pytest.raises(RuntimeError, match="compiler"):
        msm.resolve_strategy("box_filter", "cpu")


@pytest.mark.parametrize("seed, grid, degrees", [(221, (5, 6), (1, 3, 5, 7)), (222, (3, 5), (3,)),
                                                 (223, (2, 2), (5, 3)), (224, (1, 4), (1, 3))])
def test_box_filter_degrees_and_grids_match_reference(seed, grid, degrees):
    """Any odd degrees, grids narrower than the window, h != w: the kernel's bounds."""
    h, w = grid
    tokens = _tokens(seed, n=5, h=h, w=w, c=8)
    got = msm.scores_by_degree(_y(tokens), degrees, strategy="box_filter", memory_budget=1)
    np.testing.assert_allclose(got.numpy(), _ref_by_degree(tokens, degrees), rtol=0, atol=ATOL)


def test_inverse_window_norms_a_few_images_at_a_time(monkeypatch):
    """1/‖window sum_r(Y)‖ with zero padding (avg_pool2d × r², count_include_pad), the same bits
    whether the images go through in one chunk or one at a time."""
    y = _y(_tokens(241, n=5, h=4, w=6, c=8))
    degrees = (1, 3, 5)
    whole = msm.msm_kernel.inverse_window_norms(y, degrees)
    chw = y.permute(0, 3, 1, 2).double()
    for q, r in enumerate(degrees):
        sums = torch.nn.functional.avg_pool2d(chw, r, stride=1, padding=r // 2, count_include_pad=True) * r * r
        expected = 1 / torch.linalg.vector_norm(sums, dim=1).reshape(5, -1)
        torch.testing.assert_close(whole[q].double(), expected, rtol=1e-5, atol=0)
    monkeypatch.setattr(msm.msm_kernel, "NORMS_CHUNK_BYTES", 1)  # one image a chunk
    assert torch.equal(msm.msm_kernel.inverse_window_norms(y, degrees), whole)


def test_box_filter_worker_threads_give_the_same_similarities():
    """Block pairs run on torch.get_num_threads() workers, each writing its own part of out."""
    y = _y(_tokens(231, n=9, h=4, w=5, c=16))
    budget = _two_image_blocks_budget(20, "box_filter") * 2
    one = msm.max_similarities(y, None, (1, 3, 5), memory_budget=budget, strategy="box_filter")
    torch.set_num_threads(2)
    try:
        two = msm.max_similarities(y, None, (1, 3, 5), memory_budget=2 * budget, strategy="box_filter")
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(two, one, atol=0, rtol=0)
    assert torch.get_num_threads() == 1  # the workers' single-threaded products leave ours alone


def test_degrees_differ():
    s = msm.scores_by_degree(_y(_tokens(5, n=6, h=4, w=4, c=8)), (1, 3, 5))
    assert (s[0] - s[1]).abs().max() > 1e-2 and (s[1] - s[2]).abs().max() > 1e-2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_degree_subset_and_order(strategy):
    y = _y(_tokens(6, n=5, h=4, w=4, c=8))
    full = msm.scores_by_degree(y, (1, 3, 5), strategy=strategy)
    only = msm.scores_by_degree(y, (5, 1), strategy=strategy)
    np.testing.assert_allclose(only[0].numpy(), full[2].numpy(), atol=1e-6)
    np.testing.assert_allclose(only[1].numpy(), full[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [301, 302])
def test_few_shot_matches_reference(seed, strategy):
    tokens = _tokens(seed, n=6, h=4, w=4, c=10)
    refs = _tokens(seed + 1000, n=3, h=4, w=4, c=10)
    y, yr = _y(tokens), _y(refs)
    budget = _two_image_blocks_budget(16, strategy)
    assert _pairs_used(y, budget, strategy, refs=yr) > 1  # several blocks against the references
    got = msm.scores_by_degree(y, (1, 3), references=yr, mode="few_shot", memory_budget=budget, strategy=strategy)
    want = _ref_by_degree(tokens, (1, 3), refs=refs)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL)
    # the references change the result (they are really in the pool)
    zero = msm.scores_by_degree(y, (1, 3), strategy=strategy)
    assert (got - zero).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [401, 402])
def test_musc_plus_matches_reference(seed, strategy):
    tokens = _tokens(seed, n=4, h=4, w=4, c=10)
    refs = _tokens(seed + 1000, n=3, h=4, w=4, c=10)
    got = msm.scores_by_degree(_y(tokens), (1, 3, 5), references=_y(refs), mode="musc_plus",
                               memory_budget=1, strategy=strategy)
    want = _ref_by_degree(tokens, (1, 3, 5), refs=refs, plus=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL)
    # MuSc+ ignores the interval: always the minimum over references
    again = msm.scores_by_degree(_y(tokens), (1, 3, 5), "max", references=_y(refs), mode="musc_plus",
                                 strategy=strategy)
    np.testing.assert_allclose(again.numpy(), got.numpy(), atol=1e-6)


def test_musc_plus_scores_a_single_image():
    """MuSc+ needs no other test image: one image against the references works."""
    tokens = _tokens(9, n=1, h=3, w=3, c=6)
    refs = _tokens(10, n=2, h=3, w=3, c=6)
    got = msm.scores_by_degree(_y(tokens), (1,), references=_y(refs), mode="musc_plus")
    want = _ref_by_degree(tokens, (1,), refs=refs, plus=True)
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL)


@pytest.mark.parametrize("mode", ["few_shot", "musc_plus"])
def test_reference_modes_need_references(mode):
    y = torch.randn(4, 3, 3, 5)
    with pytest.raises(ValueError, match="reference"):
        msm.scores_by_degree(y, (1,), mode=mode)
    with pytest.raises(ValueError, match="reference"):
        msm.scores_by_degree(y, (1,), mode=mode, references=torch.zeros(0, 3, 3, 5))


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        msm.scores_by_degree(torch.randn(3, 2, 2, 4), (1,), mode="bogus")


# --------------------------------------------------------------------------- edge cases


def test_single_image_raises_clear_error():
    with pytest.raises(ValueError, match="at least 2 test images"):
        msm.scores_by_degree(torch.randn(1, 3, 3, 8), (1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        msm.mutual_scores(torch.nn.functional.normalize(torch.randn(1, 9, 8), dim=-1))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_small_n_keeps_at_least_one_value(n):
    """K = max(1, floor(0.3·(N−1))): for N ≤ 4 that is the nearest image (the min)."""
    assert msm.interval_slice(n - 1, msm.PAPER_INTERVAL) == slice(0, max(1, math.floor(0.3 * (n - 1))))
    z = _unit(500 + n, n=n, p=9, c=8)
    got = msm.mutual_scores(torch.from_numpy(z).float()).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference.msm(z, 0.0, 0.3), atol=ATOL)
    if n <= 5:  # floor(0.3·(N−1)) ≤ 1: the paper interval is the minimum
        np.testing.assert_allclose(got, reference.msm(z, 0.0, 0.0), atol=ATOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_n3_by_degree_matches_reference(strategy):
    tokens = _tokens(77, n=3, h=4, w=4, c=8)
    got = msm.scores_by_degree(_y(tokens), (1, 3, 5), strategy=strategy)
    np.testing.assert_allclose(got.numpy(), _ref_by_degree(tokens, (1, 3, 5)), atol=ATOL)
    # K = max(1, floor(0.6)) = 1: the nearest of the two other images
    np.testing.assert_allclose(got.numpy(), _ref_by_degree(tokens, (1, 3, 5), 0.0, 0.0), atol=ATOL)


def test_interval_slice_k():
    # K = floor(0.3·(N−1)) for larger N, e.g. N−1 = 59 → 17, N−1 = 10 → 3
    assert msm.interval_slice(59, (0.0, 0.3)) == slice(0, 17)
    assert msm.interval_slice(10, (0.0, 0.3)) == slice(0, 3)
    assert msm.interval_slice(10, "max") == slice(9, 10)
    assert msm.interval_slice(10, "mean") == slice(0, 10)
    with pytest.raises(ValueError):
        msm.interval_slice(0, "min")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bfloat16_rejected(strategy):
    y = torch.randn(3, 2, 2, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        msm.scores_by_degree(y, (1,), dtype=torch.bfloat16, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float16_close_to_float32(strategy):
    y = _y(_tokens(88, n=5, h=4, w=4, c=16))
    a = msm.scores_by_degree(y, (1, 3), strategy=strategy)
    b = msm.scores_by_degree(y, (1, 3), dtype=torch.float16, strategy=strategy)
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=5e-3)


@pytest.mark.parametrize("bad", ["median", (0.5, 0.2), (-0.1, 0.3), (0.0, 1.5)])
def test_bad_interval_raises(bad):
    with pytest.raises(ValueError, match="interval|aggregation"):
        msm.mutual_scores(torch.nn.functional.normalize(torch.randn(4, 3, 5), dim=-1), bad)


# --------------------------------------------------------------------------- hand-made cases


def test_planted_outlier_gets_top_score():
    rng = np.random.default_rng(3)
    n, p, c = 10, 16, 32
    base = rng.normal(size=c)
    base /= np.linalg.norm(base)
    z = base + 0.35 * rng.normal(size=(n, p, c)) / math.sqrt(c)
    z[4, 11] = -base  # far from every other patch
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    s = msm.mutual_scores(torch.from_numpy(z).float()).numpy()
    flat_top = np.argmax(s)
    assert np.unravel_index(flat_top, s.shape) == (4, 11)
    others = np.delete(s.ravel(), flat_top)
    assert s[4, 11] > 1.9 and others.max() < 0.6  # ≈ 2 vs. ordinary patches


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_planted_outlier_through_all_degrees(strategy):
    rng = np.random.default_rng(4)
    n, h, w, c = 8, 5, 5, 16
    tokens = rng.normal(size=(1, 1, 1, c)) * 3 + 0.3 * rng.normal(size=(n, h, w, c))
    tokens[2, 2, 3] = -tokens[2, 2, 3] * 5
    s = msm.scores_by_degree(_y(tokens), (1, 3, 5), strategy=strategy)
    for r, r_scores in zip((1, 3, 5), s.numpy()):
        i, m = np.unravel_index(np.argmax(r_scores), r_scores.shape)
        # the window mean spreads the outlier over its r×r neighbourhood (more weight where
        # zero padding leaves fewer real neighbours), so the top lands inside that window
        assert i == 2
        assert abs(m // w - 2) <= r // 2 and abs(m % w - 3) <= r // 2
        if r == 1:
            assert m == 2 * w + 3
        other_images = np.delete(r_scores, 2, axis=0)
        assert r_scores[2].max() > other_images.max() + 0.1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_permuting_images_permutes_scores(strategy):
    y = _y(_tokens(55, n=7, h=4, w=4, c=8))
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    budget = _two_image_blocks_budget(16, strategy)
    s = msm.scores_by_degree(y, (1, 3, 5), memory_budget=budget, strategy=strategy)
    sp = msm.scores_by_degree(y[perm], (1, 3, 5), memory_budget=budget, strategy=strategy)
    np.testing.assert_allclose(sp.numpy(), s[:, perm].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_similarities_self_pairs_excluded(strategy):
    y = lnamd.layer_norm_map(torch.randn(4, 3, 3, 6))
    sims = msm.max_similarities(y, None, (1, 3), memory_budget=1, strategy=strategy)
    assert sims.shape == (2, 4, 9, 4)
    idx = torch.arange(4)
    assert torch.isneginf(sims[:, idx, :, idx]).all()
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.isfinite(sims.permute(0, 2, 1, 3)[:, :, off]).all()
    assert (sims[torch.isfinite(sims)] <= 1 + 1e-5).all()


def test_progress_is_reported():
    calls = []
    y = lnamd.layer_norm_map(torch.randn(5, 3, 3, 6))
    msm.scores_by_degree(y, (1,), memory_budget=1, progress=lambda d, t: calls.append((d, t)))
    # one image per block → 15 block pairs with J ≥ I
    assert calls == [(k, 15) for k in range(1, 16)]


# --------------------------------------------------------------------------- maps (SPEC §4)
# (kept here: maps turn the MSM patch scores into S×S maps and image scores)

from musc_pipeline.core import maps  # noqa: E402


def test_patch_scores_mean_over_stages_and_degrees():
    s = torch.arange(2 * 4 * 3 * 5, dtype=torch.float64).reshape(2, 4, 3, 5)
    np.testing.assert_allclose(maps.patch_scores(s).numpy(), s.numpy().mean(axis=(1, 2)))


@pytest.mark.parametrize("seed, grid, size", [(1, (4, 4), 32), (2, (3, 5), 17), (3, (7, 7), 50)])
def test_anomaly_maps_keep_corner_values(seed, grid, size):
    h, w = grid
    s = torch.from_numpy(np.random.default_rng(seed).uniform(size=(3, h * w)))
    m = maps.anomaly_maps(s, grid, size)
    assert m.shape == (3, size, size) and m.dtype == torch.float32
    g = s.reshape(3, h, w).float()
    # align_corners=True: the four output corners are the four corner patches exactly
    for (a, b), (pa, pb) in zip(
        [(0, 0), (0, -1), (-1, 0), (-1, -1)], [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    ):
        np.testing.assert_allclose(m[:, a, b].numpy(), g[:, pa, pb].numpy(), rtol=0, atol=1e-6)
    # bilinear: the map stays inside the range of its patch scores
    assert (m.amin(dim=(1, 2)) >= g.amin(dim=(1, 2)) - 1e-6).all()
    assert (m.amax(dim=(1, 2)) <= g.amax(dim=(1, 2)) + 1e-6).all()


def test_anomaly_map_bilinear_value_by_hand():
    # 2×2 grid to 3×3 with align_corners=True: the centre is the mean of the four patches
    m = maps.anomaly_maps(torch.tensor([[0.0, 1.0, 2.0, 5.0]]), (2, 2), 3)
    assert m[0, 1, 1].item() == pytest.approx(2.0)
    assert m[0, 0, 1].item() == pytest.approx(0.5) and m[0, 1, 2].item() == pytest.approx(3.0)


def test_image_score_is_max_of_upsampled_map_not_of_grid():
    # a 3×3 grid whose only high patch is the centre; upsampled to 4×4 with align_corners the
    # output pixels sit at grid positions 0, 2/3, 4/3, 2: the centre patch is never hit and the
    # best pixel gets (1 − 1/3)² = 4/9 of it
    s = torch.zeros(1, 9)
    s[0, 4] = 1.0
    m = maps.anomaly_maps(s, (3, 3), 4)
    c = maps.image_scores(m)
    assert c[0].item() == pytest.approx(4 / 9, abs=1e-6)
    assert c[0].item() == pytest.approx(m[0].max().item())
    assert c[0].item() < s.max().item()


def test_image_scores_per_image():
    s = torch.from_numpy(np.random.default_rng(9).uniform(size=(4, 16)))
    m = maps.anomaly_maps(s, (4, 4), 21)
    np.testing.assert_allclose(maps.image_scores(m).numpy(), m.reshape(4, -1).max(dim=1).values.numpy())


def test_smoothing_is_off_by_default_and_changes_maps_when_on():
    s = torch.from_numpy(np.random.default_rng(8).uniform(size=(2, 16)))
    plain = maps.anomaly_maps(s, (4, 4), 16)
    np.testing.assert_array_equal(plain.numpy(), maps.anomaly_maps(s, (4, 4), 16, smoothing_sigma=0.0).numpy())
    smooth = maps.anomaly_maps(s, (4, 4), 16, smoothing_sigma=2.0)
    assert smooth.shape == plain.shape and (smooth - plain).abs().max() > 1e-3


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_maps_written_into_a_reused_scratch_equal_new_maps(sigma):
    scratch = torch.full((3, 37, 37), float("nan"))
    for seed in (10, 11):  # the second call overwrites the first's maps
        s = torch.from_numpy(np.random.default_rng(seed).uniform(size=(3, 5 * 6)))
        new = maps.anomaly_maps(s, (5, 6), 37, sigma)
        assert torch.equal(maps.anomaly_maps(s, (5, 6), 37, sigma, out=scratch), new)
    assert torch.equal(scratch, maps.anomaly_maps(s, (5, 6), 37))  # the upsampled maps, before any smoothing


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["zero_shot", "few_shot"])
def test_row_chunks_beyond_the_result_budget_give_the_same_scores(mode, strategy):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    y = lnamd.layer_norm_map(torch.randn(9, 4, 4, 8, generator=gen))
    refs = lnamd.layer_norm_map(torch.randn(2, 4, 4, 8, generator=gen)) if mode == "few_shot" else None
    whole = msm.scores_by_degree(y, (1, 3, 5), references=refs, mode=mode, strategy=strategy)
    calls = []
    row_bytes = 3 * 16 * (9 + (2 if refs is not None else 0)) * 4
    chunked = msm.scores_by_degree(y, (1, 3, 5), references=refs, mode=mode, result_budget=2 * row_bytes,
                                   strategy=strategy,
                                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 9), (4, 9), (6, 9), (8, 9), (9, 9)]  # five row chunks, not one symmetric pass
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_score_stages_scores_each_subset_of_each_stage_on_its_own():
    """A category: 2 stages, 3 subsets; every subset is scored only against its own images."""
    from musc_pipeline.core import subsets

    n, h, w, c = 9, 3, 3, 6
    stage_tokens = [_tokens(300 + l, n=n, h=h, w=w, c=c) for l in range(2)]
    groups = subsets.divide(["good"] * 5 + ["crack"] * 4, 3, seed=1)
    labels = []
    got = msm.score_stages([_y(t) for t in stage_tokens], groups, (1, 3),
                           progress=lambda label, done, total: labels.append(label))
    assert got.shape == (n, 2, 2, h * w) and got.dtype == torch.float32
    for idx in groups:
        for l, tokens in enumerate(stage_tokens):
            want = _ref_by_degree(tokens[idx], (1, 3))  # R×n_sub×P, the subset alone
            np.testing.assert_allclose(got[idx, l].permute(1, 0, 2).numpy(), want, rtol=0, atol=ATOL)
    assert sorted(set(labels)) == [f"subset {g}/3, stage {l}/2" for g in (1, 2, 3) for l in (1, 2)]


def test_float16_blocks_do_not_change_the_scores():
    """per_degree (the accelerator path) reduces float16 blocks in float16 (maxima are exact in
    any precision): the result is the same however the image pairs are blocked, and the blocks
    are sized by 2-byte items."""
    y = _y(_tokens(89, n=7, h=4, w=4, c=16))
    one_pair_fp16 = 16 * 16 * 2  # bytes of one P×P block in float16
    totals = {}
    for dtype in (torch.float16, torch.float32):
        calls = []
        msm.max_similarities(y, None, (1,), memory_budget=4 * one_pair_fp16, dtype=dtype, strategy="per_degree",
                             progress=lambda done, total: calls.append(total))
        totals[dtype] = calls[-1]
    # float16: 2 images per block -> 4 blocks, 10 block pairs; float32: 1 image, 28 pairs
    assert totals == {torch.float16: 10, torch.float32: 28}
    whole = msm.scores_by_degree(y, (1, 3, 5), dtype=torch.float16, strategy="per_degree")
    blocked = msm.scores_by_degree(y, (1, 3, 5), dtype=torch.float16, memory_budget=one_pair_fp16,
                                   strategy="per_degree")
    torch.testing.assert_close(blocked, whole, atol=0, rtol=0)
