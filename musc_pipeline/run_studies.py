"""``make studies``: every ablation study for every category, then the study pages.

Runs after ``make demo`` (the pipeline's stages must be materialized), in one process against
the same instance (``$DAGSTER_HOME``), so the runs show up in ``dagster dev``. Prints each
study's table (mean over categories) and the time of the re-aggregation sweep against one
category's MSM.
"""

import os
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd

#: The sweeps timed against MSM: the issue's (interval starts and RsCIN variants), and every
#: re-aggregation study (MSM variants and selection percentages as well).
SWEEPS = {"interval + RsCIN": ("interval_start", "rscin"),
          "all re-aggregation": ("msm_variants", "percentage", "interval_start", "rscin")}


def sweep_timing(storage: Path, studies: tuple[str, ...]) -> pd.DataFrame:
    """Per profile: the seconds of ``studies`` over all categories (re-aggregation, maps and RsCIN;
    the metrics apart), one category's MSM seconds (the mean category), and both ratios."""
    con = duckdb.connect(str(storage / "catalog.duckdb"), read_only=True)
    try:
        return con.execute("""
            WITH sweep AS (
              SELECT profile, count(DISTINCT category) AS categories,
                     sum(value) FILTER (WHERE metric IN ('reaggregate_s', 'rescore_s')) AS sweep_s,
                     sum(value) FILTER (WHERE metric = 'evaluate_s') AS metrics_s
              FROM ablation_results WHERE list_contains(?, study) GROUP BY profile),
            msm AS (
              SELECT profile, avg(msm_ms_per_image * n_images) / 1000 AS msm_s_per_category
              FROM category_metrics GROUP BY profile)
            SELECT sweep.*, msm.msm_s_per_category, sweep_s / msm.msm_s_per_category AS sweep_over_msm,
                   (sweep_s + metrics_s) / msm.msm_s_per_category AS with_metrics_over_msm
            FROM sweep JOIN msm USING (profile) ORDER BY profile""", [list(studies)]).df()
    finally:
        con.close()


def main() -> int:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    from dagster import DagsterInstance

    from musc_pipeline.assets.partitions import partition_keys
    from musc_pipeline.definitions import defs
    from musc_pipeline.resources.storage import rebuild_catalog
    from musc_pipeline.settings import load_settings

    settings = load_settings()
    instance = DagsterInstance.get()
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    job = defs.resolve_job_def("studies")
    for key in partition_keys(settings):
        start = time.perf_counter()
        result = job.execute_in_process(partition_key=key, instance=instance, run_config=quiet, raise_on_error=True)
        print(f"studies {key}: {'ok' if result.success else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    defs.resolve_job_def("study_report").execute_in_process(instance=instance, run_config=quiet, raise_on_error=True)
    rebuild_catalog(settings.storage)

    con = duckdb.connect(str(Path(settings.storage) / "catalog.duckdb"), read_only=True)
    try:
        table = con.execute("""
            SELECT profile, study, setting, dataset, metric, round(100 * avg(value), 1) AS mean_x100
            FROM ablation_results WHERE metric IN ('image_auroc', 'image_f1_max', 'image_ap', 'pixel_auroc')
            GROUP BY ALL ORDER BY profile, study, min(setting_order), metric""").df()
    finally:
        con.close()
    wide = table.pivot_table(index=["profile", "study", "dataset", "setting"], columns="metric", values="mean_x100",
                             sort=False)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(wide.to_string())
        for name, studies in SWEEPS.items():
            print(f"\nSweep {name} ({', '.join(studies)}) vs one category's MSM:")
            print(sweep_timing(Path(settings.storage), studies).round(3).to_string(index=False))
    print(f"\nStudy pages: {Path(settings.reports_dir) / 'studies.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
