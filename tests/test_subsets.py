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
@pytest.mark.parametrize("dealing", subsets.DEALINGS)
def test_covers_every_index_once(s, order_seed, dealing):
    types = _shuffled_types(order_seed)
    parts = subsets.divide(types, s, seed=7, dealing=dealing)
    assert len(parts) == s
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(types)))
    for p in parts:
        assert p.dtype == np.int64 and (np.diff(p) > 0).all()  # sorted, no repeats


@pytest.mark.parametrize("s", [2, 3, 4])
def test_balanced_spreads_every_type_round_robin(s):
    types = _shuffled_types(3)
    arr = np.asarray(types)
    parts = subsets.divide(types, s, seed=11, dealing="balanced")
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


@pytest.mark.parametrize("dealing", subsets.DEALINGS)
def test_deterministic_for_a_seed_and_seed_matters(dealing):
    a = subsets.divide(TYPES, 3, seed=5, dealing=dealing)
    b = subsets.divide(TYPES, 3, seed=5, dealing=dealing)
    c = subsets.divide(TYPES, 3, seed=6, dealing=dealing)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_authors_dealing_is_their_shuffle_and_stride():
    """Python's random seeded once with 42; per type (in order) shuffle, then subset d takes
    positions d, d + s, …: defect [0..4] shuffles to [3, 1, 2, 4, 0], good [5..8] to [8, 7, 5, 6]."""
    parts = subsets.divide(["defect"] * 5 + ["good"] * 4, 2, seed=42, dealing="authors")
    assert [p.tolist() for p in parts] == [[0, 2, 3, 5, 8], [1, 4, 6, 7]]


def test_authors_dealing_puts_every_remainder_first():
    # each type's leftover image goes to subset 0: sizes 4 and 2 (balanced would give 3 and 3)
    types = ["a"] * 3 + ["b"] * 3
    assert [len(p) for p in subsets.divide(types, 2, dealing="authors")] == [4, 2]
    assert sorted(len(p) for p in subsets.divide(types, 2, dealing="balanced")) == [3, 3]


def test_many_single_image_types():
    # four types of one image each: balanced makes 2 subsets of 2; the authors' dealing would
    # leave subset 2 empty, which is refused
    parts = subsets.divide(["a", "b", "c", "d"], 2, seed=0, dealing="balanced")
    assert sorted(len(p) for p in parts) == [2, 2]
    with pytest.raises(ValueError, match="at least 2 images"):
        subsets.divide(["a", "b", "c", "d"], 2, seed=0, dealing="authors")


def test_unknown_dealing_raises():
    with pytest.raises(ValueError, match="dealing"):
        subsets.divide(TYPES, 2, dealing="random")


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
