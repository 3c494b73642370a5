"""Static HTML report layer: what it is rendered from (:mod:`.inputs`), figures (:mod:`.figures`)
and pages (:mod:`.render`).

Pure functions, no Dagster: the report assets build :class:`RunData` and call
:func:`render_reports`.
"""

from .inputs import RunData, load_reference
from .paths import slug
from .render import BANNER, render_reports

__all__ = ["BANNER", "RunData", "load_reference", "render_reports", "slug"]
