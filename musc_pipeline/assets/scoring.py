"""Per-category scoring assets: msm_scores, anomaly_maps, salient_features (RsCon only), rscin_scores."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue, Output, asset

from musc_pipeline.assets.context import MODEL_POOL, ProfileContext
from musc_pipeline.assets.features import lnamd_inputs
from musc_pipeline.assets.metadata import map_preview_png, progress_logger, table_metadata, timing_metadata
from musc_pipeline.core import lnamd, maps, msm, rscin, rscon, snamd, subsets
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.core.preprocess import mask_array, resolve_mask_rule
from musc_pipeline.resources.datasets import DatasetError, read_image, read_mask
from musc_pipeline.resources.model import measure
from musc_pipeline.resources.storage import ArrayBundle


def msm_scores_asset(p: ProfileContext) -> AssetsDefinition:
    method = p.method

    @asset(name="msm_scores", io_manager_key="arrays",
           ins={"lnamd_maps": AssetIn(p.key("lnamd_features")), "manifest": AssetIn(p.key("image_manifest"))},
           kinds={"pytorch", "safetensors"}, pool=MODEL_POOL, **p.asset_args("msm"))
    def msm_scores(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                   manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """Mutual scores s_{l,r}(i, m) per stage l and degree r: N×L×R×P (float32).

        Stored per stage and degree so ablations re-aggregate without recomputing. With
        ``aggregation: snamd`` the degrees are pooled inside SNAMD, so R = 1.
        """
        p.ensure_usable()
        ys = lnamd_inputs(p, lnamd_maps, model, manifest)
        n, h, w, _ = ys[0].shape
        refs = _reference_maps(model, p) if method.mode != "zero_shot" else None
        groups = subsets.divide(list(manifest["defect_type"].astype(str)), method.subsets, method.subset_seed,
                                method.subset_dealing)
        reporters: dict[str, Callable[[int, int], None]] = {}

        def progress(label: str, done: int, total: int) -> None:  # one log line per 10 % per subset and stage
            reporters.setdefault(label, progress_logger(context, f"MSM blocks done ({label})"))(done, total)

        score = snamd.score_stages if method.aggregation == "snamd" else msm.score_stages
        choice = model.msm_choice  # auto: measured here, before the timing
        with measure(model.torch_device) as measured:
            out = score(
                ys, groups, method.degrees, method.interval, references=refs, mode=method.mode,
                device=model.torch_device, memory_budget=model.msm_memory_budget,
                result_budget=model.msm_result_budget_mb * 2**20, progress=progress, **model.msm_options,
            ).numpy()
        bad = ~np.isfinite(out.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"MSM produced non-finite scores for: {', '.join(manifest['path'][bad].head(5))}")
        timing = measured.per_image(n)
        bundle = ArrayBundle({"scores": out}, {
            "grid": json.dumps([h, w]), "degrees": json.dumps(list(method.degrees)),
            "interval": json.dumps(list(method.interval)), "subsets": str(method.subsets),
            "subset_dealing": method.subset_dealing, "aggregation": method.aggregation,
            "mode": method.mode, "timing": json.dumps(timing), "identity": lnamd_maps.meta.get("identity", "{}"),
            "images": str(n), "msm_precision": json.dumps(choice.record()),
        })
        return Output(bundle, metadata={"shape": str(list(out.shape)), "msm_precision": choice.record()}
                      | timing_metadata(timing))

    return msm_scores


def _reference_maps(model: ModelResource, p: ProfileContext) -> list[torch.Tensor]:
    """Layer-normed stage maps of the normal reference images (few-shot, MuSc+)."""
    method = p.method
    if not method.references:
        raise ValueError(f"MSM mode {method.mode!r} needs method.references: a folder of normal images")
    folder = Path(method.references)
    paths = sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{folder}: no reference images found")
    emb = model.embed(p.profile.backbone, (read_image(path) for path in paths), len(paths))
    return [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps]


def anomaly_maps_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="anomaly_maps", io_manager_key="arrays",
           ins={"scores": AssetIn(p.key("msm_scores")), "features": AssetIn(p.key("backbone_features")),
                "manifest": AssetIn(p.key("image_manifest"))},
           kinds={"pytorch", "safetensors"}, **p.asset_args("maps"))
    def anomaly_maps(context: AssetExecutionContext, scores: ArrayBundle, features: ArrayBundle,
                     manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """Anomaly maps A_i on the patch grid (N×h×w) and image scores c_i (``image_score``: max or
        top-q mean of the S×S map). The S×S maps (bilinear, align_corners, optional smoothing) are
        one cheap step from the stored grid, so only the grid is stored (:func:`full_maps`)."""
        p.ensure_usable()
        ident = json.loads(features.meta["identity"])
        grid = tuple(json.loads(scores.meta["grid"]))
        with measure(torch.device("cpu")) as measured:
            patch = maps.patch_scores(torch.from_numpy(scores.arrays["scores"]))
            amaps = maps.anomaly_maps(patch, grid, ident["image_size"], p.method.smoothing_sigma)
            image = maps.image_scores(amaps, p.method.image_score, p.method.image_score_q)
        timing = measured.per_image(len(image))
        bundle = ArrayBundle({"patch_maps": patch.reshape(len(patch), *grid).numpy(), "image_scores": image.numpy()},
                             {"timing": json.dumps(timing), "image_size": str(ident["image_size"]),
                              "smoothing_sigma": str(p.method.smoothing_sigma), "images": str(len(image))})
        top = int(torch.argmax(image))
        rule = resolve_mask_rule(p.method.mask_rule, p.where(context)[1].layout)
        preview = _preview(manifest.iloc[top], amaps[top].numpy(), int(ident["image_size"]), rule)
        return Output(bundle, metadata={"shape": str(list(amaps.shape))} | timing_metadata(timing) | {
                                        "figure: highest-scoring image": MetadataValue.md(preview)})

    return anomaly_maps


def full_maps(amaps: ArrayBundle) -> np.ndarray:
    """The S×S anomaly maps (N×S×S float32) of a stored ``anomaly_maps`` bundle: the same call
    on the same grid as when its image scores were computed, so the same values."""
    patch = torch.from_numpy(amaps.arrays["patch_maps"])
    return maps.anomaly_maps(patch.flatten(1), tuple(patch.shape[1:]), int(amaps.meta["image_size"]),
                             float(amaps.meta["smoothing_sigma"])).numpy()


def _preview(row: pd.Series, amap: np.ndarray, size: int, mask_rule: str) -> str:
    """The image, its map and its ground-truth mask (when it has one) side by side."""
    mask = None
    if isinstance(row["mask_path"], str):
        mask = mask_array(read_mask(row["mask_path"], (row["width"], row["height"])), size, mask_rule)
    return map_preview_png(read_image(row["path"]), amap, mask, f"{row['image_id']}: highest image score")



def salient_features_asset(p: ProfileContext) -> AssetsDefinition:
    method = p.method

    @asset(name="salient_features", io_manager_key="arrays",
           ins={"lnamd_maps": AssetIn(p.key("lnamd_features")), "scores": AssetIn(p.key("msm_scores")),
                "manifest": AssetIn(p.key("image_manifest"))},
           kinds={"pytorch", "safetensors"}, **p.asset_args("salient"))
    def salient_features(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                         scores: ArrayBundle, manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """RsCon's anomaly-salient features (N×C): the aggregated feature of the second-to-last
        stage at each image's highest grid-level patch score (:mod:`musc_pipeline.core.rscon`)."""
        p.ensure_usable()
        ys = lnamd_inputs(p, lnamd_maps, model, manifest)
        stage = len(ys) + rscon.SALIENT_STAGE
        with measure(torch.device("cpu")) as measured:
            feats = rscon.salient_features(
                ys[stage],
                maps.patch_scores(torch.from_numpy(scores.arrays["scores"])), method.degrees, method.aggregation)
        timing = measured.per_image(len(feats))
        bundle = ArrayBundle({"salient": feats.numpy()}, {"timing": json.dumps(timing), "stage": str(stage),
                                                          "aggregation": method.aggregation, "images": str(len(feats))})
        return Output(bundle, metadata={"shape": str(list(feats.shape)), "stage": stage} | timing_metadata(timing))

    return salient_features


def rscin_scores_asset(p: ProfileContext) -> AssetsDefinition:
    ins = {"amaps": AssetIn(p.key("anomaly_maps")), "features": AssetIn(p.key("backbone_features")),
           "manifest": AssetIn(p.key("image_manifest"))}
    if p.method.rescoring == "rscon":
        ins["salient"] = AssetIn(p.key("salient_features"))

    @asset(name="rscin_scores", io_manager_key="tables", ins=ins, kinds={"parquet"}, **p.asset_args("rscin"))
    def rscin_scores(context: AssetExecutionContext, amaps: ArrayBundle, features: ArrayBundle,
                     manifest: pd.DataFrame, **rscon_in: ArrayBundle) -> Output[pd.DataFrame]:
        """Per image: the MSM image score and the re-scored one (one table row each).

        ``score_rscin`` holds the score after the profile's ``rescoring``: RsCIN over class
        tokens (paper), RsCon over anomaly-salient features (MuSc-V2), or none (= ``score_msm``).
        """
        p.ensure_usable()
        dataset, _, _ = p.where(context)
        c = torch.from_numpy(amaps.arrays["image_scores"])
        if p.method.rescoring == "rscin":
            windows = p.method.rscin_windows or rscin.windows_for(dataset)
            rescored = rscin.rescore(c, torch.from_numpy(features.arrays["class_tokens"]), windows,
                                     p.method.rscin_precision)
        elif p.method.rescoring == "rscon":
            windows = tuple(sorted({1, *p.method.rscon_windows}))
            rescored = rscon.rescore(c, torch.from_numpy(rscon_in["salient"].arrays["salient"]), windows)
        else:
            windows, rescored = (), c.double()
        df = manifest[["profile", "dataset", "category", "image_id", "path", "defect_type", "label"]].copy()
        df["score_msm"] = c.double().numpy()
        df["score_rscin"] = rescored.numpy()
        df["rescoring"] = p.method.rescoring
        df["rscin_windows"] = json.dumps(list(windows))
        df["rscin_precision"] = p.method.rscin_precision
        ident = json.loads(features.meta["identity"])
        df["backbone"] = ident["backbone"]
        df["random_init"] = bool(ident["random_init"])
        return Output(df, metadata={"rows": len(df), "windows": str(list(windows))} | table_metadata(df))

    return rscin_scores
