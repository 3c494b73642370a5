"""LNAMD (SPEC §2) against the slow float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference
from musc_pipeline.core import lnamd


def _tokens(seed: int, n: int = 3, h: int = 5, w: int = 6, c: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # an offset and scale per image, so the LayerNorm over the whole map matters
    return rng.normal(size=(n, h, w, c)) * rng.uniform(0.5, 3.0, (n, 1, 1, 1)) + rng.normal(size=(n, 1, 1, 1)) * 4


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("r", [1, 3, 5])
def test_aggregate_matches_reference(seed, r):
    tokens = _tokens(seed)
    got = lnamd.aggregate(torch.from_numpy(tokens).float(), r).double().numpy()
    want = reference.lnamd(tokens, r)
    assert got.shape == tokens.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_aggregate_gives_unit_vectors():
    z = lnamd.aggregate(torch.from_numpy(_tokens(5)).float(), 3)
    np.testing.assert_allclose(torch.linalg.vector_norm(z, dim=-1).numpy(), 1.0, atol=1e-6)


def test_window_mean_counts_zero_padding():
    # a constant map of ones: a corner's 3×3 window holds 4 real positions out of 9
    y = torch.ones(1, 4, 4, 2)
    b = lnamd.window_mean(y, 3)
    assert b[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert b[0, 0, 1, 0].item() == pytest.approx(6 / 9)
    assert b[0, 1, 1, 0].item() == pytest.approx(1.0)


def test_window_norms_are_norms_of_window_mean():
    y = lnamd.layer_norm_map(torch.from_numpy(_tokens(3)).float())
    n = lnamd.window_norms(y, 5)
    np.testing.assert_allclose(n.numpy(), torch.linalg.vector_norm(lnamd.window_mean(y, 5), dim=-1).numpy(), rtol=1e-6)


def test_layer_norm_is_over_the_whole_map():
    y = lnamd.layer_norm_map(torch.from_numpy(_tokens(4)).double())
    flat = y.reshape(y.shape[0], -1)
    np.testing.assert_allclose(flat.mean(1).numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(flat.var(1, unbiased=False).numpy(), 1.0, atol=1e-4)


@pytest.mark.parametrize("r", [0, 2, -1])
def test_bad_degree_raises(r):
    with pytest.raises(ValueError, match="odd"):
        lnamd.aggregate(torch.zeros(1, 3, 3, 2), r)


def test_tokens_must_be_a_map():
    with pytest.raises(ValueError, match="N×h×w×C"):
        lnamd.layer_norm_map(torch.zeros(3, 9, 2))
