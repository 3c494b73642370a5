"""Method variants in the Dagster graph: code versions (exactly the affected stages go stale)
and one materialization of a profile with every MuSc-V2 variant switched on."""

from __future__ import annotations

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance

from conftest import small_settings
from musc_pipeline.definitions import build_definitions
from musc_pipeline.settings import MethodSettings

STAGES = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
          "salient_features", "rscin_scores", "category_metrics"]


def _versions(tmp_path, root, **method) -> dict[str, str]:
    graph = build_definitions(small_settings(tmp_path, root, **method)).resolve_asset_graph()
    return {n: graph.get(AssetKey(["musc", n])).code_version for n in STAGES if graph.has(AssetKey(["musc", n]))}


@pytest.mark.parametrize(("before", "after", "changed"), [
    ({}, {"aggregation": "snamd"}, {"msm_scores"}),
    ({}, {"image_score": "topk_mean"}, {"anomaly_maps"}),
    ({"image_score": "topk_mean"}, {"image_score": "topk_mean", "image_score_q": 0.05}, {"anomaly_maps"}),
    ({}, {"image_score_q": 0.05}, set()),  # q only counts with topk_mean
    ({}, {"rescoring": "none"}, {"rscin_scores"}),
    ({}, {"rescoring": "rscon"}, {"rscin_scores"}),
    ({"rescoring": "rscon"}, {"rescoring": "rscon", "rscon_windows": (1, 5)}, {"rscin_scores"}),
    ({}, {"rscon_windows": (1, 5)}, set()),  # windows only count with rscon
    ({"rescoring": "rscon"}, {"rescoring": "rscon", "aggregation": "snamd"}, {"msm_scores", "salient_features"}),
])
def test_a_variant_changes_exactly_its_stages(tmp_path, mini_root, before, after, changed):
    v1, v2 = _versions(tmp_path, mini_root, **before), _versions(tmp_path, mini_root, **after)
    shared = v1.keys() & v2.keys()
    assert {n for n in shared if v1[n] != v2[n]} == changed


def test_salient_features_exist_only_with_rscon(tmp_path, mini_root):
    assert "salient_features" not in _versions(tmp_path, mini_root)
    assert "salient_features" in _versions(tmp_path, mini_root, rescoring="rscon")


def test_paper_defaults_name_no_variant():
    assert MethodSettings().variant("aggregation", "rescoring", "rscon_windows", "image_score", "image_score_q") == []
    with pytest.raises(ValueError):
        MethodSettings(image_score_q=0.0)


def test_materialize_every_v2_variant(tmp_path, mini_root):
    settings = small_settings(tmp_path, mini_root, aggregation="snamd", rescoring="rscon", image_score="topk_mean")
    defs = build_definitions(settings)
    job = defs.resolve_job_def("musc_categories")
    result = job.execute_in_process(partition_key="mini/cat1", instance=DagsterInstance.ephemeral(),
                                    asset_selection=[AssetKey(["musc", n]) for n in STAGES])
    assert result.success
    store = tmp_path / "store" / "musc"
    scores = pd.read_parquet(store / "rscin_scores" / "mini" / "cat1.parquet")
    assert (scores["rescoring"] == "rscon").all() and scores["rscin_windows"].iloc[0] == "[1, 7]"
    row = pd.read_parquet(store / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
    assert row["image_auroc"] > 0.8 and row["pixel_auroc"] > 0.8
