"""Per-category assets from images to features: image_manifest, then backbone_features and
lnamd_features from one pass of the backbone.

The raw stage taps F_l are never stored: every reader needs only LNAMD's input
Y_l = LayerNorm(F_l), a cheap deterministic step from them, so one step embeds the images and
stores Y_l (float16: the parity tests hold at that precision) beside the class tokens. With
``intermediates: drop`` the Y_l arrays are dropped once the category is scored
(:func:`musc_pipeline.assets.storage_policy.drop_intermediates`), and readers recompute them on demand (:func:`lnamd_inputs`).
"""

import json

import numpy as np
import pandas as pd
import torch
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    AssetsDefinition,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)

from musc_pipeline.assets.context import MODEL_POOL, ProfileContext
from musc_pipeline.assets.metadata import progress_logger, table_metadata, timing_metadata
from musc_pipeline.core import lnamd
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.datasets import read_image, scan_category
from musc_pipeline.resources.model import Embedded, measure
from musc_pipeline.resources.weights import locate_weights
from musc_pipeline.resources.storage import ArrayBundle

#: How Y_l is stored: float16 halves the largest stored array; parity holds (tests/test_parity.py).
LNAMD_STORAGE_DTYPE = np.float16


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


def embed_stage_maps(p: ProfileContext, model: ModelResource, manifest: pd.DataFrame,
                     progress=None) -> tuple[Embedded, dict[str, np.ndarray], dict]:
    """Embed the manifest's images: the embedding, the stored form of Y_l (``y0``..``y3``), and
    the LayerNorm step's timing. Non-finite features stop it with the files that caused them."""
    images = (read_image(path) for path in manifest["path"])
    emb = model.embed(p.profile.backbone, images, len(manifest), progress)
    for name, v in [(f"tap{i}", t) for i, t in enumerate(emb.taps)] + [("class_tokens", emb.class_tokens)]:
        bad = ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
        if bad.any():
            files = ", ".join(manifest["path"][bad].head(5))
            raise ValueError(f"backbone {emb.identity.backbone} produced NaN/inf features ({name}) for: {files}")
    with measure(torch.device("cpu")) as measured:
        ys = {f"y{i}": lnamd.layer_norm_map(torch.from_numpy(t)).numpy().astype(LNAMD_STORAGE_DTYPE)
              for i, t in enumerate(emb.taps)}
    return emb, ys, measured.per_image(len(manifest))


def lnamd_inputs(p: ProfileContext, lnamd_maps: ArrayBundle, model: ModelResource,
                 manifest: pd.DataFrame) -> list[torch.Tensor]:
    """Y_l of the four stages as float32 tensors: from the stored bundle, or recomputed from the
    images when ``intermediates: drop`` dropped them (the same values: same weights, same steps)."""
    arrays = lnamd_maps.arrays
    if "dropped" in lnamd_maps.meta:
        arrays = embed_stage_maps(p, model, manifest)[1]
    return [torch.from_numpy(arrays[f"y{i}"]).float() for i in range(4)]


def embedding_assets(p: ProfileContext) -> AssetsDefinition:
    args = p.asset_args("features")
    unusable = args.get("description")

    @multi_asset(
        name=f"{p.name}__embed", group_name=args["group_name"], partitions_def=args["partitions_def"], pool=MODEL_POOL,
        can_subset=True,  # either asset alone can be selected (the backbone runs either way)
        ins={"manifest": AssetIn(p.key("image_manifest"))},
        outs={
            "backbone_features": AssetOut(
                key=p.key("backbone_features"), io_manager_key="arrays", kinds={"pytorch", "safetensors"}, is_required=False,
                code_version=p.versions["features"],
                description=unusable or "Class tokens (N×D) and the backbone identity (patch tokens: lnamd_features)"),
            "lnamd_features": AssetOut(
                key=p.key("lnamd_features"), io_manager_key="arrays", kinds={"pytorch", "safetensors"}, is_required=False,
                code_version=p.versions["lnamd"],
                description=unusable or "LNAMD input per stage: Y_l = LayerNorm(F_l) of the patch tokens, N×h×w×C"),
        },
        check_specs=[p.check_spec("lnamd_features", "features_shape", "one row per image, all stages on one grid")],
    )
    def embed(context: AssetExecutionContext, model: ModelResource, manifest: pd.DataFrame):
        """One pass of the backbone: class tokens to ``backbone_features``, Y_l to ``lnamd_features``.

        Z_{l,r} = B_r(Y_l)/‖B_r(Y_l)‖ for every degree r is one cheap linear step from Y_l
        (:func:`musc_pipeline.core.lnamd.aggregate`); MSM scores all degrees from Y_l with one
        product per image pair, so Y_l is what is stored.
        """
        p.ensure_usable()
        emb, ys, ln_timing = embed_stage_maps(p, model, manifest, progress_logger(context, "images embedded"))
        ident = emb.identity.as_dict()
        timing = emb.measured.per_image(len(manifest))
        common = {"identity": json.dumps(ident), "image_ids": json.dumps(list(manifest["image_id"])),
                  "images": str(len(manifest))}
        features = ArrayBundle({"class_tokens": emb.class_tokens}, common | {"timing": json.dumps(timing)})
        meta = {f"identity/{k}": str(v) for k, v in ident.items()} | timing_metadata(timing) | {
            "shapes": MetadataValue.json(features.describe()), "batch_size": emb.batch_size,
        }
        if ident["random_init"]:
            meta["WARNING"] = "randomly initialised backbone: features are not from a pretrained model"
        selected = context.op_execution_context.selected_output_names
        if "backbone_features" in selected:
            yield Output(features, output_name="backbone_features", metadata=meta)
        maps = ArrayBundle(ys, common | {"timing": json.dumps(ln_timing)})
        if "lnamd_features" in selected:
            yield Output(maps, output_name="lnamd_features",
                         metadata={"shapes": MetadataValue.json(maps.describe())} | timing_metadata(ln_timing))
        if not context.selected_asset_check_keys:
            return
        grids = {y.shape[1:3] for y in ys.values()}
        yield AssetCheckResult(
            asset_key=p.key("lnamd_features"), check_name="features_shape",
            passed=len(grids) == 1 and all(len(y) == len(manifest) for y in ys.values()),
            metadata={"shapes": MetadataValue.json(maps.describe()), "images": len(manifest)},
        )

    return embed
