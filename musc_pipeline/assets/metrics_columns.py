"""What each column of a ``category_metrics`` row means: the column descriptions the UI shows
in the asset's column schema (Dagster's ``TableColumn.description``)."""

from __future__ import annotations

from musc_pipeline.core.metrics import METRIC_NAMES

_METRICS = {
    "image_auroc": "image-level AUROC of the final image scores (RsCIN), fraction",
    "image_f1_max": "image-level F1 at the best threshold, fraction",
    "image_ap": "image-level average precision, fraction",
    "pixel_auroc": "pixel-level AUROC of the anomaly maps against the ground-truth masks, fraction",
    "pixel_f1_max": "pixel-level F1 at the best threshold, fraction",
    "pixel_ap": "pixel-level average precision, fraction",
    "pixel_pro": "per-region overlap (PRO) integrated up to 30 % false-positive rate, fraction",
}
_STAGES = {"features": "backbone pass (features)", "msm": "mutual scoring (MSM)", "maps": "anomaly maps"}

COLUMNS: dict[str, str] = {
    "profile": "the musc.yaml profile that produced the row",
    "dataset": "dataset name in musc.yaml",
    "category": "category (the partition's second half)",
    **_METRICS,
    "n_images": "test images scored together",
    "n_anomalous": "of which labelled anomalous",
    "notes": "why a metric is n/a, if any ('; '-separated)",
    "backbone": "registry name of the backbone that made the features",
    "weights_sha256": "SHA-256 of the weights file (empty: random weights)",
    "random_init": "true when the backbone was randomly initialised (a baseline, not the method)",
    "image_size": "side in pixels the images were resized to",
    "mask_rule": "how the ground-truth masks were resized (method.mask_rule resolved by layout)",
    "config": "fingerprint of the profile's settings",
    "activation": "the backbone's activation (gelu / quick_gelu)",
    "preprocess": "how images were resized",
    "pos_embed_resize": "how the ViT's position embeddings were resized, or why they were not",
    "precision": "the backbone's arithmetic (float32 or float16 autocast)",
    "rscin_precision": "RsCIN's arithmetic",
    "subset_dealing": "how images were dealt into subsets (method.subsets > 1)",
    "materialized_at": "UTC time the row was computed",
    **{f"{stage}_ms_per_image": f"{what}: milliseconds per image" for stage, what in _STAGES.items()},
    "peak_rss_mb": "largest resident memory of the stages' processes, MB",
    "peak_gpu_mb": "largest GPU memory of the stages, MB (NaN: no GPU)",
    "intermediates": "the profile's intermediates policy (keep / drop)",
    "previous_backbone": "backbone of the previous materialization of this partition",
    **{f"previous_{k}": f"{k} of the previous materialization of this partition (as its metadata shows it)"
       for k in METRIC_NAMES},
    "interval_level": "confidence level of the _lo/_hi intervals (intervals.level)",
    "intervals_ms_per_image": "computing the metrics' intervals: milliseconds per image",
    "regression_ms_per_image": "the paired comparison with the previous run: milliseconds per image",
    **{f"{k}_{end}": f"{k}: {what}" for k in METRIC_NAMES for end, what in (
        ("lo", "lower end of its interval (DeLong for image AUROC, bootstrap over images otherwise)"),
        ("hi", "upper end of its interval"), ("se", "its standard error"))},
    **{f"previous_{k}_delta{end}": f"{k}: {what} of this run − the previous run, paired on the same images"
       for k in METRIC_NAMES for end, what in (("", "Δ"), ("_lo", "lower end of the interval of Δ"),
                                              ("_hi", "upper end of the interval of Δ"), ("_p", "p-value of Δ"))},
}


def describe_column(name: str) -> str | None:
    """The description of a ``category_metrics`` column (``stored_<stage>_bytes_per_image`` too)."""
    if name.startswith("stored_") and name.endswith("_bytes_per_image"):
        return f"bytes per image {name[len('stored_'):-len('_bytes_per_image')]} holds in storage after scoring"
    return COLUMNS.get(name)
