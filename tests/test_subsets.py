"""Subset division (SPEC §6)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from musc_pipeline.core import subsets

TYPES = ["good"] * 23 + ["crack"] * 7 + ["hole"] * 11 + ["scratch"] * 5 + ["print"] * 1


def _shuffled_types(seed: int) -> list[str]:
    t = list(TYPES)
    np.random.default_rng(seed).shuffle(t)
    return t


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("order_seed", [0, 1])
def test_covers_every_index_once(s, order_seed):
    types = _shuffled_types(order_seed)
    parts = subsets.divide(types, s, seed=7)
    assert len(parts) == s
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(types)))
    for p in parts:
        assert p.dtype == np.int64 and (np.diff(p) > 0).all()  # sorted, no repeats


@pytest.mark.parametrize("s", [2, 3, 4])
def test_every_type_spread_round_robin(s):
    types = _shuffled_types(3)
    arr = np.asarray(types)
    parts = subsets.divide(types, s, seed=11)
    total = Counter(types)
    for t, count in total.items():
        per_subset = [int(np.sum(arr[p] == t)) for p in parts]
        assert sum(per_subset) == count
        # dealt round-robin: each subset gets floor or ceil of count / s
        assert max(per_subset) - min(per_subset) <= 1, (t, per_subset)
        if count >= s:
            assert min(per_subset) >= 1
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1, sizes  # and the subsets are balanced


def test_s1_is_everything_in_order():
    parts = subsets.divide(TYPES, 1, seed=3)
    assert len(parts) == 1 and parts[0].tolist() == list(range(len(TYPES)))


def test_deterministic_for_a_seed_and_seed_matters():
    a = subsets.divide(TYPES, 3, seed=5)
    b = subsets.divide(TYPES, 3, seed=5)
    c = subsets.divide(TYPES, 3, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_many_single_image_types_still_divide():
    # four types of one image each: 2 subsets of 2 are possible and must be produced
    parts = subsets.divide(["a", "b", "c", "d"], 2, seed=0)
    assert sorted(len(p) for p in parts) == [2, 2]


@pytest.mark.parametrize("n, s", [(5, 3), (3, 2), (1, 2), (7, 4)])
def test_raises_when_a_subset_would_have_fewer_than_two_images(n, s):
    with pytest.raises(ValueError, match="at least 2 images"):
        subsets.divide(["good"] * n, s, seed=0)


def test_smallest_valid_division():
    parts = subsets.divide(["good"] * 6, 3, seed=0)
    assert [len(p) for p in parts] == [2, 2, 2]


@pytest.mark.parametrize("s", [0, -1])
def test_bad_subset_count_raises(s):
    with pytest.raises(ValueError, match="subset count"):
        subsets.divide(TYPES, s)
