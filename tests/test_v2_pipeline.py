"""Method variants in the Dagster graph: code versions (exactly the affected stages go stale)
and one materialization of a profile with every MuSc-V2 variant switched on."""

from __future__ import annotations

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance

from conftest import small_settings
from musc_pipeline.assets.summary import variant_groups
from musc_pipeline.definitions import build_definitions
from musc_pipeline.reports import RunData, inputs, render
from musc_pipeline.settings import BackboneSettings, MethodSettings, ProfileSettings

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


def test_variant_groups_pair_variants_with_the_paper_profile_of_their_backbone(tmp_path, mini_root):
    base = small_settings(tmp_path, mini_root)
    paper = base.profiles["musc"]
    other = ProfileSettings(backbone=BackboneSettings(name="ViT-B-16", weights="random"))
    settings = base.model_copy(update={"profiles": {
        "musc": paper, "v2": paper.model_copy(update={"method": MethodSettings(aggregation="snamd")}),
        "topk": paper.model_copy(update={"method": MethodSettings(image_score="topk_mean")}),
        "vit": other, "vit_v2": other.model_copy(update={"method": MethodSettings(rescoring="rscon")}),
    }})
    assert variant_groups(settings) == {"musc": ["v2", "topk"], "vit": ["vit_v2"]}


def test_variants_page_renders_deltas_escaped(tmp_path):
    def run(profile: str, auroc: float) -> RunData:
        metrics = pd.DataFrame([{"dataset": "piped", "category": c, **{k: auroc for k in inputs.METRICS},
                                 "n_images": 4, "n_anomalous": 2, "notes": ""} for c in ("A", "<b>B</b>")])
        return RunData(profile=profile, description="<i>d</i>", metrics=metrics, facts={}, random_init=False)

    runs = [run("musc", 0.9), run("musc_v2", 0.95), run("musc_topk", 0.85)]
    index = render.render_reports(tmp_path, runs, None, variants={"musc": ["musc_v2", "musc_topk"]})
    html = (tmp_path / "variants_musc.html").read_text()
    assert 'href="variants_musc.html"' in index.read_text()
    assert html.count('<span class="diff pos">+5.0</span>') == 3 * len(inputs.METRICS)  # 2 categories + mean
    assert html.count('<span class="diff neg">-5.0</span>') == 3 * len(inputs.METRICS)
    assert "<b>B</b>" not in html and "&lt;b&gt;B&lt;/b&gt;" in html and "<i>d</i>" not in html
    with pytest.raises(ValueError, match="unknown"):
        render.render_reports(tmp_path, runs, None, variants={"musc": ["nope"]})
