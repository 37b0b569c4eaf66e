"""Popularity-debiased (inverse-propensity) estimates of ranking metrics.

Test targets are not missing at random: a customer can only buy what they were shown, and popular
items are shown more, so the plain mean over test users weights popular targets up and flatters
models that lean on popularity. Following Yang et al. ("Unbiased Offline Recommender Evaluation for
Missing-Not-At-Random Implicit Feedback", RecSys 2018), each target is weighted by the inverse of
its exposure propensity, estimated from training counts as

    p(item) proportional to (count(item) + 1) ** gamma

(the + 1 gives items without a training event, cold targets ranked under evaluation.cold_items,
a finite weight), and the estimate is self-normalised: sum(w * m) / sum(w) over users. gamma = 0
is the plain mean; larger gamma assumes a stronger exposure bias. A user with several targets
(evaluation.targets=window) is weighted by the mean of their targets' weights.

Intervals and tests treat the propensities as fixed (they come from the training data, not from
the test users) and the self-normalisation as a ratio estimator: its variance is the delta
method's, (1/n) var(w (m - estimate)) / mean(w)^2.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from recsys.errors import UserInputError

WEIGHT_COLUMN = "ips_weight"
PREFIX = "ips_"


def check_gamma(gamma, key: str = "evaluation.ips_gamma") -> float | None:
    """None (no debiased metrics) or a number >= 0."""
    if gamma is None:
        return None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise UserInputError(f"{key}: must be a number >= 0 or null, got {gamma!r}")
    if gamma < 0:
        raise UserInputError(f"{key}: must be >= 0 (the exponent of the exposure propensity), got {gamma}")
    return float(gamma)


def propensity_weights(train_counts: np.ndarray, gamma: float) -> np.ndarray:
    """Inverse exposure propensities (count + 1) ** -gamma, up to a constant the self-normalised
    estimate divides out."""
    counts = np.asarray(train_counts, dtype=np.float64)
    if (counts < 0).any():
        raise ValueError("training counts must be >= 0")
    return (counts + 1.0) ** -float(gamma)


def ips_mean(values: np.ndarray, weights: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """The self-normalised weighted mean and its two-sided delta-method t interval."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    estimate = float((weights * values).sum() / weights.sum())
    if len(values) < 2:
        return estimate, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * _standard_error(values, weights, estimate)
    return estimate, estimate - half, estimate + half


def _standard_error(values: np.ndarray, weights: np.ndarray, estimate: float) -> float:
    influence = weights * (values - estimate) / weights.mean()
    return float(influence.std(ddof=1) / math.sqrt(len(values)))


def ips_paired_pvalue(differences: np.ndarray, weights: np.ndarray) -> float:
    """Two-sided p-value of 'the self-normalised weighted mean difference is 0' (delta-method t)."""
    differences = np.asarray(differences, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    estimate = float((weights * differences).sum() / weights.sum())
    if len(differences) < 2:
        return math.nan
    error = _standard_error(differences, weights, estimate)
    if error == 0:
        return 1.0 if estimate == 0 else 0.0  # no spread: identical runs, or a constant shift
    return float(2 * stats.t.sf(abs(estimate) / error, len(differences) - 1))


def ips_bootstrap_interval(
    differences: np.ndarray,
    weights: np.ndarray,
    samples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the self-normalised weighted mean difference, users resampled with
    replacement (numerator and denominator from the same resample)."""
    differences = np.asarray(differences, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(differences)
    estimates = np.empty(samples)
    chunk = max(1, 2_000_000 // max(n, 1))
    for begin in range(0, samples, chunk):
        size = min(chunk, samples - begin)
        index = rng.integers(0, n, (size, n))
        w = weights[index]
        estimates[begin : begin + size] = (w * differences[index]).sum(axis=1) / w.sum(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(estimates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def debiased_metrics(frame, prefix: str) -> dict[str, float]:
    """`<prefix>/ips_<metric>` for each metric column (`name@K`) of a per_user.parquet frame with
    an ips_weight column, for metrics.json."""
    weights = frame[WEIGHT_COLUMN].to_numpy(np.float64)
    return {
        f"{prefix}/{PREFIX}{name}": float((weights * frame[name].to_numpy(np.float64)).sum() / weights.sum())
        for name in frame.columns
        if "@" in name
    }
