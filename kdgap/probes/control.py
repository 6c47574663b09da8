"""Hewitt & Liang (2019) control tasks and selectivity.

A control task keeps the *shape* of a real task (same number of classes, same label
frequencies) but assigns labels by a fixed random map from a surface feature that carries
no information about the real label. Here the surface feature is the step index by
default: every example at step ``t`` gets label ``map[t]``, the same in every episode.
A probe can solve it only by memorising which activations go with which step value, so
its control accuracy measures the probe's capacity to memorise, and

    selectivity = task accuracy - control accuracy

is the part of the task accuracy that capacity does not explain (high for linear probes,
low for MLP probes in Hewitt & Liang). Because splits are grouped by episode, the same step
values occur in train and test, which is exactly the memorisation the control rewards.
"""

from __future__ import annotations

import numpy as np


def control_labels(feature: np.ndarray, y: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Labels of a control task: a fixed random map from ``feature`` values to classes.

    Each distinct value of ``feature`` gets one class drawn (with ``seed``) from the
    empirical class distribution of ``y``, so the control task has the real task's
    classes and roughly its class frequencies.

    Args:
        feature: ``Int[ndarray, "n_examples"]`` surface feature (e.g. the step index).
        y: ``Int[ndarray, "n_examples"]`` real labels; negative values mean missing and
            stay missing (-1) in the control task.
        seed: seed of the map (fixed per sweep so control tasks are reproducible).

    Returns:
        ``Int[ndarray, "n_examples"]`` control labels.
    """
    feature, y = np.asarray(feature), np.asarray(y)
    if feature.shape != y.shape:
        raise ValueError(
            f"feature has shape {feature.shape} but y has {y.shape}; pass one surface "
            "value per example (e.g. labels['step'])."
        )
    present = y >= 0
    if not present.any():
        raise ValueError("y has no non-missing labels; a control task needs some.")
    classes, counts = np.unique(y[present], return_counts=True)
    values, inverse = np.unique(feature, return_inverse=True)
    rng = np.random.default_rng(seed)
    mapping = rng.choice(classes, size=len(values), p=counts / counts.sum())
    out = mapping[inverse].astype(np.int64)
    out[~present] = -1
    return out


def selectivity(task_accuracy: float, control_accuracy: float) -> float:
    """Hewitt-Liang selectivity: task accuracy minus control-task accuracy."""
    return float(task_accuracy) - float(control_accuracy)
