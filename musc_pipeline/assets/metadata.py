"""What the assets show in the UI and the logs: Markdown tables, previews, timings, progress."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, MetadataValue, TableColumn, TableSchema


def progress_logger(context: AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs one line per 10 %."""
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done >= total or done / total >= state["next"]:
            context.log.info(f"{what}: {done}/{total}")
            state["next"] = done / total + 0.1

    return report


#: Decimals of a float shown in the UI (metadata and Markdown tables); stored tables keep all.
DISPLAY_DECIMALS = 4


def display_float(value: float) -> MetadataValue:
    """A float for the UI, rounded: a sum of float64 terms shows 1.0, not 1.0000000000000002."""
    return MetadataValue.float(round(float(value), DISPLAY_DECIMALS))


def timing_metadata(timing: dict) -> dict:
    """A stage's timing as UI metadata (the GPU peak only where the stage ran on CUDA)."""
    return {k: display_float(v) for k, v in timing.items() if k != "seconds" and v is not None}


def _md_cell(value: object) -> str:
    text = f"{value:.{DISPLAY_DECIMALS}f}" if isinstance(value, float) else str(value)
    return html.escape(text, quote=False).replace("|", "\\|")  # category names may look like HTML


def md_table(df: pd.DataFrame) -> str:
    """A data frame as a Markdown table (floats to 4 decimals, HTML specials escaped)."""
    lines = ["| " + " | ".join(_md_cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def table_metadata(df: pd.DataFrame, describe: Callable[[str], str | None] = lambda name: None) -> dict:
    """Dagster's standard table metadata: row count and column schema (shown in the UI), each
    column described by ``describe(name)`` where it says something."""
    columns = [TableColumn(str(name), str(dtype), description=describe(str(name))) for name, dtype in df.dtypes.items()]
    return {"dagster/row_count": MetadataValue.int(len(df)),
            "dagster/column_schema": MetadataValue.table_schema(TableSchema(columns=columns))}


def _png_markdown(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.05)
    return f"**Figure: {alt}**\n\n![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def map_preview_png(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, title: str) -> str:
    """Image, anomaly map and ground-truth mask side by side, as a Markdown image (data URI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", image, None), ("anomaly map", amap, "jet")]
    panels.append(("mask", mask, "gray") if mask is not None else ("mask", np.zeros_like(amap), "gray"))
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), dpi=80)
    for ax, (name, data, cmap) in zip(axes, panels):
        ax.imshow(data, cmap=cmap)
        ax.set_title(name if name != "mask" or mask is not None else "mask (none)", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    try:
        return _png_markdown(fig, "image, anomaly map and mask")
    finally:
        plt.close(fig)


def figure_markdown(path: str | Path, title: str, width: int = 900) -> str:
    """A saved figure, scaled down to ``width`` pixels, as a Markdown image (data URI) under a
    "Figure: <title>" caption (the UI shows Markdown behind a "Show Markdown" link)."""
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((width, width * 4))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", optimize=True)
    return f"**Figure: {title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
