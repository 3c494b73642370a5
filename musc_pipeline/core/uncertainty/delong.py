"""DeLong's variance of the AUROC and DeLong's paired test (image AUROC).

DeLong, DeLong & Clarke-Pearson (1988), *Comparing the areas under two or more correlated
receiver operating characteristic curves: a nonparametric approach*, Biometrics 44(3). With m
defective images X and n normal images Y, ψ(x, y) = 1 if x > y, ½ if x = y, 0 else, the
AUROC is θ = mean ψ(X_i, Y_j) and its structural components are

    V10(X_i) = 1/n Σ_j ψ(X_i, Y_j),      V01(Y_j) = 1/m Σ_i ψ(X_i, Y_j).

For score sets r, s on the same images S10[r, s] = cov(V10^r, V10^s) and S01 likewise (sample
covariances, denominators m − 1 and n − 1), and Var θ = S10/m + S01/n. The components come
from midranks in O(N log N) (Sun & Xu 2014, *Fast implementation of DeLong's algorithm*, IEEE
Signal Processing Letters 21(11)): V10(X_i) = (T_Z(X_i) − T_X(X_i))/n with T_Z the midrank in
all scores and T_X in X alone, V01(Y_j) = 1 − (T_Z(Y_j) − T_Y(Y_j))/m. Midranks are scipy's
``rankdata(method="average")``.

A perfect separation has every V10 = 1 and every V01 = 0: variance 0, interval [1, 1]. That is
what DeLong's estimator says, and what pROC reports too; the paired test then answers p = 1 for
two perfect sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class DeLong:
    """AUROCs θ (one per score set) and their DeLong covariance matrix S."""

    auroc: np.ndarray
    cov: np.ndarray


def delong(labels: np.ndarray, *score_sets: np.ndarray) -> DeLong:
    """θ and S of each score set (N scores each) against ``labels`` (N, 1 = defect)."""
    labels = np.asarray(labels).astype(bool).ravel()
    m, n = int(labels.sum()), int((~labels).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least 2 defective and 2 normal images, got {m} and {n}")
    v10, v01 = [], []
    for scores in score_sets:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if scores.shape != labels.shape:
            raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same length")
        x, y = scores[labels], scores[~labels]
        t_z = rankdata(np.concatenate([x, y]))
        v10.append((t_z[:m] - rankdata(x)) / n)
        v01.append(1.0 - (t_z[m:] - rankdata(y)) / m)
    v10, v01 = np.array(v10), np.array(v01)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLong(auroc=v10.mean(axis=1), cov=cov)


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error and 100·level % interval [lo, hi]; for a difference
    also the two-sided p-value of 'no difference'."""

    value: float
    se: float
    lo: float
    hi: float
    p_value: float = math.nan


def auroc_interval(labels: np.ndarray, scores: np.ndarray, level: float = 0.95) -> Estimate:
    """Image AUROC with DeLong's standard error; the Wald interval θ ± z·se clipped to [0, 1]."""
    d = delong(labels, scores)
    theta, se = float(d.auroc[0]), math.sqrt(max(float(d.cov[0, 0]), 0.0))
    z = norm.ppf(0.5 + level / 2)
    return Estimate(theta, se, float(max(0.0, theta - z * se)), float(min(1.0, theta + z * se)))


def paired_auroc(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, level: float = 0.95) -> Estimate:
    """Δ = θ_a − θ_b on the same images, DeLong's paired test: z = Δ / sqrt(S_aa + S_bb − 2 S_ab),
    p = 2 Φ(−|z|), interval Δ ± z_level · se."""
    d = delong(labels, scores_a, scores_b)
    delta = float(d.auroc[0] - d.auroc[1])
    var = float(d.cov[0, 0] + d.cov[1, 1] - 2 * d.cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:  # identical ranks on both sides (or both perfect): no evidence of a difference unless Δ ≠ 0
        p = 1.0 if delta == 0.0 else 0.0
    else:
        p = float(2 * norm.sf(abs(delta) / se))
    z = norm.ppf(0.5 + level / 2)
    return Estimate(delta, se, float(delta - z * se), float(delta + z * se), p)
