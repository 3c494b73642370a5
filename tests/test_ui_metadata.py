"""What a newcomer sees in the Dagster UI (issue #25): study tables, check results, schedule and
sensor descriptions, rounded floats, figures labelled as figures."""

from __future__ import annotations

import pandas as pd

from musc_pipeline.assets.study_common import wide_results


def _long(settings: list[str], metrics: list[str]) -> pd.DataFrame:
    """A study's long table as study_output writes it (values: order + metric index / 10)."""
    return pd.DataFrame([{"profile": "musc", "study": "degrees", "setting": s, "setting_order": i, "dataset": "demo",
                          "category": "c", "metric": m, "value": i + j / 10}
                         for i, s in enumerate(settings) for j, m in enumerate(metrics)])


def test_study_results_table_has_one_row_per_setting_in_study_order():
    settings = ["{1}", "{3}", "{5}", "{1, 3}", "{1, 5}", "{3, 5}", "{1, 3, 5}", "{1, 3, 5, 7}", "{1, 3, 5, 7, 9}"]
    wide = wide_results(_long(settings, ["image_auroc", "pixel_auroc", "image_ap"]))
    assert list(wide["setting"]) == settings  # 9 rows, not 81
    assert list(wide.columns) == ["setting", "image_ap", "image_auroc", "pixel_auroc"]
    assert not wide.isna().any().any()
    assert wide.loc[3, "pixel_auroc"] == 3.1
