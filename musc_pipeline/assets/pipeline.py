"""The per-category asset graph of one profile, one asset per stage of SPEC.md.

    image_manifest -> backbone_features -> lnamd_features -> msm_scores -> anomaly_maps
                   -> rscin_scores -> category_metrics          (partitioned: dataset/category)
    category_metrics -> metrics_table, regression_comparison      (all categories of the profile)

Assets stay thin: read inputs, call :mod:`musc_pipeline.core`, return what they computed with
metadata for the UI. Code versions are hashes of exactly the settings each stage depends on,
so editing a profile in ``musc.yaml`` marks exactly the affected stages stale.
"""


import json
import math
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
)

from musc_pipeline.core import lnamd, maps, metrics, msm, rscin, rscon, snamd, subsets
from musc_pipeline.core.preprocess import mask_array
from musc_pipeline.reports.render import load_reference
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.model import measure, resolve_name
from musc_pipeline.resources.datasets import DatasetError, read_image, read_mask, scan_category
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import ProfileSettings, Settings, fingerprint
from musc_pipeline.assets.partitions import split_key

#: Bump an entry when the code of that stage changes its results or the format it stores.
CODE_REVISION = {"manifest": 1, "features": 2, "lnamd": 2, "msm": 2, "maps": 2, "salient": 1, "rscin": 1, "metrics": 2}
#: Concurrency pool of the steps that use the model device (limit it in dagster.yaml).
MODEL_POOL = "musc_model"


def _progress(context: AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    state = {"next": 0.0}

    def report(done: int, total: int) -> None:
        if done >= total or done / total >= state["next"]:
            context.log.info(f"{what}: {done}/{total}")
            state["next"] = done / total + 0.1

    return report


def _timing_metadata(timing: dict) -> dict:
    """A stage's timing as UI metadata (the GPU peak only where the stage ran on CUDA)."""
    return {k: MetadataValue.float(float(v)) for k, v in timing.items() if k != "seconds" and v is not None}


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def map_preview_png(amap: np.ndarray) -> str:
    """A small anomaly-map preview as a Markdown image (data URI), for the UI."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6, 1.6), dpi=64)
    ax.imshow(amap, cmap="jet")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0)
    plt.close(fig)
    return f"![anomaly map](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def backbone_fingerprint(profile: ProfileSettings) -> str:
    """Hash of what determines the features: backbone settings and what 'auto' resolves to."""
    return fingerprint(profile.backbone, resolve_name(profile.backbone.name))


def build_profile_assets(
    name: str, profile: ProfileSettings, settings: Settings, partitions: StaticPartitionsDefinition
) -> list:
    """All assets of one profile (asset keys prefixed with the profile name)."""
    method = profile.method
    backbone_fp = backbone_fingerprint(profile)
    versions = {
        "manifest": fingerprint(CODE_REVISION["manifest"]),
        "features": fingerprint(CODE_REVISION["features"], backbone_fp),
        "lnamd": fingerprint(CODE_REVISION["lnamd"], backbone_fp),
        "msm": fingerprint(CODE_REVISION["msm"], backbone_fp, json.dumps([
            method.degrees, method.interval, method.subsets, method.subset_seed, method.mode, method.references]),
            *method.variant("aggregation")),
        "maps": fingerprint(CODE_REVISION["maps"], str(method.smoothing_sigma), *method.variant("image_score", "image_score_q")),
        "salient": fingerprint(CODE_REVISION["salient"], method.aggregation, json.dumps(method.degrees)),
        "rscin": fingerprint(CODE_REVISION["rscin"], json.dumps(method.rscin_windows),
                             *method.variant("rescoring", "rscon_windows")),
        "metrics": fingerprint(CODE_REVISION["metrics"], method.mask_rule),
    }
    common = dict(key_prefix=[name], group_name=name, partitions_def=partitions)

    def key(asset: str) -> AssetKey:
        return AssetKey([name, asset])

    def where(context: AssetExecutionContext):
        return split_key(settings, context.partition_key)

    @asset(name="image_manifest", io_manager_key="tables", code_version=versions["manifest"],
           kinds={"parquet"}, **common)
    def image_manifest(context: AssetExecutionContext, model: ModelResource) -> Output[pd.DataFrame]:
        """Test images of the category: path, defect type, label, mask path, size, mode, sha1.

        Every image is decoded and every mask size-checked here, and the backbone's weights
        are located, so bad input or missing weights stop the partition before anything is
        written.
        """
        dataset, cfg, category = where(context)
        model.extractor(profile.backbone)
        df = scan_category(cfg.root, cfg.layout, category)
        df.insert(0, "category", category)
        df.insert(0, "dataset", dataset)
        df.insert(0, "profile", name)
        labels = df["label"]
        return Output(df, metadata={
            "rows": len(df),
            "anomalous": int((labels == 1).sum()),
            "normal": int((labels == 0).sum()),
            "unlabeled": int(labels.isna().sum()),
            "with_masks": int(df["mask_path"].notna().sum()),
            "root": MetadataValue.path(cfg.root),
        })

    @asset(name="backbone_features", io_manager_key="arrays", code_version=versions["features"],
           ins={"manifest": AssetIn(key("image_manifest"))}, kinds={"pytorch", "safetensors"}, pool=MODEL_POOL,
           check_specs=[AssetCheckSpec("features_shape", asset=key("backbone_features"),
                                       description="one row per image, all taps on one grid")], **common)
    def backbone_features(context: AssetExecutionContext, model: ModelResource, manifest: pd.DataFrame):
        """Patch tokens of the 4 stage taps (tap0..tap3, N×h×w×C) and class tokens (N×D)."""
        images = (read_image(p) for p in manifest["path"])
        emb = model.embed(profile.backbone, images, len(manifest), _progress(context, "images embedded"))
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
        meta = {f"identity/{k}": str(v) for k, v in ident.items()} | _timing_metadata(timing) | {
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

    @asset(name="lnamd_features", io_manager_key="arrays", code_version=versions["lnamd"],
           ins={"features": AssetIn(key("backbone_features"))}, kinds={"pytorch", "safetensors"}, **common)
    def lnamd_features(context: AssetExecutionContext, features: ArrayBundle) -> Output[ArrayBundle]:
        """LNAMD input per stage: Y_l = LayerNorm(F_l) over the whole map (N×h×w×C).

        Z_{l,r} = B_r(Y_l)/‖B_r(Y_l)‖ for every degree r is one cheap linear step away
        (:func:`musc_pipeline.core.lnamd.aggregate`); MSM scores all degrees from Y_l with
        one product per image pair, so Y_l is what is stored.
        """
        with measure(torch.device("cpu")) as measured:
            ys = {f"y{i}": lnamd.layer_norm_map(torch.from_numpy(features.arrays[f"tap{i}"])).numpy() for i in range(4)}
        timing = measured.per_image(len(ys["y0"]))
        bundle = ArrayBundle(ys, features.meta | {"timing": json.dumps(timing)})
        return Output(bundle, metadata={"shapes": MetadataValue.json(bundle.describe())} | _timing_metadata(timing))

    @asset(name="msm_scores", io_manager_key="arrays", code_version=versions["msm"],
           ins={"lnamd_maps": AssetIn(key("lnamd_features")), "manifest": AssetIn(key("image_manifest"))},
           kinds={"pytorch", "safetensors"}, pool=MODEL_POOL, **common)
    def msm_scores(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                   manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """Mutual scores s_{l,r}(i, m) per stage l and degree r: N×L×R×P (float32).

        Stored per stage and degree so ablations re-aggregate without recomputing. With
        ``aggregation: snamd`` the degrees are pooled inside SNAMD, so R = 1.
        """
        ys = [torch.from_numpy(lnamd_maps.arrays[f"y{i}"]) for i in range(4)]
        n, h, w, _ = ys[0].shape
        refs = _reference_maps(model, profile, method) if method.mode != "zero_shot" else None
        groups = subsets.divide(list(manifest["defect_type"].astype(str)), method.subsets, method.subset_seed)
        reporters: dict[str, Callable[[int, int], None]] = {}

        def progress(label: str, done: int, total: int) -> None:  # one log line per 10 % per subset and stage
            reporters.setdefault(label, _progress(context, f"MSM blocks done ({label})"))(done, total)

        score = snamd.score_stages if method.aggregation == "snamd" else msm.score_stages
        with measure(model.torch_device) as measured:
            out = score(
                ys, groups, method.degrees, method.interval, references=refs, mode=method.mode,
                device=model.torch_device, memory_budget=model.msm_memory_budget,
                result_budget=model.msm_result_budget_mb * 2**20, dtype=model.msm_dtype, progress=progress,
            ).numpy()
        bad = ~np.isfinite(out.reshape(n, -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"MSM produced non-finite scores for: {', '.join(manifest['path'][bad].head(5))}")
        timing = measured.per_image(n)
        bundle = ArrayBundle({"scores": out}, {
            "grid": json.dumps([h, w]), "degrees": json.dumps(list(method.degrees)),
            "interval": json.dumps(list(method.interval)), "subsets": str(method.subsets),
            "mode": method.mode, "aggregation": method.aggregation,
            "timing": json.dumps(timing), "identity": lnamd_maps.meta.get("identity", "{}"),
        })
        return Output(bundle, metadata={"shape": str(list(out.shape))} | _timing_metadata(timing))

    @asset(name="anomaly_maps", io_manager_key="arrays", code_version=versions["maps"],
           ins={"scores": AssetIn(key("msm_scores")), "features": AssetIn(key("backbone_features"))},
           kinds={"pytorch", "safetensors"}, **common)
    def anomaly_maps(context: AssetExecutionContext, scores: ArrayBundle, features: ArrayBundle) -> Output[ArrayBundle]:
        """S×S anomaly maps (bilinear, align_corners) and image scores c_i (``image_score``: max or top-q mean)."""
        ident = json.loads(features.meta["identity"])
        grid = tuple(json.loads(scores.meta["grid"]))
        with measure(torch.device("cpu")) as measured:
            amaps, image = maps.from_msm_scores(torch.from_numpy(scores.arrays["scores"]), grid,
                                                ident["image_size"], method.smoothing_sigma,
                                                method.image_score, method.image_score_q)
        timing = measured.per_image(len(image))
        bundle = ArrayBundle({"maps": amaps.numpy(), "image_scores": image.numpy()},
                             {"timing": json.dumps(timing), "image_size": str(ident["image_size"])})
        top = int(torch.argmax(image))
        return Output(bundle, metadata={"shape": str(list(amaps.shape))} | _timing_metadata(timing) | {
                                        "preview (highest-scoring image)": MetadataValue.md(map_preview_png(amaps[top].numpy()))})

    @asset(name="salient_features", io_manager_key="arrays", code_version=versions["salient"],
           ins={"lnamd_maps": AssetIn(key("lnamd_features")), "scores": AssetIn(key("msm_scores"))},
           kinds={"pytorch", "safetensors"}, **common)
    def salient_features(context: AssetExecutionContext, lnamd_maps: ArrayBundle, scores: ArrayBundle) -> Output[ArrayBundle]:
        """RsCon's anomaly-salient features (N×C): the aggregated feature of the second-to-last
        stage at each image's highest grid-level patch score (:mod:`musc_pipeline.core.rscon`)."""
        stage = len([k for k in lnamd_maps.arrays if k.startswith("y")]) + rscon.SALIENT_STAGE
        with measure(torch.device("cpu")) as measured:
            feats = rscon.salient_features(
                torch.from_numpy(lnamd_maps.arrays[f"y{stage}"]),
                maps.patch_scores(torch.from_numpy(scores.arrays["scores"])), method.degrees, method.aggregation)
        timing = measured.per_image(len(feats))
        bundle = ArrayBundle({"salient": feats.numpy()}, {"timing": json.dumps(timing), "stage": str(stage),
                                                          "aggregation": method.aggregation})
        return Output(bundle, metadata={"shape": str(list(feats.shape)), "stage": stage} | _timing_metadata(timing))

    rescore_ins = {"amaps": AssetIn(key("anomaly_maps")), "features": AssetIn(key("backbone_features")),
                   "manifest": AssetIn(key("image_manifest"))}
    if method.rescoring == "rscon":
        rescore_ins["salient"] = AssetIn(key("salient_features"))

    @asset(name="rscin_scores", io_manager_key="tables", code_version=versions["rscin"],
           ins=rescore_ins, kinds={"parquet"}, **common)
    def rscin_scores(context: AssetExecutionContext, amaps: ArrayBundle, features: ArrayBundle,
                     manifest: pd.DataFrame, **rscon_in: ArrayBundle) -> Output[pd.DataFrame]:
        """Per image: the MSM image score and the re-scored one (one table row each).

        ``score_rscin`` holds the score after the profile's ``rescoring``: RsCIN over class
        tokens (paper), RsCon over anomaly-salient features (MuSc-V2), or none (= ``score_msm``).
        """
        dataset, _, _ = where(context)
        c = torch.from_numpy(amaps.arrays["image_scores"])
        if method.rescoring == "rscin":
            windows = method.rscin_windows or rscin.windows_for(dataset)
            rescored = rscin.rescore(c, torch.from_numpy(features.arrays["class_tokens"]), windows)
        elif method.rescoring == "rscon":
            windows = tuple(sorted({1, *method.rscon_windows}))
            rescored = rscon.rescore(c, torch.from_numpy(rscon_in["salient"].arrays["salient"]), windows)
        else:
            windows, rescored = (), c.double()
        df = manifest[["profile", "dataset", "category", "image_id", "path", "defect_type", "label"]].copy()
        df["score_msm"] = c.double().numpy()
        df["score_rscin"] = rescored.numpy()
        df["rescoring"] = method.rescoring
        df["rscin_windows"] = json.dumps(list(windows))
        ident = json.loads(features.meta["identity"])
        df["backbone"] = ident["backbone"]
        df["random_init"] = bool(ident["random_init"])
        return Output(df, metadata={"rows": len(df), "windows": str(list(windows))})

    @asset(name="category_metrics", io_manager_key="tables", code_version=versions["metrics"],
           ins={"scores": AssetIn(key("rscin_scores")), "amaps": AssetIn(key("anomaly_maps")),
                "manifest": AssetIn(key("image_manifest")), "features": AssetIn(key("backbone_features")),
                "msm_out": AssetIn(key("msm_scores"))},
           kinds={"parquet"}, check_specs=[
               AssetCheckSpec("metrics_in_unit_interval", asset=key("category_metrics")),
               AssetCheckSpec("regression_vs_previous", asset=key("category_metrics"),
                              description=f"warn when a metric moved by more than {REGRESSION_TOLERANCE} since the last run"),
               AssetCheckSpec("paper_reference", asset=key("category_metrics"),
                              description=f"MVTec AD / VisA: warn when more than {PAPER_TOLERANCE} from the paper"),
           ], **common)
    def category_metrics(context: AssetExecutionContext, scores: pd.DataFrame, amaps: ArrayBundle,
                         manifest: pd.DataFrame, features: ArrayBundle, msm_out: ArrayBundle):
        """Image AUROC/F1-max/AP (RsCIN scores) and pixel AUROC/F1-max/AP/PRO, one row."""
        dataset, _, category = where(context)
        size = int(amaps.meta["image_size"])
        labels = scores["label"]
        notes: list[str] = []
        if labels.isna().any():
            values = {k: math.nan for k in metrics.IMAGE_METRICS + metrics.PIXEL_METRICS}
            notes.append("unlabeled images: metrics n/a")
        else:
            img = metrics.image_metrics(labels.to_numpy(int), scores["score_rscin"].to_numpy())
            values, notes = dict(img.values), list(img.notes)
            gt = ground_truth(manifest, size, method.mask_rule)
            if gt is None:
                values |= {k: math.nan for k in metrics.PIXEL_METRICS}
                notes.append("no ground-truth masks: pixel metrics n/a")
            else:
                px = metrics.pixel_metrics(gt, amaps.arrays["maps"])
                values |= px.values
                notes += px.notes
        ident = json.loads(features.meta["identity"])
        n = len(scores)
        row = {"profile": name, "dataset": dataset, "category": category, **values,
               "n_images": n, "n_anomalous": int((labels == 1).sum()), "notes": "; ".join(notes),
               "backbone": ident["backbone"], "weights_sha256": ident["weights_sha256"] or "",
               "random_init": bool(ident["random_init"]), "image_size": ident["image_size"],
               "mask_rule": method.mask_rule, "config": fingerprint(profile),
               "materialized_at": datetime.now(timezone.utc).isoformat()}
        stage_timings = [json.loads(meta["timing"]) for meta in (features.meta, msm_out.meta, amaps.meta)]
        for stage, t in zip(("features", "msm", "maps"), stage_timings):
            row[f"{stage}_ms_per_image"] = float(t["ms_per_image"])
        # each stage may have run in its own process: the category's peaks are the stages' maxima
        row["peak_rss_mb"] = float(max(t["peak_rss_mb"] for t in stage_timings))
        gpu = [t["peak_gpu_mb"] for t in stage_timings if t["peak_gpu_mb"] is not None]
        row["peak_gpu_mb"] = float(max(gpu)) if gpu else math.nan
        previous = _previous_metrics(context, key("category_metrics"))
        for k in metrics.IMAGE_METRICS + metrics.PIXEL_METRICS:
            row[f"previous_{k}"] = previous.get(k, math.nan)
        row["previous_backbone"] = previous.get("backbone", "")
        df = pd.DataFrame([row])
        table = df[["dataset", "category", *metrics.IMAGE_METRICS, *metrics.PIXEL_METRICS]]
        meta = {"metrics": MetadataValue.md(_md_table(table)), "notes": "; ".join(notes) or "none"}
        meta |= {k: MetadataValue.float(float(v)) for k, v in values.items()}
        meta["backbone"] = ident["backbone"]
        yield Output(df, metadata=meta)
        yield from metric_checks(row, previous)

    stages = [image_manifest, backbone_features, lnamd_features, msm_scores, anomaly_maps, rscin_scores, category_metrics]
    return stages + ([salient_features] if method.rescoring == "rscon" else [])


def ground_truth(manifest: pd.DataFrame, size: int, rule: str) -> np.ndarray | None:
    """N×S×S ground-truth masks by ``rule``, or None when labels or masks are missing."""
    if manifest["label"].isna().any() or manifest.loc[manifest["label"] == 1, "mask_path"].isna().any():
        return None
    gt = np.zeros((len(manifest), size, size), dtype=bool)
    for i, row in enumerate(manifest.itertuples()):
        if isinstance(row.mask_path, str):
            gt[i] = mask_array(read_mask(row.mask_path, (row.width, row.height)), size, rule)
    return gt


REGRESSION_TOLERANCE = 0.02
PAPER_TOLERANCE = 0.05
REFERENCE_CSV = Path(__file__).resolve().parents[1] / "reports" / "reference_results.csv"


def metric_checks(row: dict, previous: dict):
    """Check results of one category's metrics row."""
    names = metrics.IMAGE_METRICS + metrics.PIXEL_METRICS
    values = {k: row[k] for k in names}
    out_of_range = [k for k, v in values.items() if not (math.isnan(v) or 0.0 <= v <= 1.0)]
    yield AssetCheckResult(check_name="metrics_in_unit_interval", passed=not out_of_range,
                           metadata={"out_of_range": ", ".join(out_of_range) or "none"})
    moved = {k: values[k] - previous[k] for k in names
             if k in previous and not math.isnan(values[k]) and not math.isnan(previous[k])
             and abs(values[k] - previous[k]) > REGRESSION_TOLERANCE}
    yield AssetCheckResult(check_name="regression_vs_previous", passed=not moved, severity=AssetCheckSeverity.WARN,
                           metadata={"compared_with_previous": bool(previous),
                                     "moved": MetadataValue.json({k: round(v, 4) for k, v in moved.items()})})
    ref = reference_row(row["dataset"], row["category"])
    far = {k: values[k] - ref[k] for k in ref
           if not math.isnan(values[k]) and abs(values[k] - ref[k]) > PAPER_TOLERANCE}
    yield AssetCheckResult(check_name="paper_reference", passed=not far, severity=AssetCheckSeverity.WARN,
                           metadata={"has_reference": bool(ref),
                                     "beyond_tolerance": MetadataValue.json({k: round(v, 4) for k, v in far.items()})})


def reference_row(dataset: str, category: str) -> dict[str, float]:
    """The paper's numbers for a category (fractions), or {} where the paper has none."""
    ref = load_reference(REFERENCE_CSV)
    hit = ref[(ref["dataset"] == dataset) & (ref["category"] == category)]
    if hit.empty:
        return {}
    r = hit.iloc[0]
    return {k: float(r[k]) / 100.0 for k in metrics.IMAGE_METRICS + metrics.PIXEL_METRICS}


def _previous_metrics(context: AssetExecutionContext, asset_key: AssetKey) -> dict:
    """Metric values recorded by the previous materialization of this partition (if any)."""
    from dagster import AssetRecordsFilter

    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        return {}
    meta = records[0].asset_materialization.metadata
    out = {k: v.value for k, v in meta.items() if k in metrics.IMAGE_METRICS + metrics.PIXEL_METRICS}
    if "backbone" in meta:
        out["backbone"] = meta["backbone"].value
    return out


def _reference_maps(model: ModelResource, profile: ProfileSettings, method) -> list[torch.Tensor]:
    """Layer-normed stage maps of the normal reference images (few-shot, MuSc+)."""
    if not method.references:
        raise ValueError(f"MSM mode {method.mode!r} needs method.references: a folder of normal images")
    folder = Path(method.references)
    paths = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{folder}: no reference images found")
    emb = model.embed(profile.backbone, (read_image(p) for p in paths), len(paths))
    return [lnamd.layer_norm_map(torch.from_numpy(t)) for t in emb.taps]


def run_facts(profile_name: str, profile: ProfileSettings, metrics_df: pd.DataFrame) -> dict[str, str]:
    """Facts for the report: backbone identity, method config, timings, memory, versions, date."""
    import importlib.metadata as md

    facts = {"profile": profile_name, "description": profile.description}
    if len(metrics_df):
        first = metrics_df.iloc[0]
        facts |= {"backbone": str(first["backbone"]), "weights sha256": str(first["weights_sha256"]) or "n/a (random)",
                  "randomly initialised": str(bool(first["random_init"])), "image size": str(first["image_size"]),
                  "mask rule": str(first["mask_rule"])}
        for stage in ("features", "msm", "maps"):
            col = f"{stage}_ms_per_image"
            facts[f"time per image: {stage} (ms, mean over categories)"] = f"{metrics_df[col].mean():.1f}"
        facts["peak memory (process RSS, MB, max)"] = f"{metrics_df['peak_rss_mb'].max():.0f}"
        if metrics_df.get("peak_gpu_mb", pd.Series(dtype=float)).notna().any():  # absent in tables before it
            facts["peak GPU memory (allocated by torch, MB, max)"] = f"{metrics_df['peak_gpu_mb'].max():.0f}"
    facts["method"] = profile.method.model_dump_json()
    facts["backbone settings"] = profile.backbone.model_dump_json()
    facts["subsets"] = str(profile.method.subsets)
    for pkg in ("torch", "open_clip_torch", "timm", "dagster"):
        facts[f"version: {pkg}"] = md.version(pkg)
    facts["python"] = platform.python_version()
    facts["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return facts
