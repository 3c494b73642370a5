"""End-to-end parity with the authors' MuSc code on the fixtures in ``../shared/parity``.

Each fixture holds what the official implementation (xrli-U/MuSc b76b93d) produced from PNG
files of the demo category ``PA_BDP01_TL`` with a known network: the project's seeded random
initialisation (``weights: random, seed: 0`` at the backbone's native size) with every float
tensor rounded to a float16-representable value (see the fixtures' README). :func:`run`
writes those weights to a checkpoint, copies the fixture's images into a dataset folder,
materializes the profile's per-category assets through Dagster (the project's own loader,
preprocessing, LNAMD, MSM, maps, RsCIN and metrics) and returns the largest difference per
stage against the authors' arrays.

Run ``python tests/parity.py`` to print the table that docs/parity.md "Parity with the official
code" quotes; ``tests/test_parity.py`` asserts the tolerances.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
PARITY_DIR = Path(os.environ.get("MUSC_PARITY_DIR", REPO.parent / "shared" / "parity"))
DEMO_CATEGORY = REPO / "data" / "demo" / "PA_BDP01_TL"


@dataclass(frozen=True)
class Fixture:
    name: str
    backbone: str
    image_size: int


FIXTURES = (
    Fixture("vitb16_224_n24", "ViT-B-16", 224),
    Fixture("vitb16_256_n6", "ViT-B-16", 256),
    Fixture("vitl14_336_518_n6", "ViT-L-14-336", 518),
)
METRICS = ("image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_pro")


def fixture_weights(backbone: str, folder: Path) -> Path:
    """The fixtures' network: seeded random init at the native size, rounded through float16.

    Saved as float16 safetensors (exact: every value is float16-representable), half the size.
    """
    from safetensors.torch import save_file

    from musc_pipeline.core import backbone as bb
    from musc_pipeline.core.registry import get_spec

    path = folder / f"{backbone}-random-seed0-fp16.safetensors"
    if path.is_file():
        return path
    spec = get_spec(backbone)
    captured: dict[str, torch.Tensor] = {}
    bb.build(spec, spec.native_size, seed=0, load_weights=lambda model: captured.update(model.state_dict()))
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in captured.items()}
    save_file(state, str(path))
    return path


def largest_difference(differences: list[float]) -> float:
    """The largest absolute difference; NaN if any is NaN (Python's ``max`` skips a NaN that is
    not first, so a NaN metric would pass a tolerance check)."""
    values = np.abs(np.asarray(differences, dtype=float))
    return float(np.nan) if np.isnan(values).any() else float(values.max())


def _copy_images(images: np.ndarray, root: Path) -> None:
    for rel in images:
        rel = Path(str(rel))  # test/<defect>/<name>.png
        (root / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_CATEGORY / rel, root / rel)
        if rel.parent.name != "good":
            mask = Path("ground_truth") / rel.parent.name / f"{rel.stem}_mask.png"
            (root / mask.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy(DEMO_CATEGORY / mask, root / mask)


def run(fixture: Fixture, work: Path, weights_folder: Path, msm_precision: str = "exact_fp32") -> dict[str, float]:
    """Materialize the fixture's category through the assets; largest differences per stage.

    ``work`` receives the dataset and the results; ``weights_folder`` caches the checkpoints;
    ``msm_precision`` is the model resource's (docs/msm-precision.md).
    """
    from dagster import DagsterInstance
    from safetensors.numpy import load_file

    from upath import UPath

    from musc_pipeline.assets.ground_truth import ground_truth
    from musc_pipeline.assets.scoring import full_maps
    from musc_pipeline.resources.storage import ArrayIOManager
    from musc_pipeline.definitions import build_definitions
    from musc_pipeline.resources.backbone import ModelResource
    from musc_pipeline.settings import BackboneSettings, DatasetSettings, ProfileSettings, Settings

    expected = np.load(PARITY_DIR / f"{fixture.name}.npz")
    data = work / fixture.name / "data"
    _copy_images(expected["images"], data / "PA_BDP01_TL")
    weights = fixture_weights(fixture.backbone, weights_folder)
    settings = Settings(
        storage=str(work / fixture.name / "store"), reports_dir=str(work / fixture.name / "reports"),
        datasets={"demo": DatasetSettings(root=str(data))},
        profiles={"parity": ProfileSettings(backbone=BackboneSettings(
            name=fixture.backbone, weights=str(weights), image_size=fixture.image_size))},
    )
    defs = build_definitions(settings, model=ModelResource(msm_precision=msm_precision))
    start = time.perf_counter()
    result = defs.resolve_job_def("parity_categories").execute_in_process(
        partition_key="demo/PA_BDP01_TL", instance=DagsterInstance.ephemeral())
    assert result.success
    seconds = time.perf_counter() - start

    store = Path(settings.storage) / "parity"
    features = load_file(str(store / "backbone_features" / "demo" / "PA_BDP01_TL.safetensors"))
    msm_out = load_file(str(store / "msm_scores" / "demo" / "PA_BDP01_TL.safetensors"))
    maps_file = store / "anomaly_maps" / "demo" / "PA_BDP01_TL.safetensors"
    maps_out = ArrayIOManager(base_path=UPath(store)).load_from_path(None, UPath(maps_file))
    scores = pd.read_parquet(store / "rscin_scores" / "demo" / "PA_BDP01_TL.parquet")
    row = pd.read_parquet(store / "category_metrics" / "demo" / "PA_BDP01_TL.parquet").iloc[0]
    manifest = pd.read_parquet(store / "image_manifest" / "demo" / "PA_BDP01_TL.parquet")
    ours_paths = [Path(p).relative_to(data / "PA_BDP01_TL").as_posix() for p in manifest["path"]]
    assert ours_paths == [str(p) for p in expected["images"]], "image order differs from the fixture"

    authors_metrics = json.loads(str(expected["metrics"]))
    gt = ground_truth(manifest, fixture.image_size, row["mask_rule"])
    return {
        "class tokens": float(np.abs(features["class_tokens"] - expected["class_embeddings"]).max()),
        "MSM patch scores": float(np.abs(msm_out["scores"] - expected["msm_patch_scores"]).max()),
        "anomaly maps": float(np.abs(full_maps(maps_out) - expected["maps"]).max()),
        "image scores": float(np.abs(maps_out.arrays["image_scores"] - expected["image_scores"]).max()),
        "RsCIN scores": float(np.abs(scores["score_rscin"].to_numpy() - expected["rscin_scores"]).max()),
        "mask pixels differing": float((gt != expected["masks"]).sum()),
        "metrics": largest_difference([float(row[k]) - authors_metrics[k] for k in METRICS]),
        **{f"metric {k}": abs(float(row[k]) - authors_metrics[k]) for k in METRICS},
        "seconds": seconds,
    }


def main() -> int:
    """``python tests/parity.py [FIXTURE ...] [--msm-precision exact_fp32|lowp_rerank|auto]``."""
    args = sys.argv[1:]
    precision = "exact_fp32"
    if "--msm-precision" in args:
        at = args.index("--msm-precision")
        precision = args[at + 1]
        del args[at : at + 2]
    names = args or [f.name for f in FIXTURES]
    with tempfile.TemporaryDirectory() as tmp:
        results = {f.name: run(f, Path(tmp), Path(tmp), precision) for f in FIXTURES if f.name in names}
    table = pd.DataFrame(results)
    with pd.option_context("display.float_format", "{:.2e}".format, "display.width", 160):
        print(table.to_string())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
