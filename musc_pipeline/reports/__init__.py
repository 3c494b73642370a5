"""Static HTML report layer: figures (:mod:`.figures`) and pages (:mod:`.render`).

Pure functions, no Dagster: the report assets build :class:`RunData` and call
:func:`render_reports`.
"""

from .paths import slug
from .render import BANNER, RunData, load_reference, render_reports

__all__ = ["BANNER", "RunData", "load_reference", "render_reports", "slug"]
