"""Dataset layouts on disk -> per-category manifests, and image/mask decoding (SPEC §10).

Layouts:

- ``mvtec`` — MVTec AD and any folder in its layout (the embedded demo set too):
  ``<root>/<category>/test/<defect>/<name>.<ext>``, normal = ``good``; masks
  ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``. A category without a
  ``ground_truth`` folder is scored without pixel metrics; a ``test`` folder whose images lie
  directly in it (no defect sub-folders) is unlabeled: maps and scores, metrics n/a.
- ``btad`` — ``<root>/<01|02|03>/test/{ok,ko}/…``, masks ``ground_truth/ko/<stem>.png``.
- ``visa`` — ``<root>/split_csv/1cls.csv`` (object, split, label, image, mask).

Every problem is raised as :class:`DatasetError` naming the file and what is wrong, before
anything is written for the partition.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from musc_pipeline.core.preprocess import to_rgb_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_NAMES = {"mvtec": "good", "btad": "ok"}
MANIFEST_COLUMNS = ["image_id", "path", "defect_type", "label", "mask_path", "width", "height", "mode", "sha1"]


class DatasetError(ValueError):
    """Bad input data: the message names the file and the problem."""


def categories(root: str | Path, layout: str) -> list[str]:
    """Category names found under a dataset root (empty if the root does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    if layout == "visa":
        table = root / "split_csv" / "1cls.csv"
        if not table.is_file():
            return []
        with table.open(newline="") as fh:
            return sorted({row["object"] for row in csv.DictReader(fh)})
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to H×W×3 uint8 (grayscale, RGBA and 16-bit are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im, dtype=np.uint16 if im.mode.startswith("I;16") else np.int64)
            elif im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
                pixels = np.asarray(im.convert("RGB"))
            else:
                pixels = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from None
    try:
        return to_rgb_uint8(pixels)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def read_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask and check it matches its image's (width, height).

    Anomalous = value > 127 (0/255 masks), or any non-zero value in masks whose values all
    stay ≤ 127 (label masks such as VisA's 0/1/2…).
    """
    rgb = read_image(path)
    if (rgb.shape[1], rgb.shape[0]) != tuple(size):
        raise DatasetError(
            f"{path}: mask is {rgb.shape[1]}×{rgb.shape[0]} but its image is {size[0]}×{size[1]}"
        )
    m = rgb.max(axis=2)
    return m > (127 if m.max(initial=0) > 127 else 0)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _check_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DatasetError(f"{path}: not an image file (suffix {suffix or 'none'!r})")


def _entries_folder_layout(root: Path, category: str, layout: str) -> list[dict]:
    test = root / category / "test"
    if not test.is_dir():
        raise DatasetError(f"{test}: category folder has no test/ directory")
    gt_root = root / category / "ground_truth"
    normal = NORMAL_NAMES[layout]
    entries = []
    subdirs = sorted(p for p in test.iterdir() if p.is_dir())
    loose = [p for p in _images(test)]
    if loose and not subdirs:  # unlabeled folder
        return [dict(path=p, defect_type="unlabeled", label=None, mask_path=None) for p in loose]
    for d in subdirs:
        for p in _images(d):
            _check_suffix(p)
            is_normal = d.name == normal
            mask = None
            if not is_normal and gt_root.is_dir():
                stem = p.stem
                candidates = [gt_root / d.name / f"{stem}_mask.png", gt_root / d.name / f"{stem}.png"]
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None:
                    raise DatasetError(f"{p}: anomalous image has no mask (looked for {candidates[0]})")
            entries.append(dict(path=p, defect_type=d.name, label=0 if is_normal else 1, mask_path=mask))
    if gt_root.is_dir():
        used = {str(e["mask_path"]) for e in entries if e["mask_path"] is not None}
        for d in sorted(p for p in gt_root.iterdir() if p.is_dir()):
            for m in _images(d):
                if str(m) not in used:
                    raise DatasetError(f"{m}: mask without a matching test image")
    return entries


def _entries_visa(root: Path, category: str) -> list[dict]:
    entries = []
    with (root / "split_csv" / "1cls.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["object"] != category or row["split"] != "test":
                continue
            anomalous = row["label"] == "anomaly"
            entries.append(dict(
                path=root / row["image"],
                defect_type="anomaly" if anomalous else "normal",
                label=int(anomalous),
                mask_path=(root / row["mask"]) if anomalous and row.get("mask") else None,
            ))
    for e in entries:
        if e["label"] == 1 and e["mask_path"] is None:
            raise DatasetError(f"{e['path']}: anomalous image has no mask in split_csv/1cls.csv")
    return entries


def scan_category(root: str | Path, layout: str, category: str) -> pd.DataFrame:
    """Validated manifest of one category: every image decoded, every mask size-checked."""
    root = Path(root)
    if layout == "visa":
        entries = _entries_visa(root, category)
    else:
        entries = _entries_folder_layout(root, category, layout)
    if len(entries) < 2:
        raise DatasetError(
            f"{root / category}: {len(entries)} test image(s); MuSc scores images against each "
            "other and needs at least 2"
        )
    rows, seen = [], set()
    for e in entries:
        path = Path(e["path"])
        if path in seen:
            raise DatasetError(f"{path}: listed twice (each test image must be scored once)")
        seen.add(path)
        _check_suffix(path)
        rgb = read_image(path)
        h, w = rgb.shape[:2]
        if e["mask_path"] is not None:
            read_mask(e["mask_path"], (w, h))
        with Image.open(path) as im:
            mode = im.mode
        rows.append(dict(
            path=str(path), defect_type=e["defect_type"],
            label=e["label"], mask_path=None if e["mask_path"] is None else str(e["mask_path"]),
            width=w, height=h, mode=mode, sha1=hashlib.sha1(path.read_bytes()).hexdigest(),
        ))
    df = pd.DataFrame(rows)
    ids = pd.Series([f"{r.defect_type}/{Path(r.path).name}" for r in df.itertuples()])
    clash = ids.duplicated(keep=False)  # same name in two folders (VisA): use the path under the root
    ids[clash] = [f"{r.defect_type}/{Path(os.path.relpath(r.path, root)).as_posix()}" for r in df[clash].itertuples()]
    df.insert(0, "image_id", ids)
    df["label"] = df["label"].astype("Int64")
    return df[MANIFEST_COLUMNS]
