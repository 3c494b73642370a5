"""Shared fixtures: small real datasets (copied from the embedded PIPED demo) and settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from musc_pipeline.settings import (
    BackboneSettings,
    DatasetSettings,
    MethodSettings,
    ProfileSettings,
    Settings,
)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"


def make_category(root: Path, category: str, source: str = "PA_BDP01_TL", n: int = 5) -> Path:
    """A category in MVTec layout with n normal + n defective images (and masks) from the demo."""
    src = DEMO / source
    for sub in ("test/good", "test/defect", "ground_truth/defect"):
        (root / category / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{i:03d}.png"
        shutil.copy(src / "test" / "good" / name, root / category / "test" / "good" / name)
        shutil.copy(src / "test" / "defect" / name, root / category / "test" / "defect" / name)
        shutil.copy(src / "ground_truth" / "defect" / f"{i:03d}_mask.png",
                    root / category / "ground_truth" / "defect" / f"{i:03d}_mask.png")
    return root / category


def small_settings(tmp: Path, data_root: Path, **method) -> Settings:
    return Settings(
        storage=str(tmp / "store"),
        reports_dir=str(tmp / "reports"),
        datasets={"mini": DatasetSettings(root=str(data_root))},
        profiles={"musc": ProfileSettings(
            backbone=BackboneSettings(name="efficientnet_lite0"),
            method=MethodSettings(**method),
        )},
    )


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_category(root, "cat1")
    return root


@pytest.fixture(scope="session")
def registry_hub(tmp_path_factory):
    """A hub cache holding seeded weights of every registry hub backbone (tests/hub_cache.py):
    written once per session, 3.6 GB of float16 files, removed at its end (pytest keeps the
    temporary folders of the last three sessions)."""
    from hub_cache import write_registry

    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    yield {"cache": cache, **write_registry(cache)}
    shutil.rmtree(cache, ignore_errors=True)
