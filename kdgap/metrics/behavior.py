"""Behaviour metrics over step records: coverage, regret, suffix failures, validity.

Pure functions: records in, numbers out. Every curve is averaged over episodes; every
episode must have the same number of steps (checked), since curves are indexed by step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from kdgap.records import StepRecord, by_episode


def _episodes(records: Sequence[StepRecord]) -> list[list[StepRecord]]:
    if not records:
        raise ValueError("records is empty: play at least one episode first.")
    eps = by_episode(records)
    lengths = {len(e) for e in eps}
    if len(lengths) != 1:
        raise ValueError(f"episodes have different lengths {sorted(lengths)}; pass full episodes.")
    for e in eps:
        if [r.step for r in e] != list(range(len(e))):
            raise ValueError(f"episode {e[0].episode} is missing steps; pass full episodes.")
    return eps


def coverage_curve(records: Sequence[StepRecord]) -> Float[np.ndarray, " steps"]:
    """Action coverage ``C_t = |{a : N_t(a) > 0}| / |A|`` after each step, mean over episodes.

    ``curve[t]`` counts the arms pulled at steps ``0..t`` (Schmied et al. 2025, sec. 4.1).
    """
    eps = _episodes(records)
    k = eps[0][0].n_arms
    out = np.zeros((len(eps), len(eps[0])))
    for i, ep in enumerate(eps):
        seen: set[int] = set()
        for t, r in enumerate(ep):
            seen.add(r.action)
            out[i, t] = len(seen) / k
    return out.mean(axis=0)


def regret_curve(records: Sequence[StepRecord]) -> Float[np.ndarray, " steps"]:
    """Cumulative (expected) regret ``sum_{s<=t} max(mu) - mu[a_s]``, mean over episodes."""
    eps = _episodes(records)
    reg = np.array([[r.regret for r in ep] for ep in eps])
    return reg.cumsum(axis=1).mean(axis=0)


def suffix_failure_curve(records: Sequence[StepRecord]) -> Float[np.ndarray, " steps"]:
    """``curve[t]``: share of episodes that never pull the best arm at steps ``t..T-1``.

    Krishnamurthy et al. (2024) call an episode a *suffix failure* at ``t`` when the best
    arm is never chosen from ``t`` on; the curve rises with ``t`` by construction.
    """
    eps = _episodes(records)
    T = len(eps[0])
    fail = np.zeros((len(eps), T))
    for i, ep in enumerate(eps):
        best = ep[0].best_arm
        pulled_later = False
        for t in range(T - 1, -1, -1):
            pulled_later |= ep[t].action == best
            fail[i, t] = not pulled_later
    return fail.mean(axis=0)


def suffix_failure_rate(records: Sequence[StepRecord], t: int | None = None) -> float:
    """Share of episodes that never pull the best arm from step ``t`` on (default ``T // 2``)."""
    curve = suffix_failure_curve(records)
    t = len(curve) // 2 if t is None else t
    if not 0 <= t < len(curve):
        raise ValueError(f"t={t!r} is outside the episode (0..{len(curve) - 1}).")
    return float(curve[t])


def invalid_rate(records: Sequence[StepRecord]) -> float:
    """Share of steps whose action was invalid (the model wrote no valid ``ACTION=X``)."""
    if not records:
        raise ValueError("records is empty.")
    return float(np.mean([not r.valid for r in records]))
