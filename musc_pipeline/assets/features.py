"""Per-category assets from images to features: image_manifest, backbone_features, lnamd_features."""

import json

import numpy as np
import pandas as pd
import torch
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    Output,
    asset,
)

from musc_pipeline.assets.context import MODEL_POOL, ProfileContext
from musc_pipeline.assets.metadata import progress_logger, table_metadata, timing_metadata
from musc_pipeline.core import lnamd
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.datasets import read_image, scan_category
from musc_pipeline.resources.model import measure
from musc_pipeline.resources.weights import locate_weights
from musc_pipeline.resources.storage import ArrayBundle


def image_manifest_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="image_manifest", io_manager_key="tables", kinds={"parquet"}, **p.asset_args("manifest"))
    def image_manifest(context: AssetExecutionContext) -> Output[pd.DataFrame]:
        """Test images of the category: path, defect type, label, mask path, size, mode, sha1.

        Every image is decoded and every mask size-checked here, and the backbone's weights
        are located, so bad input or missing weights stop the partition before anything is
        written.
        """
        p.ensure_usable()
        dataset, cfg, category = p.where(context)
        locate_weights(p.profile.backbone)
        df = scan_category(cfg.root, cfg.layout, category)
        df.insert(0, "category", category)
        df.insert(0, "dataset", dataset)
        df.insert(0, "profile", p.name)
        labels = df["label"]
        return Output(df, metadata={
            "rows": len(df),
            "anomalous": int((labels == 1).sum()),
            "normal": int((labels == 0).sum()),
            "unlabeled": int(labels.isna().sum()),
            "with_masks": int(df["mask_path"].notna().sum()),
            "root": MetadataValue.path(cfg.root),
        } | table_metadata(df))

    return image_manifest


def backbone_features_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="backbone_features", io_manager_key="arrays", ins={"manifest": AssetIn(p.key("image_manifest"))},
           kinds={"pytorch", "safetensors"}, pool=MODEL_POOL,
           check_specs=[p.check_spec("backbone_features", "features_shape", "one row per image, all taps on one grid")],
           **p.asset_args("features"))
    def backbone_features(context: AssetExecutionContext, model: ModelResource, manifest: pd.DataFrame):
        """Patch tokens of the 4 stage taps (tap0..tap3, N×h×w×C) and class tokens (N×D)."""
        p.ensure_usable()
        images = (read_image(path) for path in manifest["path"])
        emb = model.embed(p.profile.backbone, images, len(manifest), progress_logger(context, "images embedded"))
        arrays = {f"tap{i}": t for i, t in enumerate(emb.taps)} | {"class_tokens": emb.class_tokens}
        for k, v in arrays.items():
            bad = ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
            if bad.any():
                files = ", ".join(manifest["path"][bad].head(5))
                raise ValueError(f"backbone {emb.identity.backbone} produced NaN/inf features ({k}) for: {files}")
        ident = emb.identity.as_dict()
        timing = emb.measured.per_image(len(manifest))
        bundle = ArrayBundle(arrays, {"identity": json.dumps(ident), "timing": json.dumps(timing),
                                      "image_ids": json.dumps(list(manifest["image_id"]))})
        meta = {f"identity/{k}": str(v) for k, v in ident.items()} | timing_metadata(timing) | {
            "shapes": MetadataValue.json(bundle.describe()), "batch_size": emb.batch_size,
        }
        if ident["random_init"]:
            meta["WARNING"] = "randomly initialised backbone: features are not from a pretrained model"
        yield Output(bundle, metadata=meta)
        grids = {t.shape[1:3] for t in emb.taps}
        yield AssetCheckResult(
            check_name="features_shape", passed=len(grids) == 1 and all(len(t) == len(manifest) for t in arrays.values()),
            metadata={"shapes": MetadataValue.json(bundle.describe()), "images": len(manifest)},
        )

    return backbone_features


def lnamd_features_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="lnamd_features", io_manager_key="arrays", ins={"features": AssetIn(p.key("backbone_features"))},
           kinds={"pytorch", "safetensors"}, **p.asset_args("lnamd"))
    def lnamd_features(context: AssetExecutionContext, features: ArrayBundle) -> Output[ArrayBundle]:
        """LNAMD input per stage: Y_l = LayerNorm(F_l) over the whole map (N×h×w×C).

        Z_{l,r} = B_r(Y_l)/‖B_r(Y_l)‖ for every degree r is one cheap linear step away
        (:func:`musc_pipeline.core.lnamd.aggregate`); MSM scores all degrees from Y_l with
        one product per image pair, so Y_l is what is stored.
        """
        p.ensure_usable()
        with measure(torch.device("cpu")) as measured:
            ys = {f"y{i}": lnamd.layer_norm_map(torch.from_numpy(features.arrays[f"tap{i}"])).numpy() for i in range(4)}
        timing = measured.per_image(len(ys["y0"]))
        bundle = ArrayBundle(ys, features.meta | {"timing": json.dumps(timing)})
        return Output(bundle, metadata={"shapes": MetadataValue.json(bundle.describe())} | timing_metadata(timing))

    return lnamd_features
