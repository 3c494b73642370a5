"""The conventions a run used, beside the authors' (SPEC §1, §5, §6), for the run pages.

Every ``category_metrics`` row records how its features and metrics were made: the image
resize, the position-embedding resize, the activation, the backbone's precision, the mask
rule, RsCIN's precision and the subset dealing. :func:`conventions` lists them for one
dataset of one run with what the authors' code does in the same situation, and flags each
one that differs — a difference in the report then comes from data or weights, or from a
convention the page names.
"""

from __future__ import annotations

import math

import pandas as pd

from musc_pipeline.core import backbone as bb
from musc_pipeline.core.preprocess import resize_description, resolve_mask_rule
from musc_pipeline.core.registry import BACKBONES

NOT_RECORDED = "not recorded (materialized before conventions were recorded)"


def _authors(row: dict, layout: str) -> dict[str, str | None]:
    """What the authors' code does for this row's backbone, size, device and layout (None: no such case)."""
    spec = BACKBONES.get(str(row.get("backbone")))
    size = int(row.get("image_size") or 0)
    theirs = spec is not None and spec.family != "efficientnet_lite"  # the authors ship no CNN
    on_gpu = not _missing(row.get("peak_gpu_mb"))
    if not theirs:
        pos = None
    elif size == spec.native_size or bool(row.get("random_init")):
        pos = row.get("pos_embed_resize")  # nothing is resized: same either way
    else:
        pos = "bicubic, align_corners=False, no antialias (authors)"
    return {
        "image resize": resize_description(spec.interpolation, size) if theirs else None,
        "position embeddings": pos,
        "activation": bb.resolve_activation(spec, size, "auto") if theirs else None,
        "backbone precision": ("float16_autocast" if on_gpu else "float32") if theirs else None,
        "mask rule": resolve_mask_rule("auto", layout),
        "RsCIN precision": "float32",
        "subset dealing": "authors" if str(row.get("subset_dealing", "")).startswith(("authors", "balanced")) else "n/a (one set)",
    }


_COLUMNS = {  # label -> metrics-row column
    "image resize": "preprocess",
    "position embeddings": "pos_embed_resize",
    "activation": "activation",
    "backbone precision": "precision",
    "mask rule": "mask_rule",
    "RsCIN precision": "rscin_precision",
    "subset dealing": "subset_dealing",
}


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def conventions(rows: pd.DataFrame, layout: str) -> list[dict[str, object]]:
    """One entry per convention: label, ours (distinct values over the rows), authors', differs.

    No rows (nothing materialized yet): no entries."""
    if rows.empty:
        return []
    out = []
    records = rows.to_dict("records")
    for label, column in _COLUMNS.items():
        ours = sorted({NOT_RECORDED if _missing(r.get(column)) else str(r[column]) for r in records})
        authors = sorted({str(a) for r in records if (a := _authors(r, layout)[label]) is not None})
        differs = bool(authors) and NOT_RECORDED not in ours and ours != authors
        out.append({"label": label, "ours": "; ".join(ours), "authors": "; ".join(authors) or "—", "differs": differs})
    return out
