"""Reliability: bad inputs, weights, atomic writes, concurrent and interrupted materializations.

Everything that the issue says runs "through the real assets" does: partitions are
materialized with the ``musc_categories`` job and the real IO managers, on small corpora
generated here from the embedded demo images. Monkeypatching is used only at boundaries
(``os.replace``/``os.fsync`` to stop a write midway, ``ModelResource.embed`` to poison
features).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster import AssetKey, DagsterInstance
from PIL import Image
from safetensors.numpy import load_file
from upath import UPath

from conftest import DEMO, make_category, small_settings
from musc_pipeline.assets.partitions import partition_keys, split_key
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources import storage
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.weights import WeightsUnavailableError, load_extractor
from musc_pipeline.resources.datasets import read_image, read_mask
from musc_pipeline.settings import BackboneSettings, DatasetSettings, ProfileSettings, Settings

PER_CATEGORY = ["image_manifest", "backbone_features", "lnamd_features", "msm_scores", "anomaly_maps",
                "rscin_scores", "category_metrics"]
ARRAY_ASSETS = ["backbone_features", "lnamd_features", "msm_scores", "anomaly_maps"]
TABLE_ASSETS = ["image_manifest", "rscin_scores", "category_metrics"]
#: A category folder name full of HTML / shell / SQL specials.
ODD = '<script>&"x\''


# --------------------------------------------------------------------------- helpers


def run_job(settings: Settings, key: str, names=PER_CATEGORY, model: ModelResource | None = None):
    defs = build_definitions(settings, model=model)
    job = defs.resolve_job_def("musc_categories")
    return job.execute_in_process(partition_key=key, instance=DagsterInstance.ephemeral(),
                                  asset_selection=[AssetKey(["musc", n]) for n in names], raise_on_error=False)


def failure(result) -> tuple[str, str]:
    """(step key, error text with its causes and class names) of the run's only step failure."""
    assert not result.success
    events = result.get_step_failure_events()
    assert len(events) == 1, [e.step_key for e in events]
    err, parts = events[0].event_specific_data.error, []
    while err is not None:
        parts.append(f"{err.cls_name}: {err.message}")
        err = err.cause
    return events[0].step_key, "\n".join(parts)


def stored_files(base: str | Path) -> list[Path]:
    base = Path(base)
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


def asset_file(settings: Settings, asset: str, key: str) -> Path:
    dataset, category = key.split("/", 1)
    ext = ".parquet" if asset in TABLE_ASSETS else ".safetensors"
    return Path(settings.storage) / "musc" / asset / dataset / f"{category}{ext}"


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray, RGB or RGBA; Pillow cannot write 16-bit colour)."""
    a = pixels if pixels.ndim == 3 else pixels[:, :, None]
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def parquet_bytes(df: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


# A stand-alone materialization script for the subprocess tests (settings come as JSON).
HELPER = r'''
import json, os, sys, time
from pathlib import Path

cfg = json.loads(Path(sys.argv[1]).read_text())
if cfg.get("pause_on"):  # stop (for a SIGKILL) exactly when a finished temp file is about to be renamed
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if cfg["pause_on"] in os.fspath(dst):
            print("PAUSED", json.dumps([os.fspath(src), os.fspath(dst)]), flush=True)
            time.sleep(600)
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace

import duckdb
from dagster import AssetKey, DagsterInstance
from musc_pipeline.definitions import build_definitions
from musc_pipeline.resources.backbone import ModelResource
from musc_pipeline.resources.weights import load_extractor
from musc_pipeline.resources.storage import rebuild_catalog
from musc_pipeline.settings import BackboneSettings, Settings

out = {}
if cfg.get("load_extractor"):
    start = time.perf_counter()
    try:
        load_extractor(BackboneSettings.model_validate(cfg["load_extractor"]))
        out["direct"] = {"error": None}
    except Exception as exc:
        out["direct"] = {"error": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start}

settings = Settings.model_validate(cfg["settings"])
defs = build_definitions(settings, model=ModelResource(threads=1))
job = defs.resolve_job_def("musc_categories")
result = job.execute_in_process(partition_key=cfg["key"], instance=DagsterInstance.ephemeral(), raise_on_error=False,
                                asset_selection=[AssetKey(["musc", n]) for n in cfg["assets"]])
out["success"] = result.success
out["failures"] = []
for ev in result.get_step_failure_events():
    err, msgs = ev.event_specific_data.error, []
    while err is not None:
        msgs.append(f"{err.cls_name}: {err.message}")
        err = err.cause
    out["failures"].append({"step": ev.step_key, "message": "\n".join(msgs)})

if result.success and cfg.get("barrier"):  # all workers rebuild and query the catalog at the same time
    barrier = Path(cfg["barrier"])
    (barrier / f"{os.getpid()}.ready").touch()
    deadline = time.time() + 180
    while len(list(barrier.glob("*.ready"))) < cfg["workers"] and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(cfg["catalog_rounds"]):
        db = rebuild_catalog(settings.storage)
        con = duckdb.connect(str(db), read_only=True)
        try:
            con.execute("SELECT count(*) FROM rscin_scores").fetchone()
        finally:
            con.close()
print("RESULT " + json.dumps(out), flush=True)
sys.exit(0 if result.success else 1)
'''


def spawn(workdir: Path, settings: Settings, key: str, assets=PER_CATEGORY, env=None, **cfg) -> SimpleNamespace:
    workdir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"\W", "_", key) + f"_{time.monotonic_ns()}"
    script = workdir / "materialize_helper.py"
    script.write_text(HELPER)
    config = workdir / f"{tag}.json"
    config.write_text(json.dumps({"settings": settings.model_dump(mode="json"), "key": key,
                                  "assets": list(assets), **cfg}))
    out, err = workdir / f"{tag}.out", workdir / f"{tag}.err"
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with out.open("wb") as fo, err.open("wb") as fe:  # files, not pipes: Dagster logs a lot
        proc = subprocess.Popen([sys.executable, str(script), str(config)], stdout=fo, stderr=fe,
                                cwd=workdir, env=full_env)
    return SimpleNamespace(proc=proc, out=out, err=err)


def finish(job: SimpleNamespace, timeout: float = 400) -> SimpleNamespace:
    try:
        rc = job.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.proc.kill()
        job.proc.wait()
        rc = "timeout"
    stdout = job.out.read_text(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    errors = [ln for ln in job.err.read_text(errors="replace").splitlines() if " - dagster - " not in ln]
    return SimpleNamespace(rc=rc, result=json.loads(lines[-1][7:]) if lines else None,
                           stderr="\n".join(errors)[-4000:])


# --------------------------------------------------------------------------- bad inputs: clear errors


def _corrupt_png(cat):
    p = cat / "test" / "defect" / "001.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
    return p, "not a readable image"


def _bitflipped_png(cat):
    p = cat / "test" / "good" / "000.png"
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    return p, "not a readable image"


def _truncated_png(cat):
    p = cat / "test" / "good" / "002.png"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, "not a readable image.*truncated"


def _dangling_link_in_defect_folder(cat):
    p = cat / "test" / "defect" / "005.png"
    os.symlink(cat / "elsewhere" / "005.png", p)
    return p, "broken symbolic link .its target .* does not exist"


def _text_named_png(cat):
    p = cat / "test" / "good" / "readme.png"
    p.write_text("not really a png")
    return p, "not a readable image"


def _mask_wrong_size(cat):
    p = cat / "ground_truth" / "defect" / "001_mask.png"
    Image.open(p).resize((64, 96)).save(p)
    return p, "mask is 64.96 but its image is 128.128"


def _corrupt_mask(cat):
    p = cat / "ground_truth" / "defect" / "000_mask.png"
    p.write_bytes(b"garbage")
    return p, "not a readable image"


def _missing_mask(cat):
    (cat / "ground_truth" / "defect" / "002_mask.png").unlink()
    return cat / "test" / "defect" / "002.png", "anomalous image has no mask"


def _extra_mask(cat):
    p = cat / "ground_truth" / "defect" / "007_mask.png"
    shutil.copy(cat / "ground_truth" / "defect" / "000_mask.png", p)
    return p, "mask without a matching test image"


def _mask_for_unknown_defect(cat):
    (cat / "ground_truth" / "scratch").mkdir()
    p = cat / "ground_truth" / "scratch" / "000_mask.png"
    shutil.copy(cat / "ground_truth" / "defect" / "000_mask.png", p)
    return p, "mask without a matching test image"


def _one_image(cat):
    shutil.rmtree(cat / "test" / "defect")
    shutil.rmtree(cat / "ground_truth")
    for p in sorted((cat / "test" / "good").iterdir())[1:]:
        p.unlink()
    return cat, r"1 test image\(s\).*at least 2"


def _empty_category(cat):
    shutil.rmtree(cat / "test")
    shutil.rmtree(cat / "ground_truth")
    (cat / "test" / "good").mkdir(parents=True)
    return cat, r"0 test image\(s\)"


BAD_INPUTS = [_corrupt_png, _bitflipped_png, _truncated_png, _dangling_link_in_defect_folder, _text_named_png,
              _mask_wrong_size, _corrupt_mask, _missing_mask, _extra_mask, _mask_for_unknown_defect, _one_image, _empty_category]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_with_file_and_problem_before_anything_is_written(tmp_path, make_bad):
    root = tmp_path / "data"
    cat = make_category(root, "cat", n=3)
    offending, problem = make_bad(cat)
    settings = small_settings(tmp_path, root)
    step, message = failure(run_job(settings, "mini/cat"))
    assert step == "musc__image_manifest"  # the first stage: validated before any output
    assert "DatasetError" in message
    assert str(offending) in message, message
    assert re.search(problem, message), message
    assert stored_files(settings.storage) == []


# --------------------------------------------------------------------------- convertible inputs, odd names


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One category named with HTML specials, holding gray / RGBA / 16-bit / palette images,
    an RGB mask, and the same file name in two defect types; materialized end to end."""
    tmp = tmp_path_factory.mktemp("odd")
    root = tmp / "data"
    cat = make_category(root, ODD, n=4)
    good, defect = cat / "test" / "good", cat / "test" / "defect"
    originals = {name: np.asarray(Image.open(p).convert("RGB"))
                 for name, p in {"gray": good / "000.png", "rgba": good / "001.png", "gray16": good / "002.png",
                                 "rgb16": defect / "000.png", "rgba16": defect / "003.png"}.items()}
    Image.open(good / "000.png").convert("L").save(good / "000.png")
    rgba = Image.open(good / "001.png").convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))))
    rgba.save(good / "001.png")
    gray16 = np.asarray(Image.open(good / "002.png").convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(good / "002.png")  # mode I;16
    write_png16(defect / "000.png", originals["rgb16"].astype(np.uint16) * 257)
    write_png16(defect / "003.png", np.dstack([originals["rgba16"], np.full((128, 128), 200, np.uint8)])
                .astype(np.uint16) * 257)
    Image.open(good / "003.png").convert("P").save(good / "003.png")
    mask = cat / "ground_truth" / "defect" / "001_mask.png"
    Image.open(mask).convert("RGB").save(mask)
    # the same file name under two defect types
    (cat / "test" / "scratch").mkdir()
    (cat / "ground_truth" / "scratch").mkdir()
    shutil.copy(DEMO / "PA_BDP01_TL" / "test" / "defect" / "005.png", cat / "test" / "scratch" / "000.png")
    shutil.copy(DEMO / "PA_BDP01_TL" / "ground_truth" / "defect" / "005_mask.png",
                cat / "ground_truth" / "scratch" / "000_mask.png")
    settings = small_settings(tmp, root)
    key = f"mini/{ODD}"
    result = run_job(settings, key)
    return SimpleNamespace(root=root, cat=cat, settings=settings, key=key, result=result, originals=originals)


def test_grayscale_rgba_16bit_and_palette_images_are_converted(odd_run):
    assert odd_run.result.success, failure(odd_run.result)
    good, defect = odd_run.cat / "test" / "good", odd_run.cat / "test" / "defect"
    expected_gray = np.asarray(Image.fromarray(odd_run.originals["gray"]).convert("L"))
    np.testing.assert_array_equal(read_image(good / "000.png"), np.dstack([expected_gray] * 3))
    np.testing.assert_array_equal(read_image(good / "001.png"), odd_run.originals["rgba"])
    expected_gray16 = np.asarray(Image.fromarray(odd_run.originals["gray16"]).convert("L"))
    np.testing.assert_array_equal(read_image(good / "002.png"), np.dstack([expected_gray16] * 3))
    np.testing.assert_array_equal(read_image(defect / "000.png"), odd_run.originals["rgb16"])
    np.testing.assert_array_equal(read_image(defect / "003.png"), odd_run.originals["rgba16"])
    manifest = pd.read_parquet(asset_file(odd_run.settings, "image_manifest", odd_run.key))
    assert {"L", "RGBA", "I;16", "P", "RGB"} <= set(manifest["mode"])
    assert (manifest[["width", "height"]] == 128).all().all()
    maps = load_file(str(asset_file(odd_run.settings, "anomaly_maps", odd_run.key)))
    assert maps["patch_maps"].shape[0] == len(manifest) == 9 and np.isfinite(maps["patch_maps"]).all()
    metrics = pd.read_parquet(asset_file(odd_run.settings, "category_metrics", odd_run.key)).iloc[0]
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0  # masks (one stored as RGB) were read


def test_same_file_name_in_two_defect_types_gets_distinct_ids(odd_run):
    assert odd_run.result.success, failure(odd_run.result)
    scores = pd.read_parquet(asset_file(odd_run.settings, "rscin_scores", odd_run.key))
    manifest = pd.read_parquet(asset_file(odd_run.settings, "image_manifest", odd_run.key))
    assert len(scores) == 9 and scores["image_id"].is_unique and manifest["image_id"].is_unique
    same = manifest[manifest["path"].map(lambda p: Path(p).name == "000.png")
                    & manifest["defect_type"].isin(["defect", "scratch"])]
    assert sorted(same["image_id"]) == ["defect/000.png", "scratch/000.png"]
    assert same["mask_path"].is_unique and same["sha1"].is_unique


def test_category_with_html_specials_runs_end_to_end_inside_storage(odd_run):
    assert odd_run.result.success, failure(odd_run.result)
    settings = odd_run.settings
    assert f"mini/{ODD}" in partition_keys(settings)
    assert split_key(settings, odd_run.key)[2] == ODD
    base = Path(settings.storage).resolve()
    for asset in PER_CATEGORY:
        path = asset_file(settings, asset, odd_run.key)
        assert path.is_file(), asset
        assert path.resolve().parent == base / "musc" / asset / "mini"
    for path in stored_files(base):
        assert path.resolve().is_relative_to(base)
    db = storage.rebuild_catalog(settings.storage)
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT count(*) FROM rscin_scores WHERE category = ?", [ODD]).fetchone()[0]
        metrics = con.execute("SELECT category FROM category_metrics").fetchall()
    finally:
        con.close()
    assert rows == 9 and metrics == [(ODD,)]


@pytest.mark.parametrize("key", ["mini/..", "mini/../x", "../x", "mini/.", "mini/", "mini/a/b", "mini/a\\..\\b",
                                 "nope/cat"])
def test_path_like_partition_keys_are_refused(tmp_path, key):
    settings = small_settings(tmp_path, tmp_path / "data")
    with pytest.raises(ValueError, match="partition key"):
        split_key(settings, key)
    if ".." in key or key.endswith("/"):
        with pytest.raises(ValueError, match="not a safe relative path"):
            storage._safe_partition(UPath(tmp_path / "store"), key)


def test_unusable_category_folders_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    make_category(root, "ok", n=1)
    odd = ["dots...name", "tab\tname", "line\nbreak", "back\\slash"]
    for name in odd:
        (root / name / "test" / "good").mkdir(parents=True)
    settings = small_settings(tmp_path, root)
    with caplog.at_level(logging.WARNING):
        assert partition_keys(settings) == ["mini/ok"]
        defs = build_definitions(settings)  # one odd folder must not break the code location
    keys = defs.resolve_asset_graph().get(AssetKey(["musc", "image_manifest"])).partitions_def.get_partition_keys()
    assert keys == ["mini/ok"]
    for name in odd:
        assert repr(name) in caplog.text


# --------------------------------------------------------------------------- masks and VisA manifests


def test_label_index_masks_count_every_nonzero_pixel(tmp_path):
    """VisA's original masks hold small label values (0/1/2…), not 0/255."""
    block = np.zeros((32, 32), np.uint8)
    block[4:12, 4:12] = 1
    block[20:24, 20:30] = 2
    Image.fromarray(block).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png", (32, 32)), block > 0)
    binary = (block.astype(np.int32) * 255 // 2).astype(np.uint8)  # 0/127/255: the > 127 rule is kept
    Image.fromarray(binary).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "binary.png", (32, 32)), block == 2)
    wrong_size = re.escape(str(tmp_path / "labels.png")) + ".*mask is 32.32 but its image is 16.16"
    with pytest.raises(ValueError, match=wrong_size):
        read_mask(tmp_path / "labels.png", (16, 16))


def _visa_root(tmp: Path, extra_rows: list[list[str]] = ()) -> Path:
    root = tmp / "visa"
    src = DEMO / "PA_BDP01_TL"
    rows = [["object", "split", "label", "image", "mask"]]
    for i in range(2):
        rel = f"obj/Data/Images/Normal/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "test" / "good" / f"{i:03d}.png", root / rel)
        rows.append(["obj", "test", "normal", rel, ""])
    for i, sub in enumerate(["a", "b"]):  # the same file name in two folders
        rel, mrel = f"obj/Data/Images/Anomaly/{sub}/000.png", f"obj/Data/Masks/Anomaly/{sub}/000.png"
        for r in (rel, mrel):
            (root / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "test" / "defect" / f"{i:03d}.png", root / rel)
        mask = np.asarray(Image.open(src / "ground_truth" / "defect" / f"{i:03d}_mask.png")) > 127
        Image.fromarray(mask.astype(np.uint8)).save(root / mrel)  # VisA style: 0/1
        rows.append(["obj", "test", "anomaly", rel, mrel])
    rows.append(["../evil", "test", "normal", "obj/Data/Images/Normal/000.png", ""])
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(",".join(r) for r in rows + list(extra_rows)) + "\n")
    return root


def test_visa_manifest_ids_are_unique_and_repeated_rows_refused(tmp_path):
    root = _visa_root(tmp_path)
    settings = Settings(storage=str(tmp_path / "store"), reports_dir=str(tmp_path / "reports"),
                        datasets={"v": DatasetSettings(root=str(root), layout="visa")},
                        profiles={"musc": ProfileSettings(backbone=BackboneSettings(name="efficientnet_lite0"))})
    assert partition_keys(settings) == ["v/obj"]  # '../evil' from the CSV is not a partition
    result = run_job(settings, "v/obj", names=["image_manifest"])
    assert result.success, failure(result)
    manifest = pd.read_parquet(asset_file(settings, "image_manifest", "v/obj"))
    assert len(manifest) == 4 and manifest["image_id"].is_unique
    for mask_path in manifest["mask_path"].dropna():
        assert read_mask(mask_path, (128, 128)).any()  # 0/1 masks are not read as empty

    # the same image listed twice would be scored twice: refused, naming the file
    shutil.rmtree(tmp_path / "store")
    dup = _visa_root(tmp_path / "dup", [["obj", "test", "normal", "obj/Data/Images/Normal/001.png", ""]])
    settings = settings.model_copy(update={"datasets": {"v": DatasetSettings(root=str(dup), layout="visa")}})
    step, message = failure(run_job(settings, "v/obj", names=["image_manifest"]))
    assert step == "musc__image_manifest"
    assert str(dup / "obj/Data/Images/Normal/001.png") in message and "listed twice" in message
    assert stored_files(settings.storage) == []


# --------------------------------------------------------------------------- backbones and weights


def test_unknown_backbone_name_lists_known_names(tmp_path):
    settings = small_settings(tmp_path, tmp_path / "data")
    profile = ProfileSettings(backbone=BackboneSettings(name="vit_typo"))
    pattern = r"unknown backbone 'vit_typo'; known backbones: .*ViT-L-14-336.*efficientnet_lite0"
    # the code location still loads (only this profile is unusable: tests/test_profiles.py)
    build_definitions(settings.model_copy(update={"profiles": {"musc": profile}}))
    with pytest.raises(ValueError, match=pattern):
        load_extractor(profile.backbone)
    assert not Path(settings.storage).exists()


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "weights.pth"
    backbone = BackboneSettings(name="efficientnet_lite0", weights=str(missing))
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(missing)) + ": checkpoint file not found"):
        load_extractor(backbone)
    root = tmp_path / "data"
    make_category(root, "cat", n=1)
    settings = small_settings(tmp_path, root).model_copy(
        update={"profiles": {"musc": ProfileSettings(backbone=backbone)}})
    step, message = failure(run_job(settings, "mini/cat", names=PER_CATEGORY[:2]))
    assert step == "musc__image_manifest"  # weights are located before anything is written
    assert "WeightsUnavailableError" in message and str(missing) in message
    assert not asset_file(settings, "image_manifest", "mini/cat").exists()
    assert not asset_file(settings, "backbone_features", "mini/cat").exists()


class _Exploit:
    """Pickles to a call of os.system: what a malicious .pth can do under plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("name,suffix", [("efficientnet_lite0", ".pth"), ("ViT-B-16", ".bin"), ("dino_vitb16", ".pt")])
def test_checkpoint_with_pickled_code_is_refused(tmp_path, name, suffix):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Exploit(marker)}, ckpt)
    assert not marker.exists()
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(ckpt)) + ": cannot read checkpoint"):
        load_extractor(BackboneSettings(name=name, weights=str(ckpt)))
    assert not marker.exists()


def test_hub_weights_missing_offline_fail_fast_naming_the_cache(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    root = tmp_path / "data"
    make_category(root, "cat", n=1)
    backbone = BackboneSettings(name="ViT-B-16", weights="default")
    settings = small_settings(tmp_path, root).model_copy(
        update={"profiles": {"musc": ProfileSettings(backbone=backbone)}})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    start = time.perf_counter()
    done = finish(spawn(tmp_path / "work", settings, "mini/cat", PER_CATEGORY[:2], env=env,
                        load_extractor=backbone.model_dump(mode="json")), timeout=240)
    assert done.result is not None, done.stderr
    assert time.perf_counter() - start < 180
    direct = done.result["direct"]
    assert direct["error"] == "WeightsUnavailableError", direct
    assert direct["seconds"] < 60
    for text in (direct["message"], done.result["failures"][0]["message"]):
        assert "ViT-B-16" in text and str(hf_home / "hub") in text, text
        assert "HF_HOME" in text and "backbone.weights" in text, text
    assert done.result["failures"][0]["step"] == "musc__image_manifest"
    assert "WeightsUnavailableError" in done.result["failures"][0]["message"]
    assert not asset_file(settings, "image_manifest", "mini/cat").exists()
    assert not asset_file(settings, "backbone_features", "mini/cat").exists()
    assert list(hf_home.rglob("*.bin")) == [] and list(hf_home.rglob("*.safetensors")) == []


# --------------------------------------------------------------------------- non-finite features


class _PoisonedModel(ModelResource):
    """The real model, with one image's features made non-finite at the resource boundary."""

    poison: str = "nan"
    index: int = 3

    def embed(self, settings, images, count, progress=None):
        emb = super().embed(settings, images, count, progress)
        if self.poison == "nan":
            emb.taps[2][self.index, 0, 0, 0] = np.nan
        else:
            emb.class_tokens[self.index, 0] = np.inf
        return emb


@pytest.mark.parametrize("poison,index", [("nan", 3), ("inf", 6)])
def test_non_finite_features_name_the_image_and_stop_the_partition(tmp_path, poison, index):
    root = tmp_path / "data"
    make_category(root, "cat", n=4)
    settings = small_settings(tmp_path, root)
    step, message = failure(run_job(settings, "mini/cat", names=PER_CATEGORY[:4],
                                     model=_PoisonedModel(poison=poison, index=index)))
    assert step == "musc__embed"
    paths = pd.read_parquet(asset_file(settings, "image_manifest", "mini/cat"))["path"]
    assert paths[index] in message and "NaN/inf" in message, message
    assert not any(p in message for i, p in enumerate(paths) if i != index)
    for asset in ("backbone_features", "lnamd_features", "msm_scores"):
        assert not asset_file(settings, asset, "mini/cat").exists(), asset


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("where", ["payload", "fsync", "rename"])
def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    base = tmp_path / "store"
    path = UPath(base / "musc" / "rscin_scores" / "mini" / "cat1.parquet")
    old = parquet_bytes(pd.DataFrame({"image_id": ["a", "b"]}))
    storage._atomic_write(path, old)
    payload: object = parquet_bytes(pd.DataFrame({"image_id": ["a", "b", "c"]}))

    def boom(*args, **kwargs):
        raise RuntimeError("disk gone")

    if where == "payload":
        payload = object()  # write() raises after the temporary file was opened
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", boom)  # bytes written, not yet renamed
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises((RuntimeError, TypeError)):
        storage._atomic_write(path, payload)
    monkeypatch.undo()
    assert Path(path.path).read_bytes() == old
    assert stored_files(base) == [Path(path.path)]  # no temporary left behind
    assert sorted(base.glob("*/rscin_scores/*/*.parquet")) == [Path(path.path)]
    assert len(pd.read_parquet(path.path)) == 2


def test_a_write_removes_killed_writers_old_temporaries_of_that_file_only(tmp_path):
    path = UPath(tmp_path / "store" / "musc" / "backbone_features" / "mini" / "cat1.safetensors")
    Path(path.path).parent.mkdir(parents=True)
    folder = Path(path.path).parent
    stale = folder / ".cat1.safetensors.4242.0123abcd.tmp"  # a writer killed two hours ago
    young = folder / ".cat1.safetensors.4343.4567ef01.tmp"  # maybe a live writer elsewhere
    other = folder / ".cat2.safetensors.4242.89abcdef.tmp"  # another file's: not this write's business
    for p in (stale, young, other):
        p.write_bytes(b"partial")
    two_hours_ago = time.time() - 2 * 3600
    for p in (stale, other):
        os.utime(p, (two_hours_ago, two_hours_ago))
    storage._atomic_write(path, b"complete")
    assert Path(path.path).read_bytes() == b"complete"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["cat1.safetensors", young.name, other.name])


def test_catalog_sees_only_complete_files_while_a_table_is_written(tmp_path, monkeypatch):
    base = tmp_path / "store"
    path = UPath(base / "musc" / "rscin_scores" / "mini" / "cat1.parquet")
    io_manager = storage.ParquetIOManager(base_path=UPath(base))
    io_manager.dump_to_path(None, pd.DataFrame({"image_id": ["a", "b"]}), path)
    seen: dict = {}
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        if os.fspath(dst) == path.path:  # the new table is complete on disk, not yet renamed
            seen["tmp"] = Path(os.fspath(src))
            seen["tmp_rows"] = len(pd.read_parquet(seen["tmp"]))
            seen["glob"] = sorted(base.glob("*/rscin_scores/*/*.parquet"))
            db = storage.rebuild_catalog(base)
            con = duckdb.connect(str(db), read_only=True)
            try:
                seen["rows"] = con.execute("SELECT count(*) FROM rscin_scores").fetchone()[0]
            finally:
                con.close()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    io_manager.dump_to_path(None, pd.DataFrame({"image_id": ["a", "b", "c"]}), path)
    assert seen, "the table was not written to a temporary name and renamed"
    assert seen["tmp"].parent == Path(path.path).parent and seen["tmp"].name.startswith(".")
    assert seen["tmp_rows"] == 3 and seen["glob"] == [Path(path.path)] and seen["rows"] == 2
    con = duckdb.connect(str(storage.rebuild_catalog(base)), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM rscin_scores").fetchone()[0] == 3
    finally:
        con.close()
    assert stored_files(base / "musc") == [Path(path.path)]


# --------------------------------------------------------------------------- concurrency and kill -9


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two categories of one dataset materialized at the same time by two OS processes into one
    storage folder, each then rebuilding and querying the DuckDB catalog in a loop."""
    tmp = tmp_path_factory.mktemp("pair")
    root = tmp / "data"
    make_category(root, "cat1", n=4)
    make_category(root, "cat2", source="PA_BRG02_RL", n=4)
    settings = small_settings(tmp, root)
    barrier = tmp / "barrier"
    barrier.mkdir()
    jobs = [spawn(tmp / "work", settings, key, barrier=str(barrier), workers=2, catalog_rounds=15)
            for key in ("mini/cat1", "mini/cat2")]
    return SimpleNamespace(root=root, settings=settings, done=[finish(j) for j in jobs])


def _catalog_counts(storage_path: str) -> dict:
    con = duckdb.connect(str(Path(storage_path) / storage.CATALOG_FILE), read_only=True)
    try:
        return {
            table: {c: (n, d) for c, n, d in con.execute(
                f"SELECT category, count(*), count(DISTINCT {col}) FROM {table} GROUP BY category").fetchall()}
            for table, col in (("image_manifest", "image_id"), ("rscin_scores", "image_id"),
                               ("category_metrics", "category"))
        }
    finally:
        con.close()


def test_two_partitions_in_two_processes_then_rematerialize(pair):
    for done in pair.done:
        assert done.rc == 0, done.stderr
        assert done.result["success"]
    expected = {"image_manifest": {"cat1": (8, 8), "cat2": (8, 8)},
                "rscin_scores": {"cat1": (8, 8), "cat2": (8, 8)},
                "category_metrics": {"cat1": (1, 1), "cat2": (1, 1)}}
    assert _catalog_counts(pair.settings.storage) == expected
    scores_file = asset_file(pair.settings, "rscin_scores", "mini/cat1")
    before = pd.read_parquet(scores_file)
    result = run_job(pair.settings, "mini/cat1", names=["rscin_scores", "category_metrics"])
    assert result.success, failure(result)
    storage.rebuild_catalog(pair.settings.storage)
    assert _catalog_counts(pair.settings.storage) == expected  # replaced, not appended
    pd.testing.assert_frame_equal(pd.read_parquet(scores_file), before)


def _wait_for_line(job: SimpleNamespace, prefix: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in job.out.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if job.proc.poll() is not None:
            break
        time.sleep(0.05)
    errors = [ln for ln in job.err.read_text(errors="replace").splitlines() if " - dagster - " not in ln]
    raise AssertionError(f"no {prefix!r} line (rc {job.proc.poll()}): " + "\n".join(errors)[-3000:])


def _visible(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in stored_files(base) if not p.name.startswith("."))


def test_kill_9_mid_write_then_rerun_equals_an_uninterrupted_run(pair, tmp_path):
    assert pair.done[0].rc == 0, pair.done[0].stderr
    key = "mini/cat1"
    settings = small_settings(tmp_path, pair.root)
    job = spawn(tmp_path / "work", settings, key, pause_on=f"msm_scores{os.sep}mini{os.sep}cat1")
    try:
        src, dst = json.loads(_wait_for_line(job, "PAUSED ", timeout=300)[len("PAUSED "):])
        # Frozen between "temporary complete" and "renamed": the final name does not exist yet,
        # and everything the catalog can see is complete.
        assert not Path(dst).exists() and Path(src).name.startswith(".") and src.endswith(".tmp")
        assert load_file(src)["scores"].shape[0] == 8
        for path in stored_files(settings.storage):
            if path.suffix == ".parquet":
                pq.read_table(path)
            elif path.suffix == ".safetensors":
                load_file(str(path))
        con = duckdb.connect(str(storage.rebuild_catalog(settings.storage)), read_only=True)
        try:
            views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
            assert views == {"image_manifest"}
            assert con.execute("SELECT count(*) FROM image_manifest").fetchone()[0] == 8
        finally:
            con.close()
    finally:
        if job.proc.poll() is None:
            os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait(timeout=60)
    assert job.proc.returncode == -signal.SIGKILL
    assert not asset_file(settings, "category_metrics", key).exists()

    # re-run to completion in the same storage, in a fresh process configured like the reference
    rerun = finish(spawn(tmp_path / "work", settings, key))
    assert rerun.rc == 0, rerun.stderr

    ref_base, new_base = Path(pair.settings.storage), Path(settings.storage)
    ref_files = [f for f in _visible(ref_base) if "cat1" in f]
    assert [f for f in _visible(new_base) if f != storage.CATALOG_FILE] == ref_files
    for asset in ARRAY_ASSETS:
        ref = load_file(str(asset_file(pair.settings, asset, key)))
        new = load_file(str(asset_file(settings, asset, key)))
        assert ref.keys() == new.keys()
        for name in ref:
            np.testing.assert_allclose(new[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{asset}/{name}")
    pd.testing.assert_frame_equal(pd.read_parquet(asset_file(settings, "image_manifest", key)),
                                  pd.read_parquet(asset_file(pair.settings, "image_manifest", key)))
    ref, new = (pd.read_parquet(asset_file(s, "rscin_scores", key)) for s in (pair.settings, settings))
    scores = ["score_msm", "score_rscin"]
    pd.testing.assert_frame_equal(new.drop(columns=scores), ref.drop(columns=scores))
    np.testing.assert_allclose(new[scores].to_numpy(), ref[scores].to_numpy(), atol=1e-6)
    ref, new = (pd.read_parquet(asset_file(s, "category_metrics", key)).iloc[0] for s in (pair.settings, settings))
    volatile = ("materialized_at", "peak_rss_mb")
    for col in ref.index:
        if col.endswith("_ms_per_image") or col.startswith("previous_") or col in volatile:
            continue
        if isinstance(ref[col], float):
            np.testing.assert_allclose(new[col], ref[col], atol=1e-6, err_msg=col)
        else:
            assert new[col] == ref[col], col
    # what the killed process left behind is hidden from the catalog's globs
    for leftover in (p for p in stored_files(new_base) if p.name.startswith(".")):
        assert leftover.suffix in (".tmp", ".lock") or leftover.name == storage.CATALOG_VIEWS
        assert leftover not in new_base.glob("*/*/*/*.parquet")
    con = duckdb.connect(str(storage.rebuild_catalog(settings.storage)), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM rscin_scores").fetchone() == (8, 8)
    finally:
        con.close()
