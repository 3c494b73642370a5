"""MSM precision ``lowp_rerank`` (:mod:`musc_pipeline.core.msm_lowp`) against ``exact_fp32``.

The re-ranked maxima must be the float32 path's (scores within 1e-6) on inputs made to break a
loose bound: near-ties, duplicated patches, constant images; the bound itself must hold for
the products torch computes; ``auto`` must pick by the peaks it is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dagster import AssetKey, DagsterInstance
from safetensors.numpy import load_file

from conftest import make_category, small_settings
from musc_pipeline.core import lnamd, msm, msm_lowp
from musc_pipeline.resources.model import ModelRuntime

LOWP = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _y(tokens: torch.Tensor) -> torch.Tensor:
    return lnamd.layer_norm_map(tokens.float())


def _assert_same_maxima(y, keys=None, degrees=(1, 3, 5), lowp_dtype=torch.bfloat16, budget=2**16):
    exact = msm.max_similarities(y, keys, degrees, strategy="per_degree")
    counter = msm_lowp.Candidates()
    got = msm.max_similarities(y, keys, degrees, precision="lowp_rerank", lowp_dtype=lowp_dtype,
                               memory_budget=budget, counter=counter)
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), finite)
    assert (got[finite] - exact[finite]).abs().max() <= 1e-6
    assert counter.candidates >= counter.rows / 2 > 0  # symmetric blocks share row and column candidates
    return counter


@pytest.mark.parametrize("dtype", LOWP)
def test_product_error_bounds_torch_products_of_unit_vectors(dtype):
    g = torch.Generator().manual_seed(0)
    c = 257
    x = torch.nn.functional.normalize(torch.randn(400, c, generator=g), dim=-1)
    # adversarial: many components exactly between two low-precision values, and all-equal ones
    x[:100] = torch.nn.functional.normalize(torch.ones(100, c) + torch.rand(100, 1, generator=g) * 2**-9, dim=-1)
    x[100:200] = torch.nn.functional.normalize(torch.rand(100, c, generator=g) * 1e-6 + 1, dim=-1)
    exact = x.double() @ x.double().T
    approx = (x.to(dtype) @ x.to(dtype).T).double()
    assert (approx - exact).abs().max() <= msm_lowp.product_error(c, dtype)
    assert msm_lowp.candidate_margin(c, dtype) > msm_lowp.product_error(c, dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_near_ties_keep_the_float32_maxima(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 5, 5, 32, generator=g)
    # every image is the same map plus noise far below the low-precision bound: ranks are near-ties
    tokens = base + 1e-3 * torch.randn(7, 5, 5, 32, generator=g)
    _assert_same_maxima(_y(tokens), lowp_dtype=dtype)


def test_duplicated_patches_and_images_keep_the_float32_maxima():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(6, 4, 4, 24, generator=g)
    tokens[:, 1::2] = tokens[:, ::2]  # every patch row duplicated
    tokens[3] = tokens[1]  # an image duplicated
    counter = _assert_same_maxima(_y(tokens))
    assert counter.per_patch >= 1


def test_constant_images_keep_the_float32_maxima():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(6, 4, 4, 16, generator=g)
    tokens[:3] = torch.randn(3, 1, 1, 16, generator=g)  # constant over the grid: every patch ties
    tokens[5] = 0.0  # all zero: LayerNorm gives zeros, every similarity 0
    _assert_same_maxima(_y(tokens))


@pytest.mark.parametrize("mode", ["zero_shot", "few_shot", "musc_plus"])
@pytest.mark.parametrize("dtype", LOWP)
def test_scores_equal_exact_fp32_in_every_mode_and_row_chunks(mode, dtype):
    g = torch.Generator().manual_seed(4)
    y, refs = _y(torch.randn(9, 5, 4, 40, generator=g)), _y(torch.randn(3, 5, 4, 40, generator=g))
    kw = dict(references=None if mode == "zero_shot" else refs, mode=mode)
    exact = msm.scores_by_degree(y, (1, 3, 5), **kw)
    for result_budget in (msm.DEFAULT_RESULT_BUDGET, 3 * 20 * 12 * 4 * 3):  # whole, and row chunks of 3
        got = msm.scores_by_degree(y, (1, 3, 5), precision="lowp_rerank", lowp_dtype=dtype,
                                   memory_budget=20 * 20 * 3 * 2, result_budget=result_budget, **kw)
        assert (got - exact).abs().max() <= 1e-6


def test_scores_equal_exact_fp32_at_vit_b_shapes():
    """ViT-B's grid and channels (14×14, C = 768: the bound's accumulation term at its C)."""
    g = torch.Generator().manual_seed(5)
    y = _y(torch.randn(5, 14, 14, 768, generator=g) + torch.randn(5, 1, 1, 768, generator=g))
    exact = msm.scores_by_degree(y, (1, 3, 5))
    got = msm.scores_by_degree(y, (1, 3, 5), precision="lowp_rerank")
    assert (got - exact).abs().max() <= 1e-6


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="exact_fp32 or lowp_rerank"):
        msm.max_similarities(torch.zeros(2, 3, 4), None, (1,), precision="bf16")
    with pytest.raises(ValueError, match="msm_precision must be one of"):
        ModelRuntime(msm_precision="bfloat16").msm_options
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        msm_lowp.product_error(768, torch.float32)


@pytest.mark.parametrize("peaks, strategy, device, expected", [
    # the AMX Xeon: 6.7× in bfloat16, but the CPU re-rank's gathers cost 6× the products
    ({"float32": 331, "bfloat16": 2223}, "box_filter", "cpu", ("exact_fp32", None)),
    ({"float32": 331, "bfloat16": 331 * 200}, "box_filter", "cpu", ("lowp_rerank", torch.bfloat16)),
    ({"float32": 50_000, "bfloat16": 700_000, "float16": 700_000}, "per_degree", "cuda", ("lowp_rerank", torch.float16)),
    ({"float32": 50_000, "bfloat16": 90_000, "float16": 90_000}, "per_degree", "cuda", ("exact_fp32", None)),
])
def test_auto_picks_by_the_measured_peaks(peaks, strategy, device, expected):
    choice = msm_lowp.choose_precision(peaks, 3, strategy, device)
    assert (choice.precision, choice.lowp_dtype) == expected
    assert choice.record()["peaks_gflops"] == peaks and strategy in choice.reason


def test_runtime_options_follow_the_setting(monkeypatch):
    assert ModelRuntime().msm_options == {"dtype": torch.float32, "precision": "exact_fp32"}
    assert ModelRuntime(device="cpu", msm_precision="lowp_rerank").msm_options["lowp_dtype"] == torch.bfloat16
    for bf16, expected in ((1000.0, "exact_fp32"), (100_000.0, "lowp_rerank")):
        peaks = {"float32": 100.0, "bfloat16": bf16}
        monkeypatch.setattr(msm_lowp, "measured_peaks", lambda device, peaks=peaks: peaks)
        auto = ModelRuntime(device="cpu", msm_precision="auto").msm_choice
        assert auto.precision == expected and auto.peaks_gflops == peaks


def test_three_settings_give_identical_metrics_on_a_demo_category(tmp_path):
    from musc_pipeline.definitions import build_definitions
    from musc_pipeline.resources.backbone import ModelResource

    make_category(tmp_path / "data", "cat1", n=3)
    settings = small_settings(tmp_path, tmp_path / "data")
    store = Path(settings.storage) / "musc"
    instance = DagsterInstance.ephemeral()
    names = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps", "rscin_scores",
             "category_metrics"]
    metrics, scores = {}, {}
    for precision in ("exact_fp32", "lowp_rerank", "auto"):
        defs = build_definitions(settings, model=ModelResource(device="cpu", msm_precision=precision))
        result = defs.resolve_job_def("musc_categories").execute_in_process(
            partition_key="mini/cat1", instance=instance, asset_selection=[AssetKey(["musc", n]) for n in names])
        assert result.success
        names = ["msm_scores", "anomaly_maps", "rscin_scores", "category_metrics"]  # the same features
        mat = [e.materialization for e in result.get_asset_materialization_events()
               if e.materialization.asset_key == AssetKey(["musc", "msm_scores"])][0]
        recorded = mat.metadata["msm_precision"].value
        if precision == "auto":  # what this machine's peaks pick (exact_fp32 on AVX-512-BF16 without AMX)
            assert set(recorded["peaks_gflops"]) == {"float32", "bfloat16"}
            assert recorded == msm_lowp.choose_precision(recorded["peaks_gflops"], 3, "box_filter", "cpu").record()
        else:
            assert recorded["precision"] == precision
        metrics[precision] = pd.read_parquet(store / "category_metrics" / "mini" / "cat1.parquet").iloc[0]
        bundle = load_file(str(store / "msm_scores" / "mini" / "cat1.safetensors"))
        scores[precision] = bundle["scores"]
    # Scores are √(2 − 2s): near s = 1 a float32 rounding of s (1e-7) moves them by 1e-7/√(2 − 2s),
    # as between exact_fp32's own two strategies (docs/msm-precision.md); parity allows 1e-4.
    for precision in ("lowp_rerank", "auto"):
        assert np.abs(scores[precision] - scores["exact_fp32"]).max() <= 1e-5
        for k in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_pro"):
            assert metrics[precision][k] == pytest.approx(metrics["exact_fp32"][k], abs=1e-6), k
