"""RsCIN (SPEC §5) against the slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference
from musc_pipeline.core import rscin


def _data(seed: int, n: int = 12, d: int = 8):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-3, 5, n)
    tokens = rng.normal(size=(n, d))
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    return scores, tokens


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_window_one_is_min_max_normalised_input(seed):
    scores, tokens = _data(seed)
    got = rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens), windows=(1,), precision="float64").numpy()
    want = (scores - scores.min()) / (scores.max() - scores.min())
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got.min() == pytest.approx(0.0) and got.max() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [21, 22, 23, 24])
@pytest.mark.parametrize("windows", [(1, 2, 3), (1, 8, 9)])
@pytest.mark.parametrize(("precision", "atol"), [("float32", 1e-6), ("float64", 1e-12)])
def test_matches_reference(seed, windows, precision, atol):
    scores, tokens = _data(seed, n=15)
    got = rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens), windows, precision).numpy()
    want = reference.rscin(scores, tokens, windows)
    np.testing.assert_allclose(got, want, atol=atol)
    # and re-scoring did something beyond normalisation
    norm = (scores - scores.min()) / (scores.max() - scores.min())
    assert np.abs(got - norm).max() > 1e-3


def test_window_larger_than_n_uses_all_images():
    scores, tokens = _data(4, n=5)
    got = rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens), (1, 8, 9), "float64").numpy()
    np.testing.assert_allclose(got, reference.rscin(scores, tokens, (1, 8, 9)), atol=1e-12)


def test_neighbour_pulls_score():
    """Two near-identical images average their scores at k = 2."""
    tokens = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]])
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    scores = np.array([0.0, 1.0, 0.5])
    got = rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens), (2,)).numpy()
    w01 = tokens[0] @ tokens[1]
    assert got[0] == pytest.approx(w01 * 1.0 / (1 + w01))
    assert got[1] == pytest.approx(1.0 / (1 + w01))


def test_mismatched_lengths_raise():
    scores, tokens = _data(5, n=6)
    with pytest.raises(ValueError, match="6 scores but 5 class tokens"):
        rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens[:5]))


@pytest.mark.parametrize("windows", [(), (0, 2), (-1,)])
def test_bad_windows_raise(windows):
    scores, tokens = _data(6, n=6)
    with pytest.raises(ValueError, match="windows"):
        rscin.rescore(torch.from_numpy(scores), torch.from_numpy(tokens), windows)


def test_constant_scores_map_to_zero():
    _, tokens = _data(7, n=4)
    got = rscin.rescore(torch.full((4,), 2.5), torch.from_numpy(tokens))
    np.testing.assert_array_equal(got.numpy(), np.zeros(4))


def test_windows_by_dataset():
    assert rscin.windows_for("mvtec_ad") == (1, 2, 3)
    assert rscin.windows_for("visa") == (1, 8, 9)
    assert rscin.windows_for("btad") == (1, 2, 3)


def test_class_tokens_must_be_unit_vectors():
    scores, tokens = _data(31, n=10)
    scaled = tokens * np.random.default_rng(32).uniform(0.1, 50, (10, 1))
    with pytest.raises(ValueError, match="L2-normalised class tokens"):
        rscin.rescore(torch.from_numpy(scores), torch.from_numpy(scaled), (1, 2, 3))


def test_float32_is_the_authors_arithmetic_on_near_ties():
    """Two neighbours of image 0 tie to within float32 rounding: the float32 path decides the
    tie from float32 similarities (as the authors' code does), the float64 path from exact ones."""
    tokens = np.zeros((4, 3))
    tokens[0] = [1.0, 0.0, 0.0]
    tokens[1] = [np.cos(0.5), np.sin(0.5), 0.0]
    tokens[2] = [np.cos(0.5 + 1e-9), 0.0, np.sin(0.5 + 1e-9)]  # 5e-10 less similar to image 0 than image 1
    tokens[3] = [0.0, 1.0, 0.0]
    scores = torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    t = torch.from_numpy(tokens)
    exact = rscin.rescore(scores, t, (2,), "float64")
    assert exact[0] == pytest.approx(1.0 * np.cos(0.5) / (1 + np.cos(0.5)))  # image 1 is the neighbour
    w32 = tokens.astype(np.float32) @ tokens.astype(np.float32).T
    assert w32[0, 1] == w32[0, 2]  # float32 cannot tell them apart
    f32 = rscin.rescore(scores, t, (2,), "float32")
    dropped = torch.topk(torch.from_numpy(w32), 2, dim=1, largest=False).indices[0].tolist()
    neighbour = ({1, 2} - set(dropped)).pop()
    assert f32[0] == pytest.approx(float(scores[neighbour]) * np.cos(0.5) / (1 + np.cos(0.5)), abs=1e-6)


def test_opposite_embeddings_are_refused_not_divided_by_zero():
    tokens = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    scores = torch.tensor([0.1, 0.9])
    rscin.rescore(scores, tokens, (1,))  # k = 1: each image alone, defined
    with pytest.raises(ValueError, match=r"window k = 2.*image\(s\) \[0, 1\]"):
        rscin.rescore(scores, tokens, (1, 2))
