"""Small report figures: arrays in, one PNG file out, its file name back.

Figures are drawn on matplotlib's Agg canvas through the object API (``Figure`` +
``FigureCanvasAgg``): no pyplot, no global backend switch, nothing left open. Each function
writes ``out_dir/<slug(stem)>_<kind>.png`` and returns that file name (relative to
``out_dir``).

Size: paper-figure size, drawn at :data:`DPI` with no text below :data:`MIN_FONT_PT`, so that
labels are at least ``MIN_FONT_PT × dpi / 72`` ≥ 10 px at 100 % zoom (the report shows each
figure at its natural size). Every PNG records its dpi (``pHYs``) and its smallest text size
(``min_font_pt``) for the report test to check. A figure over :data:`MAX_PNG_BYTES` is
palette-quantised, then redrawn at a lower dpi — never below :data:`MIN_DPI`, so labels never
fall under 10 px; at :data:`MIN_DPI` the file is kept whatever its size.

Shapes: ``N`` images, ``S`` the square map size the method works at.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image, PngImagePlugin

from .paths import inside, slug

MAX_PNG_BYTES = 1_000_000
MAX_PIXELS = 200_000
DPI = 100
MIN_DPI = 72
MIN_FONT_PT = 10.0  # 10 pt at ≥ 72 dpi: ≥ 10 px
_DPIS = (DPI, 90, 80, MIN_DPI)
_CELL = 1.8  # inches per image in the qualitative figure
_PER_BAND = 6  # examples per band of the qualitative figure
_ANOMALOUS, _NORMAL, _UNKNOWN = "#d62728", "#1f77b4", "#7f7f7f"
_CMAP = "jet"


# --------------------------------------------------------------------------- saving


def min_font_pt(fig: Figure) -> float:
    """The smallest size (pt) of any visible, non-empty text in ``fig``."""
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return float(min(sizes)) if sizes else float("nan")


def _png_bytes(fig: Figure, dpi: int, text: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", metadata=text)
    return buf.getvalue()


def _quantised(png: bytes, dpi: int, text: dict[str, str]) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    pal = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", optimize=True, dpi=(dpi, dpi), pnginfo=info)
    return buf.getvalue()


def _save(fig: Figure, out_dir: Path, name: str) -> str:
    """Write ``fig`` as ``out_dir/name`` (see the module doc on size); returns ``name``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = inside(out_dir, name)
    smallest = min_font_pt(fig)
    if smallest < MIN_FONT_PT:
        raise ValueError(f"{name}: text of {smallest} pt is below the report's {MIN_FONT_PT} pt")
    text = {"min_font_pt": f"{smallest:g}"}
    data = b""
    for dpi in _DPIS:
        data = _png_bytes(fig, dpi, text)
        if len(data) > MAX_PNG_BYTES:
            data = _quantised(data, dpi, text)
        if len(data) <= MAX_PNG_BYTES:
            break
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return name


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _short(text: str, n: int = 24) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= n else "…" + text[-(n - 1) :]


# --------------------------------------------------------------------------- qualitative


def _order(scores: np.ndarray, idx: np.ndarray, highest: bool) -> list[int]:
    """Indices ``idx`` sorted by score (NaN last), ties broken by index: deterministic."""
    s = scores[idx]
    key = np.where(np.isnan(s), np.inf, -s if highest else s)
    return [int(i) for i in idx[np.lexsort((idx, key))]]


def select_examples(scores: np.ndarray, labels: np.ndarray, per_group: int = 3) -> list[tuple[int, str]]:
    """Which images to show, as ``(index, group)`` in display order, each image once.

    With both classes labelled: the highest-scored defects and the lowest-scored normals, then
    the hardest of each, the lowest-scored defects and the highest-scored normals. Named by their
    rank only: whether one is missed depends on a threshold the figure does not know (at image
    AUROC 1.0 the lowest-scored defect still outscores every normal). Otherwise the highest and
    the lowest scoring images.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    if anomalous.size and normal.size:
        groups = [
            ("highest-scored defect", _order(scores, anomalous, True)),
            ("lowest-scored normal", _order(scores, normal, False)),
            ("lowest-scored defect", _order(scores, anomalous, False)),
            ("highest-scored normal", _order(scores, normal, True)),
        ]
    else:
        every = np.arange(scores.size)
        groups = [("highest score", _order(scores, every, True)), ("lowest score", _order(scores, every, False))]
    chosen: list[tuple[int, str]] = []
    seen: set[int] = set()
    for group, order in groups:
        for i in [i for i in order if i not in seen][:per_group]:
            chosen.append((i, group))
            seen.add(i)
    return chosen


def _resized_rgb(image: np.ndarray, size: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))


def _label_text(label: int) -> str:
    return {1: "defect", 0: "normal"}.get(int(label), "unlabelled")


def qualitative(
    out_dir: Path,
    stem: str,
    images: list[np.ndarray],
    masks: np.ndarray | None,
    maps: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    image_ids: list[str],
    per_group: int = 3,
) -> str:
    """The chosen images as columns, as in the paper's qualitative figures: input (resized to
    S), ground truth (contour) and anomaly-map overlay beneath each other; up to six examples
    per band, bands stacked.

    images: N RGB uint8 H×W×3 (any size); maps: N×S×S; masks: N×S×S bool or None;
    scores: N; labels: N (1 defect, 0 normal, -1 unknown). All overlays share one colour
    scale (min/max over all N maps) shown by one colourbar.
    """
    maps = np.asarray(maps, dtype=np.float32)  # N×S×S
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    n, size = maps.shape[0], maps.shape[-1]
    if not (len(images) == n == scores.size == labels.size == len(image_ids)):
        raise ValueError(
            f"qualitative: lengths differ (images {len(images)}, maps {n}, scores {scores.size}, "
            f"labels {labels.size}, ids {len(image_ids)})"
        )
    finite = maps[np.isfinite(maps)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-6
    norm = Normalize(vmin=vmin, vmax=vmax)

    chosen = select_examples(scores, labels, per_group)
    labelled_groups = (labels == 1).any() and (labels == 0).any()  # group names then imply the label
    kinds = ["input", "ground truth", "anomaly map"] if masks is not None else ["input", "anomaly map"]
    cols = max(1, min(_PER_BAND, len(chosen)))
    bands = max(1, -(-len(chosen) // cols))
    fig = _new_figure(0.6 + _CELL * cols + 1.1, bands * (_CELL * len(kinds) + 0.95))
    axes = fig.subplots(bands * len(kinds), cols, squeeze=False)  # (band, kind) rows × example columns
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for b in range(bands):
        for k, kind in enumerate(kinds):
            axes[b * len(kinds) + k, 0].set_ylabel(kind, fontsize=MIN_FONT_PT + 1, fontweight="bold")
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no images", fontsize=MIN_FONT_PT, ha="center", va="center",
                        transform=axes[0, 0].transAxes)
    for j in range(len(chosen), bands * cols):  # empty cells of the last band
        for k in range(len(kinds)):
            axes[(j // cols) * len(kinds) + k, j % cols].set_axis_off()
    for j, (i, group) in enumerate(chosen):
        column = [axes[(j // cols) * len(kinds) + k, j % cols] for k in range(len(kinds))]
        rgb = _resized_rgb(images[i], size)
        score = "n/a" if np.isnan(scores[i]) else f"{scores[i]:.3f}"
        column[0].imshow(rgb, interpolation="nearest")
        head = group if labelled_groups else f"{group} ({_label_text(labels[i])})"
        column[0].set_title(f"{head}\n{_short(image_ids[i])}\nscore {score}",
                            fontsize=MIN_FONT_PT, parse_math=False)
        overlay_ax = column[-1]
        overlay_ax.imshow(rgb, interpolation="nearest")
        overlay_ax.imshow(maps[i], cmap=_CMAP, norm=norm, alpha=0.5, interpolation="nearest")
        if masks is not None:
            mask = np.asarray(masks[i], dtype=bool)
            column[1].imshow(rgb, interpolation="nearest")
            if mask.any() and not mask.all():
                for ax in (column[1], overlay_ax):
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=1.5)
            else:
                note = "whole image" if mask.all() else "no defect pixels"
                column[1].text(0.04, 0.05, note, fontsize=MIN_FONT_PT, color="white", transform=column[1].transAxes,
                               bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "linewidth": 0})
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), ax=list(axes[:, -1]), shrink=0.6, aspect=25)
    bar.set_label("anomaly score (shared scale)", fontsize=MIN_FONT_PT + 1)
    bar.ax.tick_params(labelsize=MIN_FONT_PT)
    return _save(fig, out_dir, f"{slug(stem)}_qualitative.png")


# --------------------------------------------------------------------------- histograms


def _subsample(n: int, limit: int = MAX_PIXELS) -> np.ndarray:
    """Evenly spaced indices into ``n`` items, at most ``limit``: deterministic."""
    if n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


def _hist(ax, values_by_class: list[tuple[str, str, np.ndarray]], title: str, xlabel: str) -> None:
    present = [(n, c, v[np.isfinite(v)]) for n, c, v in values_by_class]
    present = [(n, c, v) for n, c, v in present if v.size]
    if not present:
        ax.text(0.5, 0.5, "no values", fontsize=MIN_FONT_PT, ha="center", va="center", transform=ax.transAxes)
    else:
        allv = np.concatenate([v for _, _, v in present])
        lo, hi = float(allv.min()), float(allv.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        for name, colour, v in present:
            ax.hist(v, bins=bins, density=True, alpha=0.55, color=colour, label=f"{name} ({v.size})")
        ax.legend(fontsize=MIN_FONT_PT, frameon=False)
    ax.set_title(title, fontsize=MIN_FONT_PT + 2)
    ax.set_xlabel(xlabel, fontsize=MIN_FONT_PT + 1)
    ax.set_ylabel("density", fontsize=MIN_FONT_PT + 1)
    ax.tick_params(labelsize=MIN_FONT_PT)


def histograms(
    out_dir: Path,
    stem: str,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> str:
    """Image-score histogram normal vs anomalous; beside it the pixel-score histogram
    (normal vs defect pixels, ≤ 200k evenly spaced pixels) when maps and masks are given."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    with_pixels = maps is not None and masks is not None
    fig = _new_figure(11.0 if with_pixels else 5.8, 4.0)
    axes = fig.subplots(1, 2 if with_pixels else 1, squeeze=False)[0]
    classes = [("normal", _NORMAL, scores[labels == 0]), ("anomalous", _ANOMALOUS, scores[labels == 1])]
    if (labels < 0).any():
        classes.append(("unlabelled", _UNKNOWN, scores[labels < 0]))
    _hist(axes[0], classes, "image scores", "image anomaly score")
    if with_pixels:
        flat_maps = np.asarray(maps).reshape(-1)
        flat_masks = np.asarray(masks, dtype=bool).reshape(-1)
        if flat_maps.size != flat_masks.size:
            raise ValueError(f"histograms: maps hold {flat_maps.size} pixels, masks {flat_masks.size}")
        idx = _subsample(flat_maps.size)
        values, defect = flat_maps[idx].astype(np.float64), flat_masks[idx]
        _hist(
            axes[1],
            [("normal pixels", _NORMAL, values[~defect]), ("defect pixels", _ANOMALOUS, values[defect])],
            "pixel scores" + (f" ({idx.size} of {flat_maps.size} sampled)" if idx.size < flat_maps.size else ""),
            "pixel anomaly score",
        )
    return _save(fig, out_dir, f"{slug(stem)}_histograms.png")


# --------------------------------------------------------------------------- curves


def curves(out_dir: Path, stem: str, scores: np.ndarray, labels: np.ndarray) -> str | None:
    """Image-level ROC and precision–recall curves; None (no file) when the labelled images
    hold only one class."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    keep = (labels >= 0) & np.isfinite(scores)
    y, s = labels[keep], scores[keep]
    name = f"{slug(stem)}_curves.png"
    if y.size == 0 or y.min() == y.max():
        inside(Path(out_dir), name).unlink(missing_ok=True)  # no stale curve of an older run.
        return None
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    fig = _new_figure(10.5, 4.8)
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot(fpr, tpr, color=_ANOMALOUS, lw=1.5, label=f"AUROC {100 * auc(fpr, tpr):.1f}")
    roc_ax.plot([0, 1], [0, 1], ls="--", color=_UNKNOWN, lw=0.8, label="chance")
    roc_ax.set_xlabel("false positive rate", fontsize=MIN_FONT_PT + 1)
    roc_ax.set_ylabel("true positive rate", fontsize=MIN_FONT_PT + 1)
    roc_ax.set_title("ROC (image level)", fontsize=MIN_FONT_PT + 2)
    pr_ax.step(recall, precision, where="post", color=_NORMAL, lw=1.5,
               label=f"AP {100 * average_precision_score(y, s):.1f}")
    pr_ax.axhline(y.mean(), ls="--", color=_UNKNOWN, lw=0.8, label=f"prevalence {y.mean():.2f}")
    pr_ax.set_xlabel("recall", fontsize=MIN_FONT_PT + 1)
    pr_ax.set_ylabel("precision", fontsize=MIN_FONT_PT + 1)
    pr_ax.set_title("precision–recall (image level)", fontsize=MIN_FONT_PT + 2)
    for ax in (roc_ax, pr_ax):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.legend(fontsize=MIN_FONT_PT, loc="lower right" if ax is roc_ax else "lower left", frameon=False)
    return _save(fig, out_dir, name)
