"""Stage benchmark: time per image and peak memory of every stage of MuSc on one category.

Default workload: the paper's configuration (ViT-L-14-336 at 518 px, random weights: timing
and memory do not depend on the weights), N = 100 and 200 synthetic images, s = 1, on the
device ``auto`` picks (CUDA when present). The paper reports 998.8 ms per image and 7168 MB
of GPU memory at s = 1 (appendix A.4, GPU not named).

Run:  .venv/bin/python benchmarks/stages.py                              (paper configuration)
      .venv/bin/python benchmarks/stages.py --precision float16 --subsets 1 3
      .venv/bin/python benchmarks/stages.py --backbone efficientnet_lite0 --image-size 448
      .venv/bin/python benchmarks/stages.py --quick                      (ViT-B-16 @224, N = 6)

Stages, each the very call its Dagster asset makes:

- ``features``: ``ModelRuntime.embed``, what the model resource runs (resize and normalise,
  forward pass, 4 stage taps and the class token, copied back to the host), batch size
  ``auto`` unless ``--batch-size``;
- ``lnamd``: ``lnamd.layer_norm_map`` of each tap (the r×r aggregation is formed on the
  device inside MSM, one degree at a time);
- ``msm``: ``msm.score_stages``, all 4 stages × degrees (1, 3, 5), each subset on its own;
- ``maps``: ``maps.from_msm_scores`` (mean over stages and degrees, bilinear to S×S, max);
- ``rscin``: ``rscin.rescore`` over the class-token graph.

Images are random RGB (1024² uint8, seeded), made before timing: decoding files is I/O and
not counted. Needs torch, torchvision, open_clip_torch, timm, pydantic and PyYAML, not Dagster. Each configuration runs in a fresh spawned process, so "peak RSS" is its own.
"GPU alloc" is torch's peak allocated memory over all stages (the model included);
"GPU reserved" is the caching allocator's peak, closer to what nvidia-smi shows. With
``--precision float16`` (or ``lowp_rerank``, ``auto``: ``msm_precision``) the table also gives
the largest difference of the image scores from exact_fp32 MSM on the same features, and their Spearman rank correlation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = ("features", "lnamd", "msm", "maps", "rscin")
SOURCE_SIZE = 1024
PAPER = {1: (998.8, 7168), 2: (605.8, 5666), 3: (513.5, 5026)}  # s: (ms/image, GPU MB), ViT-L-14-336


def _images(n: int, size: int = SOURCE_SIZE):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def child(backbone: str, image_size: int | None, n: int, subsets_: int, precision: str, device: str,
          batch_size: int, threads: int) -> dict:
    import numpy as np
    import torch

    from musc_pipeline.core import lnamd, maps, msm, rscin, subsets
    from musc_pipeline.resources.model import ModelRuntime, measure
    from musc_pipeline.settings import BackboneSettings

    if threads:
        torch.set_num_threads(threads)
    model = ModelRuntime(device=device, msm_precision=precision, batch_size=batch_size)
    dev = model.torch_device
    settings = BackboneSettings(name=backbone, weights="random", image_size=image_size)
    _, identity = model.extractor(settings)  # loading is not a stage
    images = _images(n)
    model.embed(settings, images[:2], 2)  # warm-up: kernels, allocator, thread pools

    measured, out, gpu_peaks = {}, {}, []

    def record_gpu_peaks() -> None:  # before the next device stage resets the counters
        if dev.type == "cuda":
            gpu_peaks.append((torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)))

    emb = model.embed(settings, images, n)
    measured["features"] = emb.measured
    record_gpu_peaks()
    with measure(torch.device("cpu")) as measured["lnamd"]:
        ys = [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps]
    groups = subsets.divide(["good"] * n, subsets_)

    def run_msm(options):
        return msm.score_stages(ys, groups, device=dev, memory_budget=model.msm_memory_budget,
                                result_budget=model.msm_result_budget_mb * 2**20, **options)

    options = model.msm_options  # auto: the peaks are measured here, outside the timing
    with measure(dev) as measured["msm"]:
        scores = run_msm(options)
    record_gpu_peaks()
    with measure(torch.device("cpu")) as measured["maps"]:
        _, image = maps.from_msm_scores(scores, ys[0].shape[1:3], identity.image_size)
    with measure(torch.device("cpu")) as measured["rscin"]:
        rscin.rescore(image, torch.from_numpy(emb.class_tokens))
    if gpu_peaks:  # maps and RsCIN run on the host
        out["gpu_alloc"] = max(a for a, _ in gpu_peaks) / 2**20
        out["gpu_reserved"] = max(r for _, r in gpu_peaks) / 2**20
    if options != {"dtype": torch.float32, "precision": "exact_fp32"}:  # against exact_fp32 on the same features
        from scipy.stats import spearmanr

        _, ref = maps.from_msm_scores(run_msm({}), ys[0].shape[1:3], identity.image_size)
        out["max_diff"] = float((image - ref).abs().max())
        out["spearman"] = float(spearmanr(image.numpy(), ref.numpy()).statistic)
    out |= {
        "ms": {k: 1000 * m.seconds / n for k, m in measured.items()},
        "rss": max(m.peak_rss_mb for m in measured.values()),
        "batch": emb.batch_size,
        "dtype": str(model.msm_dtype).removeprefix("torch.") if options["precision"] == "exact_fp32"
        else f"lowp_rerank ({str(options['lowp_dtype']).removeprefix('torch.')})",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, {torch.get_num_threads()} threads",
        "grid": "×".join(map(str, ys[0].shape[1:3])),
        "channels": [int(t.shape[-1]) for t in emb.taps],
        "image_size": identity.image_size,
        "finite": bool(np.isfinite(scores.numpy()).all()),
    }
    return out


def _run_fresh(*args) -> dict:
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(child, args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="ViT-L-14-336")
    ap.add_argument("--image-size", type=int, default=None, help="default: the backbone's (518 for the paper's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200], help="images per category (N)")
    ap.add_argument("--subsets", type=int, nargs="+", default=[1], help="subset counts s (SPEC §6)")
    ap.add_argument("--precision", choices=["exact_fp32", "lowp_rerank", "auto", "float32", "float16"], default="exact_fp32",
                    help="MSM similarities (float16 is used on GPUs only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the resource's auto batch size")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: ViT-B-16 at 224 px, N = 6")
    args = ap.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.sizes = "ViT-B-16", 224, [6]

    import torch

    t_start = time.perf_counter()
    rows, first = [], None
    for n in args.sizes:
        for s in args.subsets:
            r = _run_fresh(args.backbone, args.image_size, n, s, args.precision, args.device,
                           args.batch_size, args.threads)
            if not r["finite"]:
                raise SystemExit(f"N = {n}, s = {s}: MSM produced non-finite scores")
            first = first or r
            ms = r["ms"]
            rows.append([
                str(n), str(s), r["dtype"], str(r["batch"]), *(f"{ms[k]:.1f}" for k in STAGES),
                f"{sum(ms.values()):.1f}",
                f"{r['gpu_alloc']:.0f}" if "gpu_alloc" in r else "—",
                f"{r['gpu_reserved']:.0f}" if "gpu_reserved" in r else "—",
                f"{r['rss']:.0f}",
                f"{r['max_diff']:.1e} / {r['spearman']:.4f}" if "max_diff" in r else "—",
            ])
            print(f"done: N = {n}, s = {s} ({time.perf_counter() - t_start:.0f} s so far)", flush=True)

    print(f"\nStage benchmark — {args.backbone} at {first['image_size']} px (random weights), grid {first['grid']}, "
          f"tap channels {first['channels']}, degrees (1, 3, 5), interval (0, 0.3)")
    print(f"device: {first['device']}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; images {SOURCE_SIZE}² random RGB\n")
    header = ["N", "s", "MSM dtype", "batch", *(f"{k} ms" for k in STAGES), "total ms/img",
              "GPU alloc MB", "GPU reserved MB", "peak RSS MB", "fp16 max|Δ| / ρ"]
    widths = [max(len(header[k]), *(len(row[k]) for row in rows)) for k in range(len(header))]
    for cells in (header, ["-" * w for w in widths], *rows):
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    print("\nms columns: milliseconds per image of each stage (wall time / N); total: their sum.")
    print("paper (appendix A.4, ViT-L-14-336 at 518 px, GPU not named): "
          + "; ".join(f"s = {s}: {ms} ms/image, {mb} MB" for s, (ms, mb) in PAPER.items()))
    print(f"\ntotal benchmark time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
