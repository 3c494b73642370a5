"""Slow float64 references written directly from the formulas of SPEC.md (loops, numpy)."""

from __future__ import annotations

import math

import numpy as np


def lnamd(tokens: np.ndarray, r: int, eps: float = 1e-5) -> np.ndarray:
    """tokens N×h×w×C -> Z N×h×w×C (LayerNorm over the map, r×r zero-padded mean, L2)."""
    n, h, w, c = tokens.shape
    out = np.zeros((n, h, w, c))
    half = r // 2
    for i in range(n):
        x = tokens[i].astype(np.float64)
        y = (x - x.mean()) / math.sqrt(x.var() + eps)
        for a in range(h):
            for b in range(w):
                acc = np.zeros(c)
                for da in range(-half, half + 1):
                    for db in range(-half, half + 1):
                        if 0 <= a + da < h and 0 <= b + db < w:
                            acc += y[a + da, b + db]
                v = acc / (r * r)
                out[i, a, b] = v / np.linalg.norm(v)
    return out


def interval_mean(values: np.ndarray, lo: float, hi: float) -> float:
    v = np.sort(values)
    n = v.size
    start = min(math.floor(lo * n), n - 1)
    stop = min(n, max(start + 1, math.floor(hi * n)))
    return float(v[start:stop].mean())


def nearest_distances(zq: np.ndarray, zk: np.ndarray) -> np.ndarray:
    """a[m, n_img] = min over patches of image n_img of ‖zq[m] − zk[n_img, ·]‖."""
    return np.array([[np.sqrt(((zq[m] - zk[j]) ** 2).sum(-1)).min() for j in range(zk.shape[0])] for m in range(zq.shape[0])])


def msm(z: np.ndarray, lo: float = 0.0, hi: float = 0.3, refs: np.ndarray | None = None, plus: bool = False) -> np.ndarray:
    """z N×P×C unit vectors -> N×P scores; refs k×P×C for few-shot (plus: MuSc+)."""
    n, p, _ = z.shape
    out = np.zeros((n, p))
    for i in range(n):
        pool = [] if plus else [z[j] for j in range(n) if j != i]
        if refs is not None:
            pool += list(refs)
        a = nearest_distances(z[i].astype(np.float64), np.stack(pool).astype(np.float64))
        for m in range(p):
            out[i, m] = a[m].min() if plus else interval_mean(a[m], lo, hi)
    return out


def rscin(scores: np.ndarray, tokens: np.ndarray, windows) -> np.ndarray:
    c = (scores - scores.min()) / (scores.max() - scores.min())
    w = tokens @ tokens.T
    n = len(c)
    total = np.zeros(n)
    for k in windows:
        for i in range(n):
            keep = np.argsort(-w[i], kind="stable")[: min(k, n)]
            total[i] += sum(w[i, j] * c[j] for j in keep) / sum(w[i, j] for j in keep)
    return total / len(windows)


def snamd(y: np.ndarray, degrees) -> np.ndarray:
    """MuSc-V2 SWPooling. y N×h×w×C layer-normed -> Z N×h×w×C: for each r the window's
    exp(−‖y_n − y_m‖)-weighted mean (zero features outside the map, weights counted),
    averaged over r, L2-normalised."""
    n, h, w, c = y.shape
    out = np.zeros((n, h, w, c))
    for i in range(n):
        x = y[i].astype(np.float64)
        for a in range(h):
            for b in range(w):
                acc = np.zeros(c)
                for r in degrees:
                    num, den = np.zeros(c), 0.0
                    for da in range(-(r // 2), r // 2 + 1):
                        for db in range(-(r // 2), r // 2 + 1):
                            inside = 0 <= a + da < h and 0 <= b + db < w
                            f = x[a + da, b + db] if inside else np.zeros(c)
                            wgt = math.exp(-np.linalg.norm(f - x[a, b]))
                            num += wgt * f
                            den += wgt
                    acc += num / den
                v = acc / len(degrees)
                out[i, a, b] = v / np.linalg.norm(v)
    return out


def salient_features(z: np.ndarray, patch_scores: np.ndarray) -> np.ndarray:
    """RsCon's anomaly-salient features: z N×h×w×C unit stage features at argmax_m A(i, m)."""
    n, h, w, c = z.shape
    return np.stack([z[i].reshape(h * w, c)[int(np.argmax(patch_scores[i]))] for i in range(n)])


def topk_mean(amap: np.ndarray, q: float) -> float:
    """Mean of the ceil(q·#pixels) largest values of one map."""
    v = np.sort(amap.ravel())[::-1]
    return float(v[: max(1, math.ceil(q * v.size))].mean())
