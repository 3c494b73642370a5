"""Studies that re-run MSM because their setting changes the scoring pool: subsets (Tab. 7)
and few-shot MuSc / MuSc+ with k normal references (Tab. 16).

Each setting runs :func:`msm.score_stages` on the stored LNAMD maps (no backbone pass) and is
timed on its own. Memory: on CUDA the peak allocated by torch within the setting; on a CPU the
process's peak RSS, which Linux never lowers — so settings run from the smallest pool (s = 3)
to the largest (s = 1) and each one's high-water mark is its own.
"""

import json
import random
from pathlib import Path

import pandas as pd
import torch
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, Output, asset

from musc_pipeline.assets.context import MODEL_POOL, ProfileContext
from musc_pipeline.assets.features import lnamd_inputs
from musc_pipeline.assets.study_common import CategoryTruth, study_args, study_output, subset_groups
from musc_pipeline.core import lnamd, msm
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.datasets import IMAGE_SUFFIXES, read_image
from musc_pipeline.resources.model import measure
from musc_pipeline.resources.storage import ArrayBundle

SUBSETS = (1, 2, 3)
SHOTS = (1, 2, 4, 8)


def subsets_study_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="study_subsets", io_manager_key="tables", kinds={"parquet"}, pool=MODEL_POOL,
           ins={"lnamd_maps": AssetIn(p.key("lnamd_features")), "features": AssetIn(p.key("backbone_features")),
                "manifest": AssetIn(p.key("image_manifest"))}, **study_args(p, "msm", list(SUBSETS)))
    def study_subsets(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                      features: ArrayBundle, manifest: pd.DataFrame) -> Output[pd.DataFrame]:
        """Subsets s = 1, 2, 3 (Tab. 7): metrics, MSM time per image, peak memory and subset sizes."""
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        ys = lnamd_inputs(p, lnamd_maps, model, manifest)
        grid = tuple(ys[0].shape[1:3])
        results = {}
        for s in sorted(SUBSETS, reverse=True):  # ascending memory: see the module doc
            groups = subset_groups(p, manifest, s)
            with measure(model.torch_device) as measured:
                scores = msm.score_stages(ys, groups, p.method.degrees, p.method.interval, device=model.torch_device,
                                          memory_budget=model.msm_memory_budget,
                                          result_budget=model.msm_result_budget_mb * 2**20, dtype=model.msm_dtype)
            timing = measured.per_image(len(manifest))
            sizes = [len(g) for g in groups]
            results[f"s = {s}"] = where.evaluate(p, scores, grid) | {
                "msm_ms_per_image": timing["ms_per_image"], "peak_rss_mb": timing["peak_rss_mb"],
                "peak_gpu_mb": float("nan") if timing["peak_gpu_mb"] is None else timing["peak_gpu_mb"],
                "subset_min": min(sizes), "subset_max": max(sizes)}
            context.log.info(f"s = {s}: subsets of {sizes} images, MSM {json.dumps(timing)}")
        results = dict(sorted(results.items()))
        return study_output(p, "subsets", where, results,
                            f"MSM for s = {', '.join(map(str, SUBSETS))} from the stored LNAMD maps (no backbone pass)")

    return study_subsets



def reference_images(root: str, category: str, seed: int, k: int) -> list[Path]:
    """k normal references drawn (seeded) from ``<root>/<category>/train/good``; nested in k
    (the 2-shot set holds the 1-shot image). [] when the layout has no such folder."""
    folder = Path(root) / category / "train" / "good"
    paths = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                   and not f.name.startswith(".")) if folder.is_dir() else []
    return random.Random(seed).sample(paths, min(k, len(paths)))


def fewshot_study_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="study_fewshot", io_manager_key="tables", kinds={"parquet"}, pool=MODEL_POOL,
           ins={"stored": AssetIn(p.key("msm_scores")), "lnamd_maps": AssetIn(p.key("lnamd_features")),
                "features": AssetIn(p.key("backbone_features")), "manifest": AssetIn(p.key("image_manifest"))},
           **study_args(p, "msm", list(SHOTS)))
    def study_fewshot(context: AssetExecutionContext, model: ModelResource, stored: ArrayBundle,
                      lnamd_maps: ArrayBundle, features: ArrayBundle, manifest: pd.DataFrame) -> Output[pd.DataFrame]:
        """Few-shot MuSc (references join the pool) and MuSc+ (references only, minimum) with k =
        1, 2, 4, 8 normal references from ``train/good`` (Tab. 16); k = 0 is the stored zero-shot
        run. A category without ``train/good`` images gets the k = 0 row only, and says so."""
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        _, cfg, _ = p.where(context)
        grid = tuple(json.loads(stored.meta["grid"]))
        results = {"MuSc k = 0 (zero-shot)": where.evaluate(p, torch.from_numpy(stored.arrays["scores"]), grid)}
        refs = reference_images(cfg.root, where.category, p.method.subset_seed, max(SHOTS))
        if refs:
            emb = model.embed(p.profile.backbone, (read_image(f) for f in refs), len(refs))
            ref_maps = [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps]  # L × k×h×w×C
        ys, groups = lnamd_inputs(p, lnamd_maps, model, manifest), subset_groups(p, manifest)
        for mode, label in (("few_shot", "MuSc"), ("musc_plus", "MuSc+")):
            for k in (k for k in SHOTS if k <= len(refs)):
                scores = msm.score_stages(ys, groups, p.method.degrees, p.method.interval,
                                          references=[r[:k] for r in ref_maps], mode=mode, device=model.torch_device,
                                          memory_budget=model.msm_memory_budget,
                                          result_budget=model.msm_result_budget_mb * 2**20, dtype=model.msm_dtype)
                results[f"{label} k = {k}"] = where.evaluate(p, scores, grid)
        recomputed = (f"MSM with k of {len(refs)} references from train/good (embedded here); k = 0 from msm_scores"
                      if refs else "nothing: no train/good images in this category, only k = 0 (msm_scores)")
        return study_output(p, "fewshot", where, results, recomputed)

    return study_fewshot
