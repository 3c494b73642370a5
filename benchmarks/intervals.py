"""Cost of the intervals and of a paired comparison, on categories a run has stored.

For every profile and category with a ``category_metrics`` row and a score-history run in the
storage of ``musc.yaml`` (``$MUSC_CONFIG``; after ``make demo``), it times what
``category_metrics`` adds — the per-image counts and the intervals of all 7 metrics
(``core/uncertainty``) with the configured B — against that category's run time: its stages'
stored timings (features + MSM + maps, ``*_ms_per_image`` × images) plus the exact metrics
recomputed here. It prints how far the binned pixel AP / F1-max replicates at w = 1 are from
the exact values, then times the paired comparison of the first two profiles over all shared
categories (the comparison page), and prints the headline with intervals and the significant
deltas.

Run:  .venv/bin/python benchmarks/intervals.py
      MUSC_CONFIG=/tmp/demo/musc.yaml .venv/bin/python benchmarks/intervals.py --resamples 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from musc_pipeline.assets.metric_intervals import resampling  # noqa: E402
from musc_pipeline.assets.paired_runs import paired_profiles, run_masks  # noqa: E402
from musc_pipeline.assets.partitions import partition_keys  # noqa: E402
from musc_pipeline.core import maps, metrics  # noqa: E402
from musc_pipeline.core.uncertainty import category  # noqa: E402
from musc_pipeline.core.uncertainty.delong import Estimate  # noqa: E402
from musc_pipeline.resources.score_history import ScoreHistory  # noqa: E402
from musc_pipeline.settings import load_settings  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _ci(e: Estimate) -> str:
    return f"{100 * e.value:5.1f} [{100 * e.lo:5.1f}, {100 * e.hi:5.1f}]"


def category_cost(settings, profile: str, partition: str, how: category.Resampling) -> dict | None:
    """One row of the cost table (None when the category has no stored run)."""
    run = ScoreHistory(settings.storage).latest(profile, partition)
    row_file = Path(settings.storage) / profile / "category_metrics" / f"{partition}.parquet"
    if run is None or not row_file.is_file():
        return None
    stored = pd.read_parquet(row_file).iloc[0]
    masks = run_masks(settings, profile, partition, run)
    patch = torch.from_numpy(run.patch_maps)
    full = maps.anomaly_maps(patch.flatten(1), tuple(patch.shape[1:]), run.image_size, run.smoothing_sigma).numpy()
    point, evaluate_s = _timed(lambda: metrics.image_metrics(run.labels, run.scores).values
                               | metrics.pixel_metrics(masks, full).values)
    stages_s = sum(float(stored[f"{s}_ms_per_image"]) for s in ("features", "msm", "maps")) * len(run.labels) / 1000
    scores, counts_s = _timed(lambda: category.score_set(run.scores, masks, full, how))
    est, intervals_s = _timed(lambda: category.intervals(run.labels, scores, point, how))
    at_one = scores.pixels.replicates(np.ones((1, len(run.labels))))
    run_s = stages_s + evaluate_s
    return {"profile": profile, "category": partition.split("/", 1)[1], "images": len(run.labels),
            "run s": run_s, "counts s": counts_s, "intervals s": intervals_s,
            "added %": 100 * (counts_s + intervals_s) / run_s,
            "AP bin err": abs(float(at_one["pixel_ap"][0]) - point["pixel_ap"]),
            "F1 bin err": abs(float(at_one["pixel_f1_max"][0]) - point["pixel_f1_max"]), "estimates": est}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resamples", type=int, default=None, help="B (default: the settings' intervals.resamples)")
    args = ap.parse_args()
    settings = load_settings()
    if args.resamples:
        settings = settings.model_copy(update={"intervals": settings.intervals.model_copy(update={"resamples": args.resamples})})
    how = resampling(settings.intervals)
    rows = [r for p in settings.profiles for k in partition_keys(settings)
            if (r := category_cost(settings, p, k, how)) is not None]
    if not rows:
        print(f"no stored runs with a score history under {settings.storage}: run `make demo` first", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows)
    print(f"B = {how.resamples}, bins = {how.bins}, torch threads = {torch.get_num_threads()}")
    print(table.drop(columns="estimates").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nheadline (×100, 95 % interval; mean: mean ± z·sqrt(Σ se²)/C)")
    for profile, part in table.groupby("profile", sort=False):
        for k in ("image_auroc", "pixel_auroc", "pixel_pro"):
            cells = [f"{c}: {_ci(e[k])}" for c, e in zip(part["category"], part["estimates"])]
            mean = category.mean_over_categories([e[k] for e in part["estimates"]], how.level)
            print(f"  {profile:12s} {k:12s} " + "  ".join(cells) + f"  mean: {_ci(mean)}")
    profiles = list(dict.fromkeys(table["profile"]))
    if len(profiles) >= 2:
        paired, paired_s = _timed(lambda: paired_profiles(settings, profiles[0], profiles[1]))
        shared = paired["category"].nunique()
        print(f"\npaired {profiles[1]} − {profiles[0]} over {shared} categories: {paired_s:.1f} s (budget 60 s)")
        sig = paired[(paired["lo"] > 0) | (paired["hi"] < 0)]
        print(f"significant deltas: {len(sig)} of {len(paired)}")
        print(paired.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
