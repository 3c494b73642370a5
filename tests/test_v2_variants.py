"""MuSc-V2 variants (SNAMD, RsCon) and image-score variants against the slow float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reference
from musc_pipeline.core import lnamd, maps, rscon, snamd


def _maps(seed: int, n: int = 4, h: int = 5, w: int = 6, c: int = 6) -> np.ndarray:
    """Layer-normed maps Y with small C, so neighbours get non-negligible SWPooling weights."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n, h, w, c)) * rng.uniform(0.5, 3.0, (n, 1, 1, 1))
    return lnamd.layer_norm_map(torch.from_numpy(tokens)).numpy()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("degrees", [(1, 3, 5), (3,), (1, 5), (1,)])
def test_snamd_matches_reference(seed, degrees):
    y = _maps(seed)
    got = snamd.aggregate(torch.from_numpy(y).float(), degrees).double().numpy()
    np.testing.assert_allclose(got, reference.snamd(y, degrees), rtol=0, atol=1e-5)


def test_snamd_weights_favour_similar_neighbours():
    """A patch beside a very different one keeps its own feature; LNAMD's mean mixes them."""
    y = torch.zeros(1, 1, 3, 2)
    y[0, 0, 0] = torch.tensor([1.0, 0.0])
    y[0, 0, 1] = torch.tensor([1.0, 0.05])
    y[0, 0, 2] = torch.tensor([-20.0, 0.0])  # an outlier right of the middle patch
    z = snamd.aggregate(y, (3,))[0, 0, 1]
    box = torch.nn.functional.normalize(lnamd.window_mean(y, 3)[0, 0, 1], dim=-1)
    assert z[0] > 0.99 and box[0] < 0


def test_snamd_degree_one_is_the_normalised_map():
    y = torch.from_numpy(_maps(3)).float()
    np.testing.assert_allclose(snamd.aggregate(y, (1,)).numpy(), lnamd.aggregate(y, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("degrees", [(), (2,), (1, 4)])
def test_snamd_bad_degrees_raise(degrees):
    with pytest.raises(ValueError, match="odd"):
        snamd.aggregate(torch.zeros(1, 3, 3, 2), degrees)


def test_snamd_msm_matches_reference():
    """MSM on SNAMD features (one feature set per stage) equals the float64 reference MSM."""
    ys = [_maps(s, n=5) for s in (4, 5)]
    got = snamd.score_stages([torch.from_numpy(y).float() for y in ys], [list(range(5))]).double().numpy()
    assert got.shape == (5, 2, 1, 30)
    for l, y in enumerate(ys):
        z = reference.snamd(y, (1, 3, 5)).reshape(5, 30, -1)
        np.testing.assert_allclose(got[:, l, 0], reference.msm(z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["lnamd", "snamd"])
def test_rscon_salient_features_match_reference(aggregation):
    y = _maps(6, n=5)
    patch = np.random.default_rng(6).uniform(size=(5, 30))
    got = rscon.salient_features(torch.from_numpy(y).float(), torch.from_numpy(patch), (1, 3, 5), aggregation)
    if aggregation == "snamd":
        z = reference.snamd(y, (1, 3, 5))
    else:  # mean over degrees of the window means, L2-normalised
        mean = sum(_window_mean(y, r) for r in (1, 3, 5)) / 3
        z = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(got.double().numpy(), reference.salient_features(z, patch), atol=1e-5)


def _window_mean(y: np.ndarray, r: int) -> np.ndarray:
    n, h, w, c = y.shape
    out = np.zeros_like(y)
    for a in range(h):
        for b in range(w):
            for da in range(-(r // 2), r // 2 + 1):
                for db in range(-(r // 2), r // 2 + 1):
                    if 0 <= a + da < h and 0 <= b + db < w:
                        out[:, a, b] += y[:, a + da, b + db]
    return out / (r * r)


def test_rscon_rescore_is_rscin_on_salient_features_with_window_one():
    rng = np.random.default_rng(7)
    scores = rng.uniform(size=12)
    feats = rng.normal(size=(12, 4))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    got = rscon.rescore(torch.from_numpy(scores), torch.from_numpy(feats), (7,)).numpy()
    np.testing.assert_allclose(got, reference.rscin(scores, feats, (1, 7)), atol=1e-6)  # float32, as the authors


def test_rscon_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="do not match"):
        rscon.salient_features(torch.zeros(2, 3, 3, 4), torch.zeros(2, 8), (1,), "lnamd")


@pytest.mark.parametrize("q", [0.001, 0.01, 0.2, 1.0])
def test_topk_mean_matches_reference(q):
    amaps = torch.from_numpy(np.random.default_rng(8).uniform(size=(3, 20, 20)))
    got = maps.image_scores(amaps, "topk_mean", q).numpy()
    np.testing.assert_allclose(got, [reference.topk_mean(m, q) for m in amaps.numpy()], atol=1e-12)


def test_topk_mean_discounts_a_single_spike():
    amaps = torch.zeros(2, 10, 10)
    amaps[0, 3, 3] = 1.0  # one noisy pixel
    amaps[1, 2:5, 2:5] = 0.5  # a small defect
    assert maps.image_scores(amaps, "max").tolist() == [1.0, 0.5]
    top = maps.image_scores(amaps, "topk_mean", 0.05)
    assert top[1] > top[0]


def test_unknown_image_score_raises():
    with pytest.raises(ValueError, match="image score"):
        maps.image_scores(torch.zeros(1, 2, 2), "median")
    with pytest.raises(ValueError, match="image_score_q"):
        maps.image_scores(torch.zeros(1, 2, 2), "topk_mean", 0.0)
