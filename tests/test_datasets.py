"""Dataset layouts, the file policy, and dataset roots: on real files built here.

The MVTec 3D-AD and MVTec LOCO AD fixtures copy the published folder layouts (names, nesting,
the files beside the images) with demo images standing in for the originals.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance
from PIL import Image

from conftest import DEMO, REPO, make_category, small_settings
from musc_pipeline.assets.partitions import partition_keys
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources.datasets import DatasetError, categories, read_mask, scan_category
from musc_pipeline.settings import DEMO_ROOT, DatasetSettings, load_settings

SRC = DEMO / "PA_BDP01_TL"
PER_CATEGORY = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics"]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)


def _mask(i: int) -> np.ndarray:
    return np.asarray(Image.open(SRC / "ground_truth" / "defect" / f"{i:03d}_mask.png")) > 127


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def run_assets(settings, key: str, names: list[str]):
    """Materialize ``names`` of profile musc for one partition; (result, warning messages logged)."""
    instance = DagsterInstance.ephemeral()
    job = build_definitions(settings).resolve_job_def("musc_categories")
    result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                    asset_selection=[AssetKey(["musc", n]) for n in names])
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    return result, warnings


# --------------------------------------------------------------------------- the file policy


def test_non_image_files_are_skipped_with_one_warning_naming_them_in_the_run_log(tmp_path):
    root = tmp_path / "data"
    cat = make_category(root, "cat", n=3)
    junk = [cat / "test" / "defect" / "Thumbs.db", cat / "test" / "good" / ".DS_Store",
            cat / "test" / "README", cat / "ground_truth" / "defect" / "notes.txt",
            cat / "test" / "good" / "._000.png"]  # a macOS resource fork: hidden, not an image
    for p in junk:
        p.write_bytes(b"\x00\x01 not an image")
    (cat / "test" / "good" / "thumbs").mkdir()  # a folder inside an image folder
    result, warnings = run_assets(small_settings(tmp_path, root), "mini/cat", ["image_manifest"])
    assert result.success
    manifest = pd.read_parquet(tmp_path / "store" / "musc" / "image_manifest" / "mini" / "cat.parquet")
    assert len(manifest) == 6
    skipped = [w for w in warnings if "skipped" in w]
    assert len(skipped) == 1, warnings
    assert str(cat) in skipped[0] and "skipped 6 entries" in skipped[0]
    for p in junk + [cat / "test" / "good" / "thumbs"]:
        assert os.path.relpath(p, cat) in skipped[0], p


@pytest.mark.parametrize("kind", ["dangling", "loop", "unreadable"])
def test_broken_links_and_unreadable_images_stop_the_category_naming_the_file(tmp_path, kind):
    root = tmp_path / "data"
    cat = make_category(root, "cat", n=2)
    bad = cat / "test" / "good" / "009.png"
    if kind == "dangling":
        os.symlink(tmp_path / "moved_away.png", bad)
        problem = f"broken symbolic link (its target {tmp_path / 'moved_away.png'} does not exist)"
    elif kind == "loop":
        os.symlink(cat / "test" / "good" / "010.png", bad)
        os.symlink(bad, cat / "test" / "good" / "010.png")
        problem = "broken symbolic link (a loop"
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        problem = "not a readable image"
    with pytest.raises(DatasetError) as err:
        scan_category(root, "mvtec", "cat")
    assert str(err.value).startswith(f"{bad}: ") and problem in str(err.value)


def test_an_image_beside_defect_folders_has_no_label_and_is_refused(tmp_path):
    root = tmp_path / "data"
    cat = make_category(root, "cat", n=2)
    _copy(SRC / "test" / "good" / "005.png", cat / "test" / "005.png")
    with pytest.raises(DatasetError, match="image lies directly in .* label is unknown"):
        scan_category(root, "mvtec", "cat")


def test_inverted_masks_are_accepted_with_a_warning_naming_their_folder(tmp_path, caplog):
    root = tmp_path / "data"
    cat = make_category(root, "cat", n=3)
    with caplog.at_level(logging.WARNING):
        scan_category(root, "mvtec", "cat")
    assert "inverted" not in caplog.text  # the demo's masks cover a few percent
    for i in range(3):
        path = cat / "ground_truth" / "defect" / f"{i:03d}_mask.png"
        _save_mask(~_mask(i), path)  # 255 = normal
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        df = scan_category(root, "mvtec", "cat")
    assert len(df) == 6
    assert f"{cat / 'ground_truth' / 'defect'}: 3 of 3 masks mark more than half" in caplog.text
    assert "inverted" in caplog.text


# --------------------------------------------------------------------------- published layouts


def mvtec_3d_root(tmp: Path) -> Path:
    """MVTec 3D-AD as distributed: <cat>/{calibration,train,validation,test}; test/<type>/{rgb,gt,xyz}."""
    root = tmp / "mvtec_3d_anomaly_detection"
    cat = root / "bagel"
    (cat / "calibration").mkdir(parents=True)
    (cat / "calibration" / "camera_parameters.json").write_text(json.dumps({"focus": 1.0}))
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (root / "readme.txt").write_text("MVTec 3D-AD")
    for split in ("train", "validation"):
        _copy(SRC / "test" / "good" / "010.png", cat / split / "good" / "rgb" / "000.png")
    xyz = np.zeros((128, 128), np.float32)
    for t, (kind, indices) in enumerate([("good", [0, 1, 2]), ("crack", [0, 1]), ("combined", [2])]):
        for n, i in enumerate(indices):
            name = f"{n:03d}"
            folder = cat / "test" / kind
            src = SRC / "test" / ("good" if kind == "good" else "defect") / f"{i:03d}.png"
            _copy(src, folder / "rgb" / f"{name}.png")
            _save_mask(np.zeros((128, 128), bool) if kind == "good" else _mask(i), folder / "gt" / f"{name}.png")
            (folder / "xyz").mkdir(exist_ok=True)
            Image.fromarray(xyz).save(folder / "xyz" / f"{name}.tiff")
    return root


def test_mvtec_3d_layout_reads_rgb_with_gt_masks_and_ignores_good_masks(tmp_path):
    root = mvtec_3d_root(tmp_path)
    assert categories(root, "mvtec_3d") == ["bagel"]
    df = scan_category(root, "mvtec_3d", "bagel")
    assert sorted(df["image_id"]) == ["combined/000.png", "crack/000.png", "crack/001.png",
                                      "good/000.png", "good/001.png", "good/002.png"]
    assert all(Path(p).parent.name == "rgb" for p in df["path"])
    good, bad = df[df["label"] == 0], df[df["label"] == 1]
    assert good["mask_path"].isna().all() and len(good) == 3
    assert [Path(p).relative_to(root).as_posix() for p in bad["mask_path"]] == [
        "bagel/test/combined/gt/000.png", "bagel/test/crack/gt/000.png", "bagel/test/crack/gt/001.png"]
    np.testing.assert_array_equal(read_mask(bad["mask_path"].iloc[0], (128, 128)), _mask(2))
    # a defect image without its gt file is refused, naming the image and the missing mask
    (root / "bagel" / "test" / "crack" / "gt" / "001.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/rgb/001.png: anomalous image has no mask .*crack/gt/001.png"):
        scan_category(root, "mvtec_3d", "bagel")


def mvtec_loco_root(tmp: Path) -> Path:
    """MVTec LOCO AD as distributed: <cat>/{train,validation}/good, test/{good,logical_anomalies,
    structural_anomalies}, ground_truth/<type>/<nnn>/000.png, 001.png…, defects_config.json."""
    root = tmp / "mvtec_loco_anomaly_detection"
    cat = root / "juice_bottle"
    cat.mkdir(parents=True)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (cat / "defects_config.json").write_text(json.dumps([{"defect_name": "missing_bottle", "pixel_value": 255}]))
    for split in ("train", "validation"):
        _copy(SRC / "test" / "good" / "010.png", cat / split / "good" / "000.png")
    for n in range(3):
        _copy(SRC / "test" / "good" / f"{n:03d}.png", cat / "test" / "good" / f"{n:03d}.png")
    for kind, pairs in (("logical_anomalies", [(0, 1), (2,)]), ("structural_anomalies", [(3, 4)])):
        for n, defects in enumerate(pairs):
            _copy(SRC / "test" / "defect" / f"{defects[0]:03d}.png", cat / "test" / kind / f"{n:03d}.png")
            for k, i in enumerate(defects):  # one mask per defect in the image's own folder
                _save_mask(_mask(i), cat / "ground_truth" / kind / f"{n:03d}" / f"{k:03d}.png")
    return root


def test_mvtec_loco_layout_unites_each_images_mask_folder(tmp_path):
    root = mvtec_loco_root(tmp_path)
    assert categories(root, "mvtec_loco") == ["juice_bottle"]
    df = scan_category(root, "mvtec_loco", "juice_bottle")
    assert df["defect_type"].value_counts().to_dict() == {"good": 3, "logical_anomalies": 2, "structural_anomalies": 1}
    assert df.loc[df["label"] == 0, "mask_path"].isna().all()
    row = df[df["image_id"] == "logical_anomalies/000.png"].iloc[0]
    assert Path(row["mask_path"]) == root / "juice_bottle" / "ground_truth" / "logical_anomalies" / "000"
    np.testing.assert_array_equal(read_mask(row["mask_path"], (128, 128)), _mask(0) | _mask(1))
    assert not (_mask(0) == _mask(1)).all()  # the union is more than one of them
    # a mask folder whose image is gone is refused, naming the folder
    (root / "juice_bottle" / "test" / "structural_anomalies" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"structural_anomalies/000: mask folder without a matching test image"):
        scan_category(root, "mvtec_loco", "juice_bottle")


def test_mvtec_loco_category_runs_end_to_end_with_pixel_metrics(tmp_path):
    root = mvtec_loco_root(tmp_path)
    settings = small_settings(tmp_path, root)
    settings = settings.model_copy(update={"datasets": {"loco": DatasetSettings(root=str(root), layout="mvtec_loco")}})
    result, _ = run_assets(settings, "loco/juice_bottle", PER_CATEGORY)
    assert result.success
    metrics = pd.read_parquet(tmp_path / "store" / "musc" / "category_metrics" / "loco" / "juice_bottle.parquet").iloc[0]
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["image_auroc"] <= 1.0


# --------------------------------------------------------------------------- dataset roots


def test_a_copied_config_keeps_the_demo_and_relative_roots_follow_the_file(tmp_path, monkeypatch):
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    shutil.copy(REPO / "musc.yaml", elsewhere / "musc.yaml")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(elsewhere / "musc.yaml")
    assert Path(settings.datasets["demo"].root) == DEMO_ROOT
    assert partition_keys(settings) == ["demo/PA_BDP01_TL", "demo/PA_BRG02_RL", "demo/PA_GLA01_TL"]
    assert Path(settings.storage) == elsewhere / ".musc"
    make_category(elsewhere / "mine", "cat", n=1)
    (elsewhere / "musc.yaml").write_text("datasets:\n  own: {root: mine}\n  home: {root: ~/x}\n")
    settings = load_settings(elsewhere / "musc.yaml")
    assert settings.datasets["own"].root == str(elsewhere / "mine")
    assert settings.datasets["home"].root == str(Path.home() / "x")
    monkeypatch.setenv("MUSC_BTAD_ROOT", "btad_here")  # a shell path: relative to the working directory
    assert load_settings(elsewhere / "musc.yaml").datasets["btad"].root == str(tmp_path / "btad_here")


def test_roots_without_categories_are_reported_when_the_code_location_loads(tmp_path, caplog):
    good = tmp_path / "good"
    make_category(good, "cat", n=1)
    single = make_category(tmp_path, "one_category", n=1)  # the root names a category itself
    settings = small_settings(tmp_path, good).model_copy(update={"datasets": {
        "mini": DatasetSettings(root=str(good)),
        "typo": DatasetSettings(root=str(tmp_path / "godo")),
        "single": DatasetSettings(root=str(single)),
        "visa": DatasetSettings(root=str(good), layout="visa"),
    }})
    with caplog.at_level(logging.WARNING):
        defs = build_definitions(settings)
    keys = defs.resolve_asset_graph().get(AssetKey(["musc", "image_manifest"])).partitions_def.get_partition_keys()
    assert keys == ["mini/cat"]
    assert f"dataset typo: root {tmp_path / 'godo'} does not exist" in caplog.text
    assert f"dataset single: root {single} holds no category: it has a test/ folder itself" in caplog.text
    assert f"dataset visa: root {good} holds no split_csv/1cls.csv" in caplog.text
    assert "dataset mini" not in caplog.text


def test_a_wrong_root_is_named_on_the_cli(tmp_path):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text("datasets:\n  mine: {root: /nonexistent/images}\n"
                   "profiles:\n  musc: {backbone: {name: efficientnet_lite0}}\n")
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(tmp_path))
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run([str(dagster), "asset", "list", "-m", "musc_pipeline.definitions"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset mine: root /nonexistent/images does not exist" in proc.stderr
