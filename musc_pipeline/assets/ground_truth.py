"""Ground-truth masks of a category at the scoring resolution, by the dataset's mask rule."""

import numpy as np
import pandas as pd

from musc_pipeline.core.preprocess import mask_array
from musc_pipeline.resources.datasets import read_mask


def ground_truth(manifest: pd.DataFrame, size: int, rule: str) -> np.ndarray | None:
    """N×S×S ground-truth masks by ``rule``, or None when labels or masks are missing."""
    if manifest["label"].isna().any() or manifest.loc[manifest["label"] == 1, "mask_path"].isna().any():
        return None
    gt = np.zeros((len(manifest), size, size), dtype=bool)
    for i, row in enumerate(manifest.itertuples()):
        if isinstance(row.mask_path, str):
            gt[i] = mask_array(read_mask(row.mask_path, (row.width, row.height)), size, rule)
    return gt
