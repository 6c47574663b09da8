"""Sufficient statistics of a bandit history and the labels every step record carries.

These are pure functions of per-arm pull counts and reward sums. The same functions
label agent steps, drive the reference policies and generate model-organism training
data, so "the true UCB arm" means one thing everywhere in kdgap.

Tie rules (documented once, used everywhere): every ``*_arms`` function returns the *set*
of tied arms as a boolean mask; a single arm, where one is needed, is the lowest index in
the set. Metrics use the masks, so an action that equals any tied arm counts as that arm.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int

BONUS_FORMS = ("sqrt_log_t_over_n", "ucb1")


def ucb_values(
    counts: Int[np.ndarray, "... arms"],
    sums: Float[np.ndarray, "... arms"],
    *,
    c: float = 0.5,
    bonus: str = "sqrt_log_t_over_n",
) -> Float[np.ndarray, "... arms"]:
    """Upper confidence bound of every arm.

    ``UCB(a) = mean(a) + c * sqrt(log(t) / N(a))`` for ``bonus="sqrt_log_t_over_n"`` (the
    form the paper's prompt asks the model to write down), or ``mean(a) + c * sqrt(2 log(t)
    / N(a))`` for ``bonus="ucb1"`` (Auer et al. 2002). ``t`` is the number of pulls so far
    (the sum of ``counts``). Untried arms get ``+inf``: UCB tries every arm once first.

    Args:
        counts: pulls per arm, shape ``[... arms]``.
        sums: reward sums per arm, same shape.
        c: exploration coefficient (>= 0).
        bonus: one of ``BONUS_FORMS``.

    Returns:
        UCB values, shape ``[... arms]``.
    """
    if bonus not in BONUS_FORMS:
        raise ValueError(f"bonus={bonus!r} is unknown; use one of {BONUS_FORMS}.")
    if c < 0:
        raise ValueError(f"c={c!r} must be >= 0 (it scales the exploration bonus).")
    counts = np.asarray(counts, dtype=np.float64)
    sums = np.asarray(sums, dtype=np.float64)
    t = counts.sum(axis=-1, keepdims=True)
    scale = 2.0 if bonus == "ucb1" else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / counts
        bonus_v = np.sqrt(scale * np.log(np.maximum(t, 1.0)) / counts)
        val = mean + c * bonus_v
    return np.where(counts > 0, val, np.inf)


def _argmax_mask(
    values: Float[np.ndarray, "... arms"], valid: Bool[np.ndarray, "... arms"] | None = None
) -> Bool[np.ndarray, "... arms"]:
    """Boolean mask of the maxima along the last axis (ties kept), over ``valid`` entries."""
    v = np.asarray(values, dtype=np.float64)
    if valid is not None:
        v = np.where(valid, v, -np.inf)
    best = v.max(axis=-1, keepdims=True)
    mask = np.isclose(v, best, rtol=0.0, atol=1e-12) | (v == best)
    if valid is not None:
        mask &= valid
    return mask


def ucb_arms(
    counts: Int[np.ndarray, "... arms"],
    sums: Float[np.ndarray, "... arms"],
    *,
    c: float = 0.5,
    bonus: str = "sqrt_log_t_over_n",
) -> Bool[np.ndarray, "... arms"]:
    """Mask of the arms with the highest UCB value (all untried arms tie at ``+inf``;
    ``c`` and ``bonus`` as in :func:`ucb_values`)."""
    return _argmax_mask(ucb_values(counts, sums, c=c, bonus=bonus))


def greedy_arms(
    counts: Int[np.ndarray, "... arms"], sums: Float[np.ndarray, "... arms"]
) -> Bool[np.ndarray, "... arms"]:
    """Mask of the arms with the best empirical mean *among tried arms*.

    With no tried arm (step 0) every arm is greedy: there is nothing to be greedy about.
    """
    counts = np.asarray(counts)
    tried = counts > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(tried, np.asarray(sums, dtype=np.float64) / counts, -np.inf)
    mask = _argmax_mask(mean, tried)
    none_tried = ~tried.any(axis=-1, keepdims=True)
    return np.where(none_tried, True, mask)


def most_frequent_arms(counts: Int[np.ndarray, "... arms"]) -> Bool[np.ndarray, "... arms"]:
    """Mask of the most-pulled arms (every arm at step 0)."""
    return _argmax_mask(np.asarray(counts, dtype=np.float64))


def first_arm(mask: Bool[np.ndarray, "... arms"]) -> Int[np.ndarray, "..."]:
    """Lowest-index arm of a tie mask (the tie-break used when one arm is needed)."""
    return np.argmax(np.asarray(mask), axis=-1)


def counts_and_sums(
    actions: Int[np.ndarray, " steps"], rewards: Float[np.ndarray, " steps"], n_arms: int
) -> tuple[Int[np.ndarray, " arms"], Float[np.ndarray, " arms"]]:
    """Per-arm pull counts and reward sums of one history."""
    actions = np.asarray(actions, dtype=np.int64)
    if actions.size and (actions.min() < 0 or actions.max() >= n_arms):
        raise ValueError(f"actions contain arms outside 0..{n_arms - 1}: {np.unique(actions)}")
    counts = np.bincount(actions, minlength=n_arms).astype(np.int64)
    sums = np.bincount(actions, weights=np.asarray(rewards, dtype=np.float64), minlength=n_arms)
    return counts, sums
