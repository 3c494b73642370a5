"""Dataset layouts on disk -> per-category manifests, and image/mask decoding (SPEC §10).

Layouts:

- ``mvtec`` — MVTec AD and any folder in its layout (the embedded demo set too):
  ``<root>/<category>/test/<defect>/<name>.<ext>``, normal = ``good``; masks
  ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``. A category without a
  ``ground_truth`` folder is scored without pixel metrics; a ``test`` folder whose images lie
  directly in it (no defect sub-folders) is unlabeled: maps and scores, metrics n/a.
- ``btad`` — ``<root>/<01|02|03>/test/{ok,ko}/…``, masks ``ground_truth/ko/<stem>.png``.
- ``visa`` — ``<root>/split_csv/1cls.csv`` (object, split, label, image, mask).
- ``mvtec_3d`` — MVTec 3D-AD, RGB only: ``<root>/<category>/test/<defect>/rgb/<nnn>.png``,
  masks ``<root>/<category>/test/<defect>/gt/<nnn>.png``; the all-zero masks that ship for
  ``good`` images are ignored, and so are the ``xyz`` point clouds.
- ``mvtec_loco`` — MVTec LOCO AD: ``<root>/<category>/test/{good,logical_anomalies,
  structural_anomalies}/<nnn>.png``; each anomalous image has a mask *folder*
  ``<root>/<category>/ground_truth/<defect>/<nnn>/`` holding ``000.png``, ``001.png``… (one
  per defect), united into one mask (non-zero = anomalous).

File policy, the same for every layout (docs/datasets.md "File policy"):

- Entries of an image or mask folder that are not image files — another suffix (``Thumbs.db``,
  ``README``, ``notes.txt``), a hidden file (``.DS_Store``, ``._000.png``) or a sub-folder —
  are skipped, and one warning per category names every one of them.
- A file with an image suffix that does not decode, a broken symbolic link (dangling, or a
  loop) and an image with no place in the layout stop the category with a
  :class:`DatasetError` naming the file and what is wrong, before anything is written for it.

Masks whose defect pixels cover more than half of the image are accepted, but a warning names
their folder: they are usually inverted (255 = normal).

Warnings go to a Dagster logger: inside a run they land in its event log, elsewhere on stderr.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import get_dagster_logger
from PIL import Image, UnidentifiedImageError

from musc_pipeline.core.preprocess import to_rgb_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_NAMES = {"mvtec": "good", "btad": "ok", "mvtec_3d": "good", "mvtec_loco": "good"}
MANIFEST_COLUMNS = ["image_id", "path", "defect_type", "label", "mask_path", "width", "height", "mode", "sha1"]
#: Masks marking more than this fraction of their image as defect are warned about (inverted?).
INVERTED_MASK_FRACTION = 0.5
_LISTED = 20  # skipped entries named one by one in a warning; the rest are counted

log = get_dagster_logger(__name__)


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


def root_problem(root: str | Path, layout: str) -> str | None:
    """Why a dataset root yields no category (None if it yields some): for the load-time warning."""
    root = Path(root)
    if not root.exists():
        return "does not exist"
    if not root.is_dir():
        return "is not a folder"
    if categories(root, layout):
        return None
    if layout == "visa":
        if not (root / "split_csv" / "1cls.csv").is_file():
            return "holds no split_csv/1cls.csv (layout visa)"
        return "its split_csv/1cls.csv lists no category"
    if (root / "test").is_dir():
        return (f"holds no category: it has a test/ folder itself, so it looks like one category; "
                f"point the root at its parent folder (layout {layout}: <root>/<category>/test/…)")
    return f"holds no category (layout {layout} expects <root>/<category>/test/…)"


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to H×W×3 uint8 (grayscale, RGBA and 16-bit are converted)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise DatasetError(f"{path}: {_broken_link(path)}")
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

    A file: anomalous = value > 127 (0/255 masks), or any non-zero value in masks whose
    values all stay ≤ 127 (label masks such as VisA's 0/1/2…). A folder (MVTec LOCO: one mask
    per defect): the union of the non-zero pixels of every mask in it.
    """
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise DatasetError(f"{path}: mask folder holds no mask image")
        union = np.zeros((size[1], size[0]), dtype=bool)
        for f in files:
            union |= _mask_pixels(f, size).max(axis=2) > 0
        return union
    m = _mask_pixels(path, size).max(axis=2)
    return m > (127 if m.max(initial=0) > 127 else 0)


def _mask_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    rgb = read_image(path)
    if (rgb.shape[1], rgb.shape[0]) != tuple(size):
        raise DatasetError(
            f"{path}: mask is {rgb.shape[1]}×{rgb.shape[0]} but its image is {size[0]}×{size[1]}"
        )
    return rgb


# --------------------------------------------------------------------------- listing folders


def _broken_link(path: Path) -> str:
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return f"broken symbolic link (a loop: {os.readlink(path)} leads back to itself)"
    except OSError:
        pass
    return f"broken symbolic link (its target {os.readlink(path)} does not exist)"


def _is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _listing(folder: Path, skipped: list[Path] | None, folders: bool = False) -> tuple[list[Path], list[Path]]:
    """(visible sub-folders, image files) of ``folder``, sorted; with ``folders=False`` sub-folders
    count as skipped too. Every other entry is appended to ``skipped``. A broken symbolic link
    raises: it was meant to be an input and cannot be read."""
    subdirs, images = [], []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists():
            raise DatasetError(f"{p}: {_broken_link(p)}")
        if folders and p.is_dir() and not p.name.startswith("."):
            subdirs.append(p)
        elif p.is_file() and _is_image_name(p):
            images.append(p)
        elif skipped is not None:
            skipped.append(p)
    return subdirs, images


def _image_files(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    return _listing(folder, skipped)[1]


def _test_folder(root: Path, category: str, normal: str, skipped: list[Path]) -> tuple[list[Path], list[dict]]:
    """(defect-type folders, unlabeled entries) of ``<root>/<category>/test``: images directly
    in it with no sub-folder are unlabeled; beside defect-type folders they have no label and
    are refused."""
    test = root / category / "test"
    if not test.is_dir():
        raise DatasetError(f"{test}: category folder has no test/ directory")
    subdirs, loose = _listing(test, skipped, folders=True)
    if loose and subdirs:
        raise DatasetError(
            f"{loose[0]}: image lies directly in {test} beside the defect-type folders "
            f"({', '.join(d.name for d in subdirs)}), so its label is unknown; move it into one "
            f"(normal images: {normal}/)"
        )
    return subdirs, [dict(path=p, defect_type="unlabeled", label=None, mask_path=None) for p in loose]


def _unmatched(masks: list[Path], used: set[str], what: str = "mask") -> None:
    for m in masks:
        if str(m) not in used:
            raise DatasetError(f"{m}: {what} without a matching test image")


# --------------------------------------------------------------------------- layouts


def _entries_folder_layout(root: Path, category: str, layout: str, skipped: list[Path]) -> list[dict]:
    gt_root = root / category / "ground_truth"
    normal = NORMAL_NAMES[layout]
    subdirs, unlabeled = _test_folder(root, category, normal, skipped)
    if unlabeled:
        return unlabeled
    entries = []
    for d in subdirs:
        for p in _image_files(d, skipped):
            is_normal = d.name == normal
            mask = None
            if not is_normal and gt_root.is_dir():
                candidates = [gt_root / d.name / f"{p.stem}_mask.png", gt_root / d.name / f"{p.stem}.png"]
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None:
                    raise DatasetError(f"{p}: anomalous image has no mask (looked for {candidates[0]})")
            entries.append(dict(path=p, defect_type=d.name, label=0 if is_normal else 1, mask_path=mask))
    if gt_root.is_dir():
        used = {str(e["mask_path"]) for e in entries if e["mask_path"] is not None}
        mask_dirs, stray = _listing(gt_root, skipped, folders=True)
        _unmatched(stray, used)
        for d in mask_dirs:
            _unmatched(_image_files(d, skipped), used)
    return entries


def _entries_mvtec_3d(root: Path, category: str, skipped: list[Path]) -> list[dict]:
    """``test/<defect>/rgb/<nnn>.png`` with masks ``test/<defect>/gt/<nnn>.png``; a defect folder
    without ``gt/`` has no masks (pixel metrics n/a). ``good/gt`` (all zero) and ``xyz/`` are
    not read."""
    subdirs, unlabeled = _test_folder(root, category, "good", skipped)
    if unlabeled:
        return unlabeled
    entries = []
    for d in subdirs:
        rgb, gt = d / "rgb", d / "gt"
        if not rgb.is_dir():
            raise DatasetError(f"{d}: defect-type folder has no rgb/ folder "
                               "(layout mvtec_3d: test/<defect>/rgb/<nnn>.png)")
        parts, stray = _listing(d, skipped, folders=True)
        if stray:
            raise DatasetError(f"{stray[0]}: image lies directly in {d}; layout mvtec_3d reads {rgb}/<nnn>.png")
        skipped += [f for f in parts if f.name not in ("rgb", "gt", "xyz")]
        is_normal = d.name == "good"
        for p in _image_files(rgb, skipped):
            mask = None
            if not is_normal and gt.is_dir():
                mask = gt / f"{p.stem}.png"
                if not mask.is_file():
                    raise DatasetError(f"{p}: anomalous image has no mask (looked for {mask})")
            entries.append(dict(path=p, defect_type=d.name, label=0 if is_normal else 1, mask_path=mask))
        if not is_normal and gt.is_dir():
            _unmatched(_image_files(gt, skipped), {str(e["mask_path"]) for e in entries})
    return entries


def _entries_mvtec_loco(root: Path, category: str, skipped: list[Path]) -> list[dict]:
    """``test/<defect>/<nnn>.png``; the mask of an anomalous image is the folder
    ``ground_truth/<defect>/<nnn>/`` (one ``000.png``, ``001.png``… per defect, united)."""
    gt_root = root / category / "ground_truth"
    subdirs, unlabeled = _test_folder(root, category, "good", skipped)
    if unlabeled:
        return unlabeled
    entries = []
    for d in subdirs:
        for p in _image_files(d, skipped):
            is_normal = d.name == "good"
            mask = None
            if not is_normal and gt_root.is_dir():
                mask = gt_root / d.name / p.stem
                if not mask.is_dir():
                    raise DatasetError(f"{p}: anomalous image has no mask folder (looked for {mask}/000.png)")
                if not _image_files(mask, skipped):
                    raise DatasetError(f"{mask}: mask folder holds no mask image (expected 000.png, 001.png…)")
            entries.append(dict(path=p, defect_type=d.name, label=0 if is_normal else 1, mask_path=mask))
    if gt_root.is_dir():
        used = {str(e["mask_path"]) for e in entries if e["mask_path"] is not None}
        type_dirs, stray = _listing(gt_root, skipped, folders=True)
        _unmatched(stray, used)
        for d in type_dirs:
            folders, files = _listing(d, skipped, folders=True)
            _unmatched(files, used)
            _unmatched(folders, used, "mask folder")
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


# --------------------------------------------------------------------------- warnings


def _warn_skipped(folder: Path, skipped: list[Path]) -> None:
    if not skipped:
        return
    names = [os.path.relpath(p, folder) for p in dict.fromkeys(skipped)]
    listed = ", ".join(names[:_LISTED]) + (f" … and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    log.warning(f"{folder}: skipped {len(names)} entr{'y' if len(names) == 1 else 'ies'} that "
                f"{'is' if len(names) == 1 else 'are'} not an image file (another suffix, hidden, or a folder): {listed}")


def _warn_inverted(fractions: dict[Path, list[float]]) -> None:
    for folder, values in fractions.items():
        big = [f for f in values if f > INVERTED_MASK_FRACTION]
        if big:
            log.warning(
                f"{folder}: {len(big)} of {len(values)} masks mark more than half of their image as defect "
                f"(up to {max(big):.0%}); are they inverted? Defect pixels must be the bright (non-zero) ones, "
                "normal pixels 0"
            )


def category_entries(root: str | Path, layout: str, category: str, skipped: list[Path] | None = None) -> list[dict]:
    """The category's test images as listed by its layout (path, label, mask path), none decoded."""
    root = Path(root)
    skipped = [] if skipped is None else skipped
    if layout == "visa":
        return _entries_visa(root, category)
    if layout == "mvtec_3d":
        return _entries_mvtec_3d(root, category, skipped)
    if layout == "mvtec_loco":
        return _entries_mvtec_loco(root, category, skipped)
    return _entries_folder_layout(root, category, layout, skipped)


def scan_category(root: str | Path, layout: str, category: str) -> pd.DataFrame:
    """Validated manifest of one category: every image decoded, every mask size-checked.

    Skipped non-image entries and masks that look inverted are logged as warnings.
    """
    root = Path(root)
    skipped: list[Path] = []
    entries = category_entries(root, layout, category, skipped)
    _warn_skipped(root / category, skipped)
    if len(entries) < 2:
        raise DatasetError(
            f"{root / category}: {len(entries)} test image(s); MuSc scores images against each "
            "other and needs at least 2"
        )
    rows, seen = [], set()
    fractions: dict[Path, list[float]] = defaultdict(list)
    for e in entries:
        path = Path(e["path"])
        if path in seen:
            raise DatasetError(f"{path}: listed twice (each test image must be scored once)")
        seen.add(path)
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:  # VisA rows name their files; folder layouts list images only
            raise DatasetError(f"{path}: not an image file (suffix {suffix or 'none'!r})")
        rgb = read_image(path)
        h, w = rgb.shape[:2]
        if e["mask_path"] is not None:
            mask_path = Path(e["mask_path"])
            fractions[mask_path.parent].append(float(read_mask(mask_path, (w, h)).mean()))
        with Image.open(path) as im:
            mode = im.mode
        rows.append(dict(
            path=str(path), defect_type=e["defect_type"],
            label=e["label"], mask_path=None if e["mask_path"] is None else str(e["mask_path"]),
            width=w, height=h, mode=mode, sha1=hashlib.sha1(path.read_bytes()).hexdigest(),
        ))
    _warn_inverted(fractions)
    df = pd.DataFrame(rows)
    ids = pd.Series([f"{r.defect_type}/{Path(r.path).name}" for r in df.itertuples()])
    clash = ids.duplicated(keep=False)  # same name in two folders (VisA): use the path under the root
    ids[clash] = [f"{r.defect_type}/{Path(os.path.relpath(r.path, root)).as_posix()}" for r in df[clash].itertuples()]
    df.insert(0, "image_id", ids)
    df["label"] = df["label"].astype("Int64")
    return df[MANIFEST_COLUMNS]
