"""What the assets show in the UI and the logs: Markdown tables, previews, timings, progress."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pandas as pd
from dagster import AssetExecutionContext, MetadataValue


def progress_logger(context: AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs one line per 10 %."""
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done >= total or done / total >= state["next"]:
            context.log.info(f"{what}: {done}/{total}")
            state["next"] = done / total + 0.1

    return report


def timing_metadata(timing: dict) -> dict:
    """A stage's timing as UI metadata (the GPU peak only where the stage ran on CUDA)."""
    return {k: MetadataValue.float(float(v)) for k, v in timing.items() if k != "seconds" and v is not None}


def md_table(df: pd.DataFrame) -> str:
    """A data frame as a Markdown table (floats to 4 decimals)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def map_preview_png(amap: np.ndarray) -> str:
    """A small anomaly-map preview as a Markdown image (data URI), for the UI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6, 1.6), dpi=64)
    ax.imshow(amap, cmap="jet")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return f"![anomaly map](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"
