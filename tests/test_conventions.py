"""The run page's conventions table: what a run did beside what the authors' code does."""

from __future__ import annotations

import math

import pandas as pd

from musc_pipeline.reports.conventions import NOT_RECORDED, conventions

PAPER_ON_CPU = {
    "backbone": "ViT-L-14-336", "image_size": 518, "random_init": False, "peak_gpu_mb": math.nan,
    "preprocess": "PIL bicubic resize of the RGB image to 518×518",
    "pos_embed_resize": "bicubic, align_corners=False, no antialias (authors)",
    "activation": "gelu", "precision": "float32", "mask_rule": "authors_mvtec",
    "rscin_precision": "float32", "subset_dealing": "n/a (one set)",
}


def _table(rows, layout="mvtec"):
    return {c["label"]: c for c in conventions(pd.DataFrame(rows), layout)}


def test_the_paper_configuration_on_cpu_follows_the_authors_everywhere():
    table = _table([PAPER_ON_CPU])
    assert len(table) == 7 and not any(c["differs"] for c in table.values())
    assert table["activation"]["authors"] == "gelu" and table["mask rule"]["authors"] == "authors_mvtec"


def test_each_departure_is_flagged():
    row = PAPER_ON_CPU | {"activation": "quick_gelu", "mask_rule": "nearest", "rscin_precision": "float64",
                          "subset_dealing": "balanced", "peak_gpu_mb": 7000.0}  # on a GPU: authors autocast
    flagged = {label for label, c in _table([row]).items() if c["differs"]}
    assert flagged == {"activation", "mask rule", "RsCIN precision", "subset dealing", "backbone precision"}
    assert _table([row])["backbone precision"]["authors"] == "float16_autocast"


def test_visa_layout_and_other_layouts_take_their_own_rule():
    assert _table([PAPER_ON_CPU | {"mask_rule": "authors_visa"}], "visa")["mask rule"]["differs"] is False
    other = _table([PAPER_ON_CPU | {"mask_rule": "nearest"}], "mvtec_loco")["mask rule"]
    assert other["authors"] == "nearest" and not other["differs"]


def test_rows_from_before_conventions_were_recorded_are_not_flagged():
    old = {k: v for k, v in PAPER_ON_CPU.items() if k not in ("preprocess", "pos_embed_resize", "precision")}
    table = _table([old])
    assert table["image resize"]["ours"] == NOT_RECORDED and not table["image resize"]["differs"]


def test_a_backbone_the_authors_never_ran_has_no_authors_value():
    row = PAPER_ON_CPU | {"backbone": "efficientnet_lite0", "image_size": 448, "pos_embed_resize": "n/a (CNN)",
                          "preprocess": "PIL bicubic resize of the RGB image to 448×448"}
    table = _table([row])
    assert table["image resize"]["authors"] == "—" and not table["image resize"]["differs"]
    assert table["mask rule"]["authors"] == "authors_mvtec"  # the metric conventions still apply


def test_nothing_materialized_lists_nothing():
    assert conventions(pd.DataFrame(columns=list(PAPER_ON_CPU)), "mvtec") == []
