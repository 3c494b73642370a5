"""Subset division (SPEC §6): a time/memory trade-off for large test sets.

Within a category the images of each defect type (and 'good') are shuffled with a fixed seed
and dealt into s subsets; MSM scores each subset on its own. Two dealings:

- ``authors`` (default): the authors' code, so s = 2, 3 compare with the paper's Tab. 7:
  Python's ``random`` seeded once (their seed is 42), the types in order of first appearance
  (the manifest lists them sorted, as their loader does), each type's image list shuffled in
  turn and cut into runs of s, subset d taking the d-th image of every run. Every type's
  remainder lands in the first subsets, so subset sizes can differ by up to the number of types.
- ``balanced``: one NumPy-seeded deal across all types whose position carries over from type
  to type, so subset sizes differ by at most one image (smaller worst-case MSM cost).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

DEALINGS = ("authors", "balanced")


def divide(defect_types: Sequence[str], s: int, seed: int = 42, dealing: str = "authors") -> list[np.ndarray]:
    """Indices of the images in each of the s subsets (each sorted ascending)."""
    if s < 1:
        raise ValueError(f"subset count must be >= 1, got {s}")
    if dealing not in DEALINGS:
        raise ValueError(f"unknown subset dealing {dealing!r}; use one of {DEALINGS}")
    n = len(defect_types)
    if s == 1:
        return [np.arange(n)]
    types = list(dict.fromkeys(defect_types)) if dealing == "authors" else sorted(set(defect_types))
    by_type = {t: [i for i, d in enumerate(defect_types) if d == t] for t in types}
    buckets: list[list[int]] = [[] for _ in range(s)]
    if dealing == "authors":
        rng = random.Random(seed)
        for t in types:
            rng.shuffle(by_type[t])
            for d in range(s):
                buckets[d] += by_type[t][d::s]
    else:
        np_rng = np.random.default_rng(seed)
        pos = 0
        for t in types:
            idx = np.asarray(by_type[t])
            np_rng.shuffle(idx)
            for i in idx:
                buckets[pos % s].append(int(i))
                pos += 1
    subsets = [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    if any(len(b) < 2 for b in subsets):
        raise ValueError(
            f"{n} images cannot be divided into {s} subsets of at least 2 images each; "
            "use fewer subsets"
        )
    return subsets
