"""What the UI shows: escaped Markdown tables, table schemas, side-by-side previews."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from PIL import Image

from musc_pipeline.assets.metadata import figure_markdown, map_preview_png, md_table, table_metadata


def _png(markdown: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(markdown.split("base64,", 1)[1].rstrip(")"))))


def test_markdown_table_escapes_html_like_category_names():
    table = md_table(pd.DataFrame({"category": ["<script>x</script>", "a|b & c"], "image_auroc": [1.0, 0.5]}))
    assert "&lt;script&gt;x&lt;/script&gt;" in table and "<script>" not in table
    assert "a\\|b &amp; c" in table and "| 1.0000 |" in table


def test_table_metadata_has_row_count_and_column_schema():
    meta = table_metadata(pd.DataFrame({"category": ["a", "b"], "score": [0.1, 0.2]}))
    assert meta["dagster/row_count"].value == 2
    columns = meta["dagster/column_schema"].schema.columns
    assert [c.name for c in columns] == ["category", "score"] and columns[1].type == "float64"


def test_preview_shows_image_map_and_mask_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    amap = rng.random((32, 32)).astype(np.float32)
    preview = _png(map_preview_png(image, amap, amap > 0.5, "img_1: highest image score"))
    assert preview.width > 2.5 * preview.height  # three panels in a row
    path = tmp_path / "fig.png"
    Image.new("RGB", (2000, 500), "white").save(path)
    assert _png(figure_markdown(path, width=900)).size == (900, 225)
