"""MSM benchmark: our fused mutual scoring vs. a straightforward implementation of the
authors' approach vs. the matmul FLOP floor of this machine.

Run:  .venv/bin/python benchmarks/msm.py            (N = 60 and 120, ~3 min on 2 cores)
      .venv/bin/python benchmarks/msm.py --quick    (N = 60 only)
      .venv/bin/python benchmarks/msm.py --scale    (ours alone at N = 100, 200, 400)

Workload: one stage of ViT-B-16 at 224 px (grid 14×14 → P = 196 patches, C = 768), N test
images, all three LNAMD degrees (1, 3, 5), interval (0, 0.3). The features are random
(seeded, the same in every method): tokens ~ N(0, 1), layer-normed per image.

Methods (each runs in a fresh spawned process, so "peak RSS" is that process's own
``ru_maxrss``; "base" is the RSS after imports, data and a small warm-up, before timing):

- ``straightforward``: SPEC §2–3 written the way the authors' code works: for each degree r,
  Z = lnamd.aggregate(tokens, r); for each image i one ``torch.cdist`` of its P patches
  against the (N−1)·P patches of all other images concatenated, reshape to P×(N−1)×P,
  min over patches per image, topk of the N−1 distances, mean over the interval.
- ``ours/box_filter``: ``msm.scores_by_degree(y, (1, 3, 5))`` (the CPU default strategy: one
  r = 1 product per image pair, every degree by box-filtering it over both patch grids and
  reducing it to row and column maxima pair by pair in cache, in msm's C kernel; block pairs
  on one worker thread per core).
- ``ours/per_degree``: the same with ``strategy="per_degree"`` (one product per degree on unit
  LNAMD features, each image pair once, blocked; the accelerator path).
- ``ours/row_chunks`` (``--scale``): the default with a 64 MB result budget, so the images are
  scored in row chunks (each pair multiplied twice, memory flat in N).
- ``ours/lowp_rerank``: ``precision="lowp_rerank"``: per degree a bfloat16 product of the unit
  LNAMD features finds candidates, their float32 similarities give the maxima
  (:mod:`musc_pipeline.core.msm_lowp`); "cand./max" counts the candidates.
- ``matmul floor``: plain float32 matmuls with exactly the useful FLOPs of one product per
  image pair, U = N(N−1)/2 · 2·P²·C (A = all N·P patches, B = (N−1)·P/2 columns, chunked).

"floor %" = (U / peak) / seconds, with peak the best GFLOP/s of a large square float32
matmul measured here: how close a method comes to doing only the work of one product per
pair at full speed. (The per_degree strategy multiplies three times U by construction.)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GRID = (14, 14)
CHANNELS = 768
DEGREES = (1, 3, 5)
INTERVAL = (0.0, 0.3)
THREADS = 2
SEED = 0
LOWP_DTYPE = "bfloat16"  # CPUs: float16 matmul is slow without float16 matrix units
MB = 2**20


# --------------------------------------------------------------------------- child side


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _tokens(n: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    return torch.randn(n, *GRID, CHANNELS, generator=g)


def straightforward(tokens, degrees=DEGREES, interval=INTERVAL):
    """The authors' way (SPEC §2–3): per degree, per image one cdist against all others."""
    import torch

    from musc_pipeline.core import lnamd, msm

    n, h, w, c = tokens.shape
    p = h * w
    keep = msm.interval_slice(n - 1, interval)
    out = torch.empty(len(degrees), n, p, dtype=torch.float64)
    for ri, r in enumerate(degrees):
        z = lnamd.aggregate(tokens, r).reshape(n, p, c)
        for i in range(n):
            others = torch.cat([z[:i], z[i + 1 :]]).reshape(-1, c)  # (N−1)·P × C
            d = torch.cdist(z[i], others)  # P × (N−1)·P
            d = d.reshape(p, n - 1, p).amin(dim=-1)  # nearest patch of each other image
            vals = torch.topk(d, keep.stop, dim=-1, largest=False, sorted=True).values
            out[ri, i] = vals[:, keep.start : keep.stop].double().mean(dim=-1)
    return out


ROW_CHUNK_RESULT_BUDGET = 64 * MB


def ours(tokens, strategy: str, memory_budget: int | None, result_budget: int | None = None, **options):
    from musc_pipeline.core import lnamd, msm

    kw = {} if memory_budget is None else {"memory_budget": memory_budget}
    if result_budget is not None:
        kw["result_budget"] = result_budget
    y = lnamd.layer_norm_map(tokens)
    return msm.scores_by_degree(y, DEGREES, INTERVAL, strategy=strategy, **kw, **options)


COUNTER = None  # the lowp_rerank child's candidate counter (one method per fresh process)


def lowp_rerank(tokens, memory_budget: int | None):
    """``precision="lowp_rerank"`` (bfloat16 products, float32 re-rank), counting candidates."""
    global COUNTER
    from musc_pipeline.core import msm_lowp

    COUNTER = msm_lowp.Candidates()
    import torch

    return ours(tokens, "auto", memory_budget, precision="lowp_rerank", lowp_dtype=getattr(torch, LOWP_DTYPE),
                counter=COUNTER)


def matmul_floor(tokens):
    """float32 matmuls with the useful FLOPs of one product per image pair."""
    import torch

    n, h, w, c = tokens.shape
    p = h * w
    a = tokens.reshape(n * p, c).contiguous()
    cols = (n - 1) * p // 2  # 2·(N·P)·C·cols = N(N−1)·P²·C
    chunk = 1024
    buf = torch.empty(n * p, chunk)
    done = 0
    while done < cols:
        k = min(chunk, cols - done)
        b = a[done : done + k]  # any C×k block of the same size does the same work
        torch.matmul(a, b.T, out=buf[:, :k])
        done += k
    return None


def peak_gflops(dtype_name: str = "float32", shape=(3072, 3072, 3072), repeat: int = 3) -> float:
    """Best GFLOP/s of an m×k @ k×n matmul in ``dtype_name`` (after one warm-up call)."""
    import torch

    dtype = getattr(torch, dtype_name)
    m, k, n = shape
    x, y = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.matmul(x, y, out=out)  # warm-up
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        torch.matmul(x, y, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def peaks() -> dict[str, dict[str, float]]:
    """Matmul peaks per precision: 3072³ and one MSM block pair (10 images of P = 196 against
    10, C = 768). float16 once, at the block shape only, on a CPU: it runs at a few GFLOP/s
    there (no float16 matrix units), a 3072³ product would take minutes."""
    import torch

    block = (1960, CHANNELS, 1960)
    cpu_half = not torch.cuda.is_available()
    return {name: {"3072³": None if name == "float16" and cpu_half else peak_gflops(name),
                   "block": peak_gflops(name, block, 1 if name == "float16" and cpu_half else 3)}
            for name in ("float32", "bfloat16", "float16")}


def child(method: str, n: int, memory_budget: int | None, repeat: int = 1) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    if method == "peak":
        return {"peaks": peaks(), "rss": _rss_mb()}
    fns = {
        "ours/lowp_rerank": lambda t: lowp_rerank(t, memory_budget),
        "straightforward": straightforward,
        "ours/per_degree": lambda t: ours(t, "per_degree", memory_budget),
        "ours/box_filter": lambda t: ours(t, "box_filter", memory_budget),
        "ours/row_chunks": lambda t: ours(t, "box_filter", memory_budget, ROW_CHUNK_RESULT_BUDGET),
        "matmul floor": matmul_floor,
    }
    fn = fns[method]
    fn(_tokens(6))  # warm-up: thread pools, kernels, allocator
    tokens = _tokens(n)
    base = _rss_mb()
    seconds = math.inf
    for _ in range(repeat):  # best of `repeat`: other processes on the CPUs only add time
        t = time.perf_counter()
        scores = fn(tokens)
        seconds = min(seconds, time.perf_counter() - t)
    peak = _rss_mb()
    return {
        "seconds": seconds,
        "rss": peak,
        "base": base,
        "scores": None if scores is None else scores.double().numpy(),
        "candidates": None if COUNTER is None else COUNTER.per_patch,
    }


def _run_fresh(method: str, n: int = 0, memory_budget: int | None = None, repeat: int = 1) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(child, (method, n, memory_budget, repeat))


# --------------------------------------------------------------------------- parent side


def cpu_flags() -> list[str]:
    """The matrix-engine flags of this CPU (AVX-512, AMX) from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "avx512_fp16", "amx")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 60 only, no memory-budget rows")
    ap.add_argument("--sizes", type=int, nargs="+", help="override the image counts")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timed calls per method")
    ap.add_argument("--scale", action="store_true",
                    help="large categories: our MSM alone at N = 100, 200, 400 (time and peak memory)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([100, 200, 400] if args.scale else [60] if args.quick else [60, 120])
    budgets_mb = [] if args.quick or args.scale else [8, 128]

    import numpy as np
    import torch

    from musc_pipeline.core import msm

    t_start = time.perf_counter()
    h, w = GRID
    p = h * w
    measured = _run_fresh("peak")["peaks"]
    peak = measured["float32"]["3072³"]
    print(
        f"MSM benchmark — P = {p} ({h}×{w}), C = {CHANNELS}, degrees {DEGREES}, interval {INTERVAL}, "
        f"float32, {THREADS} threads; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, best of {args.repeat}"
    )
    print(f"CPU flags: {' '.join(cpu_flags()) or '—'}")
    print("measured matmul peaks, GFLOP/s (best of 3; float16 on a CPU: one block, once):")
    for name, got in measured.items():
        cells = "  ".join(f"{shape} {'—' if v is None else f'{v:7.1f}'}" for shape, v in got.items())
        print(f"  {name:9} {cells}   ({got['block'] / measured['float32']['block']:.2f}× float32 at the block)")
    print("load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + "\n")

    header = ["N", "method", "budget", "seconds", "speed-up", "floor %", "peak RSS MB", "Δ RSS MB", "max |Δ score|",
              "|Δ| vs default", "cand./max"]
    rows: list[list[str]] = []
    largest = max(sizes)
    for n in sizes:
        useful = n * (n - 1) / 2 * 2 * p * p * CHANNELS
        floor_s = useful / (peak * 1e9)
        plan = [("straightforward", None), ("ours/per_degree", None), ("ours/box_filter", None),
                ("ours/lowp_rerank", None), ("matmul floor", None)]
        if args.scale:
            plan = [("ours/box_filter", None), ("ours/row_chunks", None)]
        if n == largest:
            plan += [("ours/box_filter", b * MB) for b in budgets_mb]
        results = {}
        for method, budget in plan:
            results[(method, budget)] = _run_fresh(method, n, budget, args.repeat)
        base = results.get(("straightforward", None))
        default_run = results.get(("ours/box_filter", None))

        def diff(r, against):
            if against is None or r["scores"] is None or r is against:
                return "—"
            return f"{np.abs(r['scores'] - against['scores']).max():.1e}"

        for method, budget in plan:
            r = results[(method, budget)]
            default = f"{msm.DEFAULT_MEMORY_BUDGET // MB} MB (default)" if method.startswith("ours") else "—"
            if method == "ours/row_chunks":
                default = f"result {ROW_CHUNK_RESULT_BUDGET // MB} MB"
            rows.append([
                str(n),
                method,
                f"{budget // MB} MB" if budget else default,
                f"{r['seconds']:.2f}",
                f"{base['seconds'] / r['seconds']:.1f}×" if base else "—",
                f"{100 * floor_s / r['seconds']:.0f}%",
                f"{r['rss']:.0f}",
                f"{r['rss'] - r['base']:.0f}",
                diff(r, base),
                diff(r, default_run),
                "—" if r["candidates"] is None else f"{r['candidates']:.1f}",
            ])
        print(f"N = {n}: useful FLOPs U = {useful / 1e9:.1f} GFLOP, floor at peak = {floor_s:.2f} s", flush=True)

    widths = [max(len(header[k]), *(len(row[k]) for row in rows)) for k in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(wd) if k not in (1, 2) else c.ljust(wd) for k, (c, wd) in enumerate(zip(cells, widths)))  # noqa: E731
    print()
    print(line(header))
    print(line(["-" * wd for wd in widths]))
    for row in rows:
        print(line(row))
    print(
        "\nspeed-up: straightforward seconds / method seconds. floor %: time of U at the measured "
        "peak / method seconds.\npeak RSS: ru_maxrss of the method's own fresh process; Δ RSS: "
        "growth during the timed call. max |Δ score|: vs straightforward, all degrees; |Δ| vs default:\n"
        f"vs ours/box_filter (exact_fp32, today's default). cand./max: lowp_rerank's candidates per maximum "
        f"(of {p} patches; symmetric blocks share them between a row and a column maximum)."
    )
    n = largest
    feats = n * p * CHANNELS * 4 / MB
    result = len(DEGREES) * n * p * n * 4 / MB
    print(
        f"per_degree multiplies once per degree (3·U FLOPs), so its floor % is at most 33 %. The memory\n"
        f"budget bounds only the similarity blocks; at N = {n} the unit features of one degree "
        f"(N·P·C float32 = {feats:.0f} MB) and the\nR×N×P×N result ({result:.0f} MB; row chunks bound it) "
        f"come on top and grow with N."
    )
    print("load average at end (1/5/15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg())
          + f" — other processes on these {os.cpu_count()} CPUs make timings noisy when it exceeds {THREADS}")
    print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
