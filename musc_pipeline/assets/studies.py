"""Ablation studies of one profile (issue #12), partitioned by ``<dataset>/<category>``.

    lnamd_features -> msm_similarities          (study input: sorted per-pair maxima S_{l,r})
                   -> msm_scores_extra_degrees  (study input: s_{l,r} for r = 7, 9 only)
    study_degrees         <- msm_scores + msm_scores_extra_degrees   Tab. 3, Tab. 9
    study_msm_variants    <- msm_similarities                        Tab. 5 (a)–(f)
    study_percentage      <- msm_similarities                        Fig. 8
    study_interval_start  <- msm_similarities                        Tab. 10
                          (these three: one multi-asset, one pass over the similarities)
    study_rscin           <- rscin_scores (the MSM image scores)     Tab. 5 RsCIN, Fig. 8 windows
    study_rscin_plugin    <- rscin_scores + imported Parquet scores  Tab. 11
    study_subsets         <- lnamd_features (MSM re-run per s)       Tab. 7   (study_runs.py)
    study_fewshot         <- lnamd_features + train/good references  Tab. 16  (study_runs.py)

Every study writes one long table (profile, study, setting, setting_order, dataset, category,
metric, value); the catalog's ``ablation_results`` view unites them. Each study's metadata says
what it recomputed. The study inputs are only made when a study runs: ``msm_similarities`` is
N×L×R×P×(N−1) float32 (≈ 340 MB for a 96-image category on a 28×28 grid), which the default
path does not need.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dagster import (
    AllPartitionMapping,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)

from musc_pipeline.assets.context import MODEL_POOL, ProfileContext
from musc_pipeline.assets.features import lnamd_inputs
from musc_pipeline.assets.metadata import timing_metadata
from musc_pipeline.assets.study_backbones import BACKBONES_KEY
from musc_pipeline.assets.study_common import (
    CategoryTruth,
    ensure_paper_method,
    study_args,
    study_group,
    study_output,
    subset_groups,
)
from musc_pipeline.assets.study_runs import fewshot_study_asset, subsets_study_asset
from musc_pipeline.core import ablation, msm
from musc_pipeline.reports import studies as study_report
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.model import measure
from musc_pipeline.resources.storage import ArrayBundle
from musc_pipeline.settings import Settings

STUDIES = ("degrees", "msm_variants", "percentage", "interval_start", "rscin", "rscin_plugin", "subsets", "fewshot")


def msm_similarities_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="msm_similarities", io_manager_key="arrays", pool=MODEL_POOL, kinds={"pytorch", "safetensors"},
           ins={"lnamd_maps": AssetIn(p.key("lnamd_features")), "manifest": AssetIn(p.key("image_manifest"))},
           **study_args(p, "msm"))
    def msm_similarities(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                         manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """Study input: S_{l,r}(i, m), each image's per-pair maxima sorted descending
        (N×L×R×P×(N−1) float32) and each image's pool size (N). The same products as
        ``msm_scores`` (:func:`msm.max_similarities`), kept before the interval average so every
        MSM variant is a slice. float32, not float16: the studies must equal fresh runs to 1e-6."""
        p.ensure_usable()
        ensure_paper_method(p)
        if p.method.mode != "zero_shot":
            raise Failure(description=f"profile {p.name!r}: the MSM studies re-aggregate zero-shot scores; "
                          f"method.mode is {p.method.mode!r}")
        ys = lnamd_inputs(p, lnamd_maps, model, manifest)
        with measure(model.torch_device) as measured:
            sims, pool = ablation.sorted_similarities(
                ys, subset_groups(p, manifest), p.method.degrees, device=model.torch_device,
                memory_budget=model.msm_memory_budget, dtype=model.msm_dtype)
        timing = measured.per_image(len(pool))
        bundle = ArrayBundle({"similarities": sims.numpy(), "pool": pool.numpy()}, {
            "grid": json.dumps(list(ys[0].shape[1:3])), "degrees": json.dumps(list(p.method.degrees)),
            "timing": json.dumps(timing)})
        return Output(bundle, metadata={"shape": str(list(sims.shape)), "MB": round(sims.numel() * 4 / 2**20, 1),
                                        "seconds": round(float(timing["seconds"]), 2)} | timing_metadata(timing))

    return msm_similarities


def msm_extra_degrees_asset(p: ProfileContext) -> AssetsDefinition:
    extra = p.settings.studies.extra_degrees

    @asset(name="msm_scores_extra_degrees", io_manager_key="arrays", pool=MODEL_POOL, kinds={"pytorch", "safetensors"},
           ins={"lnamd_maps": AssetIn(p.key("lnamd_features")), "manifest": AssetIn(p.key("image_manifest"))},
           **study_args(p, "msm", list(extra)))
    def msm_scores_extra_degrees(context: AssetExecutionContext, model: ModelResource, lnamd_maps: ArrayBundle,
                                 manifest: pd.DataFrame) -> Output[ArrayBundle]:
        """Study input: s_{l,r}(i, m) for the extra degrees only (``studies.extra_degrees``,
        Tab. 9), N×L×R'×P, with the profile's interval and subsets."""
        p.ensure_usable()
        ensure_paper_method(p)
        ys = lnamd_inputs(p, lnamd_maps, model, manifest)
        with measure(model.torch_device) as measured:
            out = msm.score_stages(ys, subset_groups(p, manifest), extra, p.method.interval,
                                   device=model.torch_device, memory_budget=model.msm_memory_budget,
                                   result_budget=model.msm_result_budget_mb * 2**20, dtype=model.msm_dtype)
        timing = measured.per_image(len(out))
        bundle = ArrayBundle({"scores": out.numpy()}, {"degrees": json.dumps(list(extra)), "timing": json.dumps(timing)})
        return Output(bundle, metadata={"shape": str(list(out.shape))} | timing_metadata(timing))

    return msm_scores_extra_degrees


def degrees_study_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="study_degrees", io_manager_key="tables", kinds={"parquet"},
           ins={"stored": AssetIn(p.key("msm_scores")), "extra": AssetIn(p.key("msm_scores_extra_degrees")),
                "features": AssetIn(p.key("backbone_features")), "manifest": AssetIn(p.key("image_manifest"))},
           **study_args(p, "msm"))
    def study_degrees(context: AssetExecutionContext, stored: ArrayBundle, extra: ArrayBundle,
                      features: ArrayBundle, manifest: pd.DataFrame) -> Output[pd.DataFrame]:
        """Aggregation degrees (Tab. 3, Tab. 9): A(i, m) averaged over each non-empty subset of the
        stored degrees, then the stored set plus each extra degree."""
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        stored_degrees, extra_degrees = json.loads(stored.meta["degrees"]), json.loads(extra.meta["degrees"])
        degrees = stored_degrees + extra_degrees
        scores = torch.cat([torch.from_numpy(stored.arrays["scores"]), torch.from_numpy(extra.arrays["scores"])], dim=2)
        grid = tuple(json.loads(stored.meta["grid"]))
        results = {name: where.evaluate(p, ablation.select_degrees(scores, degrees, chosen), grid)
                   for name, chosen in ablation.degree_sets(stored_degrees, extra_degrees).items()}
        return study_output(p, "degrees", where, results,
                             f"MSM for degrees {extra_degrees} only (msm_scores_extra_degrees); "
                             f"degrees {stored_degrees} re-aggregated from msm_scores")

    return study_degrees


#: The MSM re-aggregation studies: their settings and what they are.
REDUCTION_STUDIES: dict[str, tuple[dict[str, ablation.Reduction], str]] = {
    "msm_variants": (ablation.MSM_VARIANTS, "MSM variants (Tab. 5 a–f)"),
    "percentage": (ablation.PERCENTAGES, "Selection percentage (Fig. 8)"),
    "interval_start": (ablation.INTERVAL_STARTS, "Interval start (Tab. 10)"),
}


def reduction_studies_asset(p: ProfileContext) -> AssetsDefinition:
    """``study_msm_variants``, ``study_percentage`` and ``study_interval_start`` as one multi-asset:
    the similarities are loaded and passed over once for whichever of them a run selects."""
    outs = {f"study_{study}": AssetOut(
        key=p.key(f"study_{study}"), io_manager_key="tables", kinds={"parquet"}, is_required=False,
        code_version=study_args(p, "msm", study)["code_version"],
        description=f"{what}: s_{{l,r}}(i, m) re-aggregated from the stored sorted similarities.")
        for study, (_, what) in REDUCTION_STUDIES.items()}

    @multi_asset(name=f"{p.name}__msm_reaggregation", outs=outs, can_subset=True, group_name=study_group(p.name),
                 partitions_def=p.partitions,
                 ins={"sims": AssetIn(p.key("msm_similarities")), "features": AssetIn(p.key("backbone_features")),
                      "manifest": AssetIn(p.key("image_manifest"))})
    def msm_reaggregation(context: AssetExecutionContext, sims: ArrayBundle, features: ArrayBundle,
                          manifest: pd.DataFrame):
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        chosen = [s for s in REDUCTION_STUDIES if p.key(f"study_{s}") in context.selected_asset_keys]
        t0 = time.perf_counter()
        all_scores = ablation.reaggregate(torch.from_numpy(sims.arrays["similarities"]),
                                          torch.from_numpy(sims.arrays["pool"]),
                                          {name: r for s in chosen for name, r in REDUCTION_STUDIES[s][0].items()})
        # one pass for every setting of every chosen study: each study's share on its first row
        share_s = (time.perf_counter() - t0) / len(chosen)
        grid = tuple(json.loads(sims.meta["grid"]))
        for study in chosen:
            results = {}
            for name in REDUCTION_STUDIES[study][0]:
                results[name] = ({} if results else {"reaggregate_s": share_s}) | where.evaluate(p, all_scores[name], grid)
            yield study_output(p, study, where, results, "nothing: re-aggregated msm_similarities (no product), "
                               f"one pass shared by {', '.join(chosen)}", output_name=f"study_{study}")

    return msm_reaggregation


def rscin_study_asset(p: ProfileContext) -> AssetsDefinition:
    @asset(name="study_rscin", io_manager_key="tables", kinds={"parquet"},
           ins={"scores": AssetIn(p.key("rscin_scores")), "features": AssetIn(p.key("backbone_features")),
                "manifest": AssetIn(p.key("image_manifest"))}, **study_args(p, "rscin"))
    def study_rscin(context: AssetExecutionContext, scores: pd.DataFrame, features: ArrayBundle,
                    manifest: pd.DataFrame) -> Output[pd.DataFrame]:
        """RsCIN on/off (Tab. 5) and single / full / multi-window (Fig. 8) on the stored MSM
        image scores c_i (image metrics only: RsCIN does not touch the maps)."""
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        c = torch.from_numpy(scores["score_msm"].to_numpy(copy=True))
        results = {}
        for name, windows in ablation.rscin_settings(where.windows).items():
            t0 = time.perf_counter()
            final = ablation.rescore(c, where.tokens, windows, p.method.rscin_precision)
            results[name] = {"rescore_s": time.perf_counter() - t0} | _image_metrics(where, final)
        return study_output(p, "rscin", where, results, "nothing: RsCIN re-run on rscin_scores.score_msm")

    return study_rscin


def _image_metrics(where: CategoryTruth, final: torch.Tensor) -> dict[str, float]:
    values = ablation.score_metrics(where.labels, final.numpy())
    return {k: values[k] for k in ablation.STUDY_METRICS if k.startswith("image_")}


def imported_scores(path: str | Path, manifest: pd.DataFrame) -> np.ndarray | None:
    """Another method's image scores for the manifest's images, from a Parquet file with (path,
    score) columns (paths compared after resolving). None when the file has none of them."""
    table = pd.read_parquet(path)
    if not {"path", "score"} <= set(table.columns):
        raise ValueError(f"{path}: imported scores need the columns path and score, found {list(table.columns)}")
    by_path = dict(zip(table["path"].map(lambda s: str(Path(s).resolve())), table["score"].astype(float)))
    found = [by_path.get(str(Path(s).resolve())) for s in manifest["path"]]
    missing = [s for s, v in zip(manifest["path"], found) if v is None]
    if len(missing) == len(found):
        return None
    if missing:
        raise ValueError(f"{path}: no score for {len(missing)} of {len(found)} images, e.g. {missing[0]}")
    return np.asarray(found, dtype=np.float64)


def rscin_plugin_study_asset(p: ProfileContext) -> AssetsDefinition:
    imported = p.settings.studies.imported_scores

    @asset(name="study_rscin_plugin", io_manager_key="tables", kinds={"parquet"},
           ins={"scores": AssetIn(p.key("rscin_scores")), "features": AssetIn(p.key("backbone_features")),
                "manifest": AssetIn(p.key("image_manifest"))}, **study_args(p, "rscin", imported))
    def study_rscin_plugin(context: AssetExecutionContext, scores: pd.DataFrame, features: ArrayBundle,
                           manifest: pd.DataFrame) -> Output[pd.DataFrame]:
        """RsCIN as a plug-in (Tab. 11): any image-score column — this profile's MSM scores and every
        file of ``studies.imported_scores`` — without and with RsCIN (the profile's class tokens)."""
        p.ensure_usable()
        where = CategoryTruth(p, context, manifest, features)
        sources: dict[str, np.ndarray] = {f"{p.name} (MSM image score)": scores["score_msm"].to_numpy(copy=True)}
        for name, path in imported.items():
            values = imported_scores(path, manifest)
            if values is None:
                context.log.info(f"imported scores {name!r} ({path}) hold no image of this category")
            else:
                sources[name] = values
        results = {}
        for name, values in sources.items():
            for label, windows in (("w/o RsCIN", None), ("w RsCIN", where.windows)):
                final = ablation.rescore(torch.from_numpy(values), where.tokens, windows, p.method.rscin_precision)
                results[f"{name}: {label}"] = _image_metrics(where, final)
        return study_output(p, "rscin_plugin", where, results,
                             f"nothing: RsCIN run on {len(sources)} stored or imported score column(s)")

    return study_rscin_plugin


STUDY_FACTORIES: tuple[Callable[[ProfileContext], AssetsDefinition], ...] = (
    msm_similarities_asset, msm_extra_degrees_asset, degrees_study_asset,
    reduction_studies_asset,
    rscin_study_asset, rscin_plugin_study_asset, subsets_study_asset, fewshot_study_asset,
)


def build_study_assets(p: ProfileContext) -> list[AssetsDefinition]:
    """Every study asset of one profile (group ``<profile>_studies``)."""
    return [factory(p) for factory in STUDY_FACTORIES]


def build_study_pages(settings: Settings) -> AssetsDefinition:
    """The study pages: ``reports/study_<study>.html`` from every profile's materialized studies."""
    keys = {f"{p}__{s}": AssetKey([p, f"study_{s}"]) for p in settings.profiles for s in STUDIES}
    keys["backbones"] = BACKBONES_KEY

    @asset(name="study_pages", group_name="studies", kinds={"html"},
           ins={k: AssetIn(key, partition_mapping=AllPartitionMapping(), metadata={"allow_missing_partitions": True})
                for k, key in keys.items()})
    def study_pages(context: AssetExecutionContext, **tables) -> MaterializeResult:
        """One HTML page per study (paper table format, paper values and Δ where the paper has
        them, plots of the sweeps) and ``studies.html`` listing them."""
        parts = []
        for value in tables.values():
            parts += [value] if isinstance(value, pd.DataFrame) else list(value.values())
        rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["study"])
        pages = study_report.render_study_pages(Path(settings.reports_dir), rows)
        context.log.info(f"{len(pages)} study pages written to {settings.reports_dir}")
        return MaterializeResult(metadata={"index": MetadataValue.path(str(Path(settings.reports_dir) / "studies.html")),
                                           "rows": len(rows)})

    return study_pages
