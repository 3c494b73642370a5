"""The paper's published numbers per category (reports/reference_results.csv), as fractions."""

from pathlib import Path

from musc_pipeline.core.metrics import METRIC_NAMES
from musc_pipeline.reports.inputs import load_reference

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "reports" / "reference_results.csv"


def reference_row(dataset: str, category: str) -> dict[str, float]:
    """The paper's numbers for a category (fractions), or {} where the paper has none."""
    ref = load_reference(REFERENCE_CSV)
    hit = ref[(ref["dataset"] == dataset) & (ref["category"] == category)]
    if hit.empty:
        return {}
    r = hit.iloc[0]
    return {k: float(r[k]) / 100.0 for k in METRIC_NAMES}
