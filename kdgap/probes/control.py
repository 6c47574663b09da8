"""Hewitt & Liang (2019) control tasks and selectivity.

A control task keeps the *shape* of a real task (same classes, label frequencies drawn
from the real task's) but assigns labels by a fixed random map from a *surface feature*
("type") that carries no information about the real label. A probe can solve it only by
memorising which activations go with which type, so its control accuracy measures the
probe's capacity to memorise, and

    selectivity = task accuracy - control accuracy

is the part of the task accuracy that capacity does not explain (high for linear probes,
low for MLP probes in Hewitt & Liang). For the control to reward memorisation, the same
types must occur in the training and the test split; splits here hold out whole episodes,
so the type has to recur *across* episodes.

**The default type: the reward history** (``control_feature="reward_history"``,
:func:`reward_history`): the last :data:`HISTORY_LENGTH` rewards of the episode before
the step, i.e. the outcome tokens at the end of the prompt's history
(``"yellow0 blue1 ..."`` in the organisms' format). With binary rewards there are
``2**6`` full patterns plus the shorter ones of the first steps, each seen in many
episodes, so memorising them pays on held-out episodes, and they vary independently of
the prompt's length.

**Why not the step index** (still available: ``control_feature="step"``). At the action
site the position is the step (an organism's prompt is 21 tokens + one per step), and
position is linearly decodable from the residual stream: a step control is solved by
reading the position, not by memorising. On the faithful organism a logistic probe
decodes the step control almost perfectly at every layer, far above the reward-history
control (per-cell accuracies of both: ``experiments/bench/probes.py`` with and without
``--control-feature step``). Selectivity against the step control
is therefore near 0 (or negative) wherever the position is encoded, whatever the probe
decodes; ``tests/probes/test_splits_stats.py`` shows the step control is a function of
the position and the reward history is not.

**Why not the episode id.** Test episodes never occur in training, so a map of the
episode id gives test labels no probe can learn: it sits at chance by construction and
measures no capacity at all (that is the random-label check, tested separately).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Int, Shaped

from kdgap._checks import check_int

#: Surface feature of a sweep's control tasks (see :func:`control_types`).
DEFAULT_CONTROL = "reward_history"
#: Number of past rewards that make a reward-history type.
HISTORY_LENGTH = 6
#: A reward column with more distinct values than this is not a discrete outcome token.
_MAX_REWARD_VALUES = 16


def reward_history(
    table: pd.DataFrame, *, k: int = HISTORY_LENGTH, column: str = "reward"
) -> Int[np.ndarray, " n_examples"]:
    """Type id of the last ``k`` rewards before each example's step, in its episode.

    The reward of step ``t`` is what the prompt of step ``t + 1`` shows, so the type of
    step ``t`` is ``(reward[t-1], ..., reward[t-k])`` of its episode. A step before the
    episode start counts as its own symbol, a step absent from ``table`` as another.

    Args:
        table: label table with columns ``episode``, ``step`` and ``column``; one row per
            (episode, step).
        k: history length.
        column: the per-step outcome (discrete: at most 16 distinct values).

    Returns:
        ``Int[ndarray, "n_examples"]`` type ids (equal ids = equal histories).
    """
    for col in ("episode", "step", column):
        if col not in table.columns:
            raise ValueError(
                f"control_feature='reward_history' needs a {col!r} column in the label "
                f"table (columns: {list(table.columns)}); pass control_feature='step' or "
                "another column instead."
            )
    k = check_int("k", k, hint="(the history needs at least 1 step)")
    ep = table["episode"].to_numpy()
    st = table["step"].to_numpy().astype(np.int64)
    r = table[column].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    values, sym = np.unique(r, return_inverse=True)  # NaN (missing reward): its own value
    if len(values) > _MAX_REWARD_VALUES:
        raise ValueError(
            f"column={column!r} has {len(values)} distinct values; a reward history is a "
            "type only for discrete outcomes (e.g. Bernoulli rewards). Pass "
            "control_feature='step' or a discrete column."
        )
    index = pd.MultiIndex.from_arrays([ep, st])
    if not index.is_unique:
        raise ValueError("table has repeated (episode, step) rows; pass one row per step.")
    lookup = pd.Series(sym.reshape(-1), index=index)
    before_start, absent = len(values), len(values) + 1
    base = len(values) + 2
    code = np.zeros(len(table), dtype=np.int64)
    for j in range(1, k + 1):
        prev = lookup.reindex(pd.MultiIndex.from_arrays([ep, st - j])).to_numpy()
        s = np.where(np.isnan(prev), absent, np.nan_to_num(prev)).astype(np.int64)
        s[st - j < 0] = before_start
        code = code * base + s
    return code


def control_types(
    table: pd.DataFrame, name: str = DEFAULT_CONTROL
) -> Shaped[np.ndarray, " n_examples"]:
    """The surface feature ``name`` of every row of ``table``.

    ``"reward_history"``: :func:`reward_history`; any other name: that column (e.g.
    ``"step"``, the surface feature of the original control, see the module docstring).
    """
    if name == "reward_history":
        return reward_history(table)
    if name not in table.columns:
        raise ValueError(
            f"control_feature={name!r} is neither 'reward_history' nor a column of the "
            f"label table ({list(table.columns)})."
        )
    return table[name].to_numpy()


def control_labels(
    feature: Shaped[np.ndarray, " n_examples"], y: Int[np.ndarray, " n_examples"], *, seed: int = 0
) -> Int[np.ndarray, " n_examples"]:
    """Labels of a control task: a fixed random map from ``feature`` values to classes.

    Each distinct value of ``feature`` gets one class drawn (with ``seed``) from the
    empirical class distribution of ``y``, so the control task has the real task's
    classes and roughly its class frequencies.

    Args:
        feature: ``Int[ndarray, "n_examples"]`` surface feature (e.g.
            :func:`reward_history` or the step index).
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
            "value per example (e.g. control_types(table))."
        )
    present = y >= 0
    if not present.any():
        raise ValueError("y has no non-missing labels; a control task needs some.")
    classes, counts = np.unique(y[present], return_counts=True)
    values, inverse = np.unique(feature, return_inverse=True)
    rng = np.random.default_rng(seed)
    mapping = rng.choice(classes, size=len(values), p=counts / counts.sum())
    out = mapping[inverse.reshape(-1)].astype(np.int64)
    out[~present] = -1
    return out


def selectivity(task_accuracy: float, control_accuracy: float) -> float:
    """Hewitt-Liang selectivity: task accuracy minus control-task accuracy."""
    return float(task_accuracy) - float(control_accuracy)
