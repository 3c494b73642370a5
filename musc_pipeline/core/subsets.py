"""Subset division (SPEC §6): a time/memory trade-off for large test sets.

Within a category the images of each defect type (and 'good') are shuffled with a fixed
seed and dealt round-robin into s subsets; MSM scores each subset on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def divide(defect_types: Sequence[str], s: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of the images in each of the s subsets (each sorted ascending)."""
    if s < 1:
        raise ValueError(f"subset count must be >= 1, got {s}")
    n = len(defect_types)
    if s == 1:
        return [np.arange(n)]
    rng = np.random.default_rng(seed)
    types = np.asarray(defect_types)
    buckets: list[list[int]] = [[] for _ in range(s)]
    # One deal across all types (the position carries over from type to type), so every
    # type is spread evenly and the subset sizes differ by at most one image.
    pos = 0
    for t in sorted(set(defect_types)):
        idx = np.flatnonzero(types == t)
        rng.shuffle(idx)
        for i in idx:
            buckets[pos % s].append(int(i))
            pos += 1
    subsets = [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    small = [len(b) for b in subsets if len(b) < 2]
    if small:
        raise ValueError(
            f"{n} images cannot be divided into {s} subsets of at least 2 images each; "
            "use fewer subsets"
        )
    return subsets
