"""Study benchmark: the re-aggregation sweep (issue #12's speed target) against one category's MSM.

The issue's sweep is the interval starts (Tab. 10, 6 settings) re-aggregated from the stored
sorted similarities, each setting's maps, image scores and RsCIN, and the RsCIN study's 6 window
settings — all with the studies' metrics (image AUROC, F1-max, AP; pixel AUROC). The target: for
the demo's three categories that sweep takes under 10 % of one category's MSM. ``--studies``
adds the other re-aggregation studies (the MSM variants and the selection percentages: all three
are 22 settings, re-aggregated in one pass as the ``msm_reaggregation`` multi-asset does).

Workload: synthetic LNAMD maps at a profile's shapes (``--shape random_vit``: ViT-B-16, 14×14
grid, 768 channels per stage, 224 px; ``--shape musc``: EfficientNet-Lite0 at 448 px, 28×28
grid, 24/40/112/320 channels), N = 96 images per category as in each demo category, masks with
a defect rectangle in half of the images. The cost of every step depends on the shapes, not on
the values. MSM is ``msm.score_stages`` (what ``msm_scores`` runs), once. The C kernels
(:mod:`musc_pipeline.core.native`) are compiled before any timing, as a long-running process
has them; each Dagster step compiles its own (≈ 0.3 s for the studies' two, 1.6 s for MSM's).
The sorted similarities are made once with ``ablation.sorted_similarities`` (the
``msm_similarities`` study input, not part of the sweep) and written to a safetensors file,
which each study loads as its asset does. The demo's three
categories have the same shapes (96 images each), so the sweep runs three times on one
category's similarities.

Run:  .venv/bin/python benchmarks/studies.py --shape musc         (the default profile's shapes, 3 categories)
      .venv/bin/python benchmarks/studies.py --shape musc --studies interval_start msm_variants percentage
      .venv/bin/python benchmarks/studies.py --threads 1          (random_vit shapes, 1 torch thread)
      .venv/bin/python benchmarks/studies.py --images 12 --categories 1   (a quick smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from musc_pipeline.core import ablation, auroc, lnamd, maps, msm, reaggregate_kernel, rscin

SHAPES = {  # grid, channels per stage, image size
    "random_vit": (14, (768, 768, 768, 768), 224),
    "musc": (28, (24, 40, 112, 320), 448),
}
DEGREES, INTERVAL, WINDOWS = (1, 3, 5), (0.0, 0.3), (1, 2, 3)
REDUCTION_STUDIES = {"msm_variants": ablation.MSM_VARIANTS, "percentage": ablation.PERCENTAGES,
                     "interval_start": ablation.INTERVAL_STARTS}


def category(n: int, grid: int, channels: tuple[int, ...], size: int, seed: int):
    """Synthetic LNAMD maps (L × N×h×w×C), unit class tokens, labels and masks of one category."""
    g = torch.Generator().manual_seed(seed)
    ys = [lnamd.layer_norm_map(torch.randn(n, grid, grid, c, generator=g)) for c in channels]
    tokens = torch.nn.functional.normalize(torch.randn(n, 768, generator=g), dim=1)
    labels = (np.arange(n) >= n // 2).astype(int)
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        masks[i, size // 4 : size // 2, size // 3 : size // 2] = True
    return ys, tokens, labels, masks


def sweep(sims_file: Path, studies: list[str], grid: int, size: int, tokens, labels, masks) -> dict[str, float]:
    """One category's sweep of ``studies`` and RsCIN, as the study assets run it; seconds per step."""
    t = dict.fromkeys(("load", "reaggregate", "maps_rscin", "metrics"), 0.0)
    t0 = time.perf_counter()
    stored = load_file(str(sims_file))
    t1 = time.perf_counter()
    all_scores = ablation.reaggregate(stored["similarities"], stored["pool"],
                                      {k: r for study in studies for k, r in REDUCTION_STUDIES[study].items()})
    t["load"], t["reaggregate"] = t1 - t0, time.perf_counter() - t1
    t2 = time.perf_counter()  # as CategoryTruth: RsCIN's operators and a scratch for the maps, shared by the settings
    rescoring, maps_out = rscin.neighbourhoods(tokens, WINDOWS), torch.empty(len(labels), size, size)
    t["maps_rscin"] += time.perf_counter() - t2
    for scores in all_scores.values():
        out = ablation.evaluate(scores, (grid, grid), size, rescoring, labels, masks, maps_out=maps_out)
        t["maps_rscin"] += out["rescore_s"]
        t["metrics"] += out["evaluate_s"]
    # the RsCIN study: every window setting on one column of image scores (its cost depends on N only)
    c = maps.from_msm_scores(torch.rand(len(labels), 1, 1, grid * grid), (grid, grid), size)[1]
    for windows in ablation.rscin_settings(WINDOWS).values():
        t0 = time.perf_counter()
        final = ablation.rescore(c, tokens, windows)
        t1 = time.perf_counter()
        ablation.score_metrics(labels, final.numpy())
        t["maps_rscin"] += t1 - t0
        t["metrics"] += time.perf_counter() - t1
    return t | {"total": sum(t.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="random_vit")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--categories", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--studies", nargs="+", choices=sorted(REDUCTION_STUDIES), default=["interval_start"],
                        help="re-aggregation studies in the sweep (RsCIN's is always in it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid, channels, size = SHAPES[args.shape]
    warm = category(4, 3, (8,), 16, 0)[0]
    msm.score_stages(warm, [np.arange(4)], DEGREES, INTERVAL)  # compiles the C kernels outside the timing
    auroc.load(), reaggregate_kernel.load()

    ys, tokens, labels, masks = category(args.images, grid, channels, size, seed=0)
    groups = [np.arange(args.images)]
    t0 = time.perf_counter()
    msm.score_stages(ys, groups, DEGREES, INTERVAL)
    msm_s = time.perf_counter() - t0
    sims, pool = ablation.sorted_similarities(ys, groups, DEGREES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sims_file = Path(tmp) / "msm_similarities.safetensors"
        save_file({"similarities": sims, "pool": pool}, str(sims_file))
        del sims
        for k in range(args.categories):  # same shapes, so one category's similarities serve each
            rows.append(sweep(sims_file, args.studies, grid, size, tokens, labels, masks))
            print(f"category {k + 1}: sweep {rows[-1]['total']:.2f} s", flush=True)

    print(f"\n{args.shape} shapes: N = {args.images}, {grid}×{grid} grid, {size} px, {torch.get_num_threads()} "
          f"torch thread(s); "
          f"one category's MSM (msm.score_stages): {msm_s:.1f} s\n")
    cols = ("load", "reaggregate", "maps_rscin", "metrics", "total")
    print(f"{'category':<10}" + "".join(f"{c + ' s':>15}" for c in cols) + f"{'% of MSM':>10}")
    for k, r in enumerate(rows + [{c: sum(r[c] for r in rows) for c in cols}]):
        name = "all" if k == len(rows) else str(k + 1)
        print(f"{name:<10}" + "".join(f"{r[c]:>15.3f}" for c in cols) + f"{100 * r['total'] / msm_s:>10.1f}")
    settings = sum(len(REDUCTION_STUDIES[s]) for s in args.studies)
    print(f"\n{' + '.join(args.studies)} ({settings} settings) + rscin ({len(ablation.rscin_settings(WINDOWS))} settings): "
          f"the sweep of {len(rows)} categories = {100 * sum(r['total'] for r in rows) / msm_s:.1f} % "
          f"of one category's MSM (target: < 10 %)")


if __name__ == "__main__":
    main()
