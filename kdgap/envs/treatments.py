"""History edits that change which arm the evidence favours: the treatments of the mediation
decomposition (history -> rationale -> action).

A treatment exchanges the identities of two arms throughout a history (every pull of arm
``x`` becomes a pull of arm ``y`` and vice versa, rewards kept). The edited history is as
plausible as the clean one (the same rewards, the same number of steps), its per-arm
statistics are the clean ones with two arms' swapped, and the arm a statistic favours moves
from ``x`` to ``y``:

- ``"ucb"``: ``x`` is the true UCB arm (the arm a correct rationale concludes with);
- ``"greedy"``: ``x`` is the greedy arm (best empirical mean among tried arms);
- ``"frequent"``: ``x`` is the most-pulled arm.

A treatment applies only where ``x`` is the *unique* favoured arm and ``y`` has different
statistics (otherwise the swap changes nothing the treatment names); the partner ``y`` is
drawn by the caller's seeded generator among the admissible arms. Pure numpy: no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums, greedy_arms, most_frequent_arms, ucb_arms

TREATMENTS = ("ucb", "greedy", "frequent")


@dataclass(frozen=True)
class Treatment:
    """One edited history.

    Attributes:
        kind: one of :data:`TREATMENTS`.
        actions, rewards: the edited history (rewards unchanged).
        arm_from, arm_to: the favoured arm before and after the edit (the swapped pair).
    """

    kind: str
    actions: list[int]
    rewards: list[float]
    arm_from: int
    arm_to: int


def favoured_arms(
    kind: str, actions: Sequence[int], rewards: Sequence[float], cfg: BanditConfig
) -> np.ndarray:
    """Mask ``[arms]`` of the arms the statistic ``kind`` favours in a history (ties kept)."""
    counts, sums = counts_and_sums(actions, rewards, cfg.n_arms)
    if kind == "ucb":
        return ucb_arms(counts, sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)
    if kind == "greedy":
        return greedy_arms(counts, sums)
    if kind == "frequent":
        return most_frequent_arms(counts)
    raise ValueError(f"kind={kind!r} is unknown; use one of {TREATMENTS}.")


def treat(
    kind: str,
    actions: Sequence[int],
    rewards: Sequence[float],
    cfg: BanditConfig,
    rng: np.random.Generator,
    max_partners: int = 1,
) -> list[Treatment]:
    """Edit a history so that the arm ``kind`` favours moves to another arm.

    Args:
        kind: ``"ucb"``, ``"greedy"`` or ``"frequent"``.
        actions, rewards: the clean history (length ``t >= 1``).
        cfg: the bandit family (number of arms, UCB rule).
        rng: draws the partner arms among the admissible ones.
        max_partners: at most this many edits, each with another partner arm.

    Returns:
        Up to ``max_partners`` :class:`Treatment` s, in a random order; none where the
        treatment does not apply: an empty history, a tie for the favoured arm, or no arm
        whose statistics differ from the favoured one's.
    """
    if kind not in TREATMENTS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {TREATMENTS}.")
    if max_partners < 1:
        raise ValueError(f"max_partners={max_partners!r} must be >= 1.")
    if len(actions) == 0:
        return []
    fav = favoured_arms(kind, actions, rewards, cfg)
    if fav.sum() != 1:
        return []
    x = int(np.argmax(fav))
    counts, sums = counts_and_sums(actions, rewards, cfg.n_arms)
    # Every statistic is a function of the per-arm (count, sum), so exchanging x and y
    # exchanges their verdicts: the unique favourite moves from x to y, no re-check needed.
    partners = [
        y for y in range(cfg.n_arms)
        if y != x and (counts[y] != counts[x] or sums[y] != sums[x])
    ]  # fmt: skip
    chosen = rng.permutation(partners)[:max_partners] if partners else []
    return [Treatment(kind, _swap(actions, x, int(y)), [float(r) for r in rewards], x, int(y))
            for y in chosen]  # fmt: skip


def _swap(actions: Sequence[int], x: int, y: int) -> list[int]:
    a = np.asarray(actions, dtype=np.int64)
    return np.where(a == x, y, np.where(a == y, x, a)).tolist()
