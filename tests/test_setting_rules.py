"""Every setting of musc.yaml is checked when the code location loads: a bad value disables its
profile with one line naming the field and what is allowed (issue #25)."""

from __future__ import annotations

import logging

import pytest
import yaml
from dagster import AssetKey
from pydantic import ValidationError

from musc_pipeline.definitions import build_definitions
from musc_pipeline.settings import load_settings

#: (the profile's bad settings, the reason that must be given at load time)
BAD = [
    ({"method": {"degrees": [2]}},
     "method.degrees = [2] is not allowed: odd integers >= 1 (the LNAMD/SNAMD aggregation degrees r), at least one"),
    ({"method": {"degrees": []}}, "method.degrees = [] is not allowed: odd integers >= 1"),
    ({"method": {"rscon_windows": [0], "rescoring": "rscon"}},
     "method.rscon_windows = [0] is not allowed: integers >= 1 (RsCon window sizes k), at least one"),
    ({"method": {"rscin_windows": [1, 0]}}, "method.rscin_windows = [1, 0] is not allowed: integers >= 1"),
    ({"backbone": {"image_size": 17}},
     "backbone.image_size = 17 is not allowed: a positive multiple of 16 (the token stride of efficientnet_lite0)"),
    ({"backbone": {"name": "ViT-B-16", "weights": "random", "image_size": 232}},
     "backbone.image_size = 232 is not allowed: a positive multiple of 16 (the token stride of ViT-B-16)"),
    ({"backbone": {"name": "dinov2_vitb14", "weights": "random", "image_size": 230}},
     "backbone.image_size = 230 is not allowed: a positive multiple of 14 (the token stride of dinov2_vitb14)"),
    ({"method": {"interval": [0.5, 0.2]}}, "method.interval = [0.5, 0.2] is not allowed: [a, b] with 0 <= a <= b <= 1"),
    ({"method": {"interval": [0.0, 1.5]}}, "method.interval = [0.0, 1.5] is not allowed"),
    ({"method": {"subsets": 0}}, "method.subsets = 0 is not allowed: an integer >= 1"),
    ({"method": {"smoothing_sigma": -1}}, "method.smoothing_sigma = -1.0 is not allowed: a number >= 0"),
    ({"method": {"mode": "few_shot"}}, "method.references = None is not allowed: a folder of normal reference "
                                       "images, needed by mode few_shot"),
    ({"backbone": {"activation": "relu"}}, "backbone.activation = relu is not allowed: one of auto, gelu, quick_gelu"),
]


def _write(tmp_path, bad: dict, studies: dict | None = None):
    good = {"backbone": {"name": "efficientnet_lite0"}}
    bad_profile = {k: good.get(k, {}) | v for k, v in bad.items()} | {k: v for k, v in good.items() if k not in bad}
    cfg = {"storage": str(tmp_path / "store"), "reports_dir": str(tmp_path / "reports"),
           "datasets": {"mini": {"root": str(tmp_path / "data")}},
           "profiles": {"musc": good, "bad": bad_profile}} | ({"studies": studies} if studies else {})
    (tmp_path / "data").mkdir()
    path = tmp_path / "musc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("bad", "reason"), BAD, ids=[r.split(" = ")[0] + str(i) for i, (_, r) in enumerate(BAD)])
def test_bad_setting_disables_its_profile_at_load_with_one_line(tmp_path, monkeypatch, caplog, bad, reason):
    monkeypatch.setenv("MUSC_CONFIG", str(_write(tmp_path, bad)))
    with caplog.at_level(logging.WARNING):
        defs = build_definitions(load_settings())  # the code location loads
    expected = f"profile 'bad' in {tmp_path / 'musc.yaml'} is unusable: {reason}"
    (logged,) = [r.getMessage() for r in caplog.records if "'bad'" in r.getMessage()]
    assert logged.startswith(expected) and "\n" not in logged
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey(["bad", "category_metrics"])).description.startswith("UNUSABLE: " + expected)
    assert not graph.get(AssetKey(["musc", "category_metrics"])).description.startswith("UNUSABLE")


def test_paper_settings_and_multiples_of_the_stride_are_accepted(tmp_path, monkeypatch, caplog):
    fine = {"backbone": {"name": "ViT-B-16", "weights": "random", "image_size": 240},
            "method": {"degrees": [1, 3, 5], "interval": [0.3, 0.3], "subsets": 2, "rscin_windows": [1, 8, 9]}}
    monkeypatch.setenv("MUSC_CONFIG", str(_write(tmp_path, fine)))
    with caplog.at_level(logging.WARNING):
        build_definitions(load_settings())
    assert not [r for r in caplog.records if "unusable" in r.getMessage()]


def test_even_study_degree_stops_the_load_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSC_CONFIG", str(_write(tmp_path, {}, studies={"extra_degrees": [7, 8]})))
    with pytest.raises(ValidationError, match=r"studies.extra_degrees = \[7, 8\] is not allowed: odd integers >= 1"):
        load_settings()
