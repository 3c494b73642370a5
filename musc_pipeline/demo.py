"""``make demo``: materialize every category of every profile through Dagster, then the report.

Runs in one process (``execute_in_process``) against the persistent instance in
``$DAGSTER_HOME`` (default ``.dagster_home``), so the runs, materializations and check results
show up in ``dagster dev`` afterwards, and each backbone is loaded once.
"""

import os
import sys
import time
from pathlib import Path

import pandas as pd


def main() -> int:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    from dagster import DagsterInstance

    from musc_pipeline.assets.partitions import partition_keys
    from musc_pipeline.definitions import defs
    from musc_pipeline.settings import load_settings

    settings = load_settings()
    instance = DagsterInstance.get()
    keys = partition_keys(settings)
    if not keys:
        print(f"no categories found under {[d.root for d in settings.datasets.values()]}", file=sys.stderr)
        return 1
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    for profile in settings.profiles:
        job = defs.resolve_job_def(f"{profile}_categories")
        for key in keys:
            start = time.perf_counter()
            result = job.execute_in_process(partition_key=key, instance=instance, run_config=quiet, raise_on_error=True)
            print(f"[{profile}] {key}: {'ok' if result.success else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    defs.resolve_job_def("reports").execute_in_process(instance=instance, run_config=quiet, raise_on_error=True)

    rows = []
    for profile in settings.profiles:
        df = pd.read_parquet(Path(settings.storage) / profile / "metrics_table.parquet")
        for r in df.itertuples():
            rows.append({"profile": profile, "dataset": r.dataset, "category": r.category, "backbone": r.backbone,
                         "image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "pixel_pro": r.pixel_pro})
    table = pd.DataFrame(rows)
    mean = table.groupby(["profile", "backbone"], as_index=False)[["image_auroc", "pixel_auroc", "pixel_pro"]].mean()
    mean["dataset"], mean["category"] = "all", "mean"
    table = pd.concat([table, mean], ignore_index=True)
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print(f"\nReport: {Path(settings.reports_dir) / 'index.html'}")
    print(f"Results: {settings.storage} (DuckDB catalog: {Path(settings.storage) / 'catalog.duckdb'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
