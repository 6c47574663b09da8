"""Accuracy with a confidence interval, chance level, and bootstrap over episodes.

Steps of one episode are not independent (they share a history), so the default interval
resamples whole episodes (a cluster bootstrap); the Wilson interval, which assumes
independent examples, is kept for reference and is narrower whenever episodes cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int, Shaped
from scipy.stats import norm


@dataclass(frozen=True)
class Estimate:
    """A mean with a two-sided interval (``low <= value <= high`` up to resampling)."""

    value: float
    low: float
    high: float
    n: int


def wilson_interval(n_correct: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``n_correct / n``.

    Returns ``(nan, nan)`` when ``n == 0``.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(0.5 + confidence / 2))
    p = n_correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(centre - half), float(centre + half))


def cluster_bootstrap(
    values: Float[np.ndarray, " n_examples"],
    groups: Int[np.ndarray, " n_examples"],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of ``values`` with a percentile interval from resampling whole episodes.

    Args:
        values: ``Float[ndarray, "n_examples"]`` per-example values (1/0 for correctness,
            or a paired difference such as ``correct_a - correct_b``).
        groups: ``Int[ndarray, "n_examples"]`` episode id of every example.
        n_boot: bootstrap replicates; each draws as many episodes as there are, with
            replacement, and takes the example-weighted mean.
        confidence: two-sided coverage.
        seed: seed of the resampling.

    Returns:
        :class:`Estimate` (value = plain mean; nan everywhere when there are no examples).
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    if len(values) != len(groups):
        raise ValueError(
            f"values has {len(values)} entries but groups has {len(groups)}; pass one "
            "episode id per value."
        )
    if len(values) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse).astype(np.float64)
    n_groups = len(sums)
    # Multinomial counts = how many times each episode is drawn in each replicate; one
    # matrix product then gives every replicate's mean at once.
    draws = np.random.default_rng(seed).multinomial(
        n_groups, np.full(n_groups, 1 / n_groups), size=n_boot
    )
    means = (draws @ sums) / (draws @ counts)
    lo, hi = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Estimate(float(values.mean()), float(lo), float(hi), len(values))


def accuracy_ci(
    y_true: Shaped[np.ndarray, " n_examples"],
    y_pred: Shaped[np.ndarray, " n_examples"],
    groups: Int[np.ndarray, " n_examples"] | None = None,
    *,
    method: str = "bootstrap",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Accuracy of ``y_pred`` against ``y_true`` with a confidence interval.

    Args:
        y_true, y_pred: ``Int[ndarray, "n_examples"]``.
        groups: ``Int[ndarray, "n_examples"]`` episode ids; required for ``"bootstrap"``.
        method: ``"bootstrap"`` (over episodes, default) or ``"wilson"``.
    """
    correct = np.asarray(y_true) == np.asarray(y_pred)
    if method == "wilson":
        lo, hi = wilson_interval(int(correct.sum()), len(correct), confidence=confidence)
        acc = float(correct.mean()) if len(correct) else float("nan")
        return Estimate(acc, lo, hi, len(correct))
    if method != "bootstrap":
        raise ValueError(f"method={method!r}: use 'bootstrap' (over episodes) or 'wilson'.")
    if groups is None:
        raise ValueError(
            "method='bootstrap' resamples episodes: pass groups (episode id per example), "
            "or method='wilson'."
        )
    return cluster_bootstrap(correct, groups, n_boot=n_boot, confidence=confidence, seed=seed)


def chance_level(
    y_train: Shaped[np.ndarray, " n_train"], y_test: Shaped[np.ndarray, " n_test"]
) -> float:
    """Test accuracy of always predicting the training set's majority class.

    This is the majority-class rate a probe must beat; it uses the *training* majority
    so that the baseline, like the probe, never looks at test labels.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(y_train) == 0 or len(y_test) == 0:
        return float("nan")
    classes, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == classes[np.argmax(counts)]))
