"""Reference policies (UCB, greedy, epsilon-greedy, random) and the policy protocol.

Every policy, a reference one here or a language-model agent in :mod:`kdgap.agent`,
implements :class:`Policy`: ``reset`` once per batch of episodes, ``act`` once per step on
a :class:`HistoryBatch`, and ``action_distribution`` for the frequency-bias protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from jaxtyping import Bool, Float, Int

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import ucb_arms


@dataclass
class HistoryBatch:
    """The histories of ``n`` episodes at the same step ``t``.

    Attributes:
        cfg: the bandit family (arm names, UCB rule).
        actions: ``[n, t]`` arms pulled so far.
        rewards: ``[n, t]`` rewards received so far.
        counts: ``[n, arms]`` pulls per arm.
        sums: ``[n, arms]`` reward sums per arm.
        episodes: ``[n]`` episode ids (for per-episode seeding of stochastic policies).
    """

    cfg: BanditConfig
    actions: Int[np.ndarray, "n t"]
    rewards: Float[np.ndarray, "n t"]
    counts: Int[np.ndarray, "n arms"]
    sums: Float[np.ndarray, "n arms"]
    episodes: Int[np.ndarray, " n"]

    @property
    def t(self) -> int:
        """Number of steps already taken."""
        return int(self.actions.shape[1])

    @property
    def n(self) -> int:
        """Number of episodes in the batch."""
        return int(self.actions.shape[0])


@dataclass
class Decisions:
    """What a policy did at one step for ``n`` episodes.

    Attributes:
        actions: ``[n]`` arms to execute (already replaced by a random arm where invalid).
        valid: ``[n]`` False where the model produced no valid action.
        rationale_arms: ``[n]`` the rationale's concluding arm, -1 where none.
        action_probs: ``[n, arms]`` distribution over arms, or None.
        prompts, completions: texts, or None for non-text policies.
    """

    actions: Int[np.ndarray, " n"]
    valid: Bool[np.ndarray, " n"]
    rationale_arms: Int[np.ndarray, " n"]
    action_probs: Float[np.ndarray, "n arms"] | None = None
    prompts: list[str] | None = None
    completions: list[str] | None = None
    extras: dict = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """Anything the runner can play."""

    name: str

    def reset(self, cfg: BanditConfig, seed: int) -> None:
        """Prepare for a new run of episodes (seed fixes any randomness)."""

    def act(self, history: HistoryBatch) -> Decisions:
        """Choose one arm per episode."""

    def action_distribution(self, history: HistoryBatch) -> Float[np.ndarray, "n arms"]:
        """Probability of each arm (used by the frequency-bias protocol)."""


def _uniform_over(mask: Bool[np.ndarray, "n arms"]) -> Float[np.ndarray, "n arms"]:
    m = mask.astype(np.float64)
    return m / m.sum(axis=-1, keepdims=True)


class _MaskPolicy:
    """A policy that picks uniformly among a tie set of arms; subclasses give the set."""

    name = "mask"

    def __init__(self) -> None:
        self._rng: np.random.Generator | None = None
        self._seed = 0

    def reset(self, cfg: BanditConfig, seed: int) -> None:
        """Remember the seed: decisions are seeded by (seed, episode, step)."""
        self._seed = int(seed)

    def _rng_for(self, history: HistoryBatch) -> list[np.random.Generator]:
        # One generator per (seed, episode, step): decisions do not depend on batch layout.
        return [np.random.default_rng([self._seed, int(e), history.t]) for e in history.episodes]

    def _mask(self, history: HistoryBatch) -> Bool[np.ndarray, "n arms"]:
        raise NotImplementedError

    def action_distribution(self, history: HistoryBatch) -> Float[np.ndarray, "n arms"]:
        """Uniform over the policy's tie set of arms."""
        return _uniform_over(self._mask(history))

    def act(self, history: HistoryBatch) -> Decisions:
        """One arm per episode, drawn from :meth:`action_distribution`."""
        probs = self.action_distribution(history)
        rngs = self._rng_for(history)
        actions = np.array(
            [rng.choice(probs.shape[1], p=p) for rng, p in zip(rngs, probs)], dtype=np.int64
        )
        n = history.n
        return Decisions(
            actions=actions,
            valid=np.ones(n, dtype=bool),
            rationale_arms=np.full(n, -1, dtype=np.int64),
            action_probs=probs,
        )


class UCBPolicy(_MaskPolicy):
    """UCB: try every arm once, then the highest ``mean + bonus`` (rule from the config).

    Ties (several untried arms at the start) go to the lowest index, the textbook
    "try arms in order" schedule, so UCB's coverage is 1.0 after ``n_arms`` steps.
    """

    name = "ucb"

    def _mask(self, history: HistoryBatch) -> Bool[np.ndarray, "n arms"]:
        mask = ucb_arms(history.counts, history.sums, c=history.cfg.ucb_c,
                        bonus=history.cfg.ucb_bonus)  # fmt: skip
        first = np.zeros_like(mask)
        first[np.arange(len(mask)), mask.argmax(axis=1)] = True
        return first


class GreedyPolicy(_MaskPolicy):
    """Pure greedy with action values initialised to ``initial_value`` (Sutton & Barto 2.2).

    The value of an untried arm is ``initial_value`` (default 0.0, so with rewards in
    [0, 1] an arm that ever paid beats every untried arm); ties are broken uniformly at
    random. It never explores on purpose, which is what makes it the "greedy" baseline.
    """

    name = "greedy"

    def __init__(self, *, initial_value: float = 0.0) -> None:
        super().__init__()
        self.initial_value = initial_value

    def _mask(self, history: HistoryBatch) -> Bool[np.ndarray, "n arms"]:
        counts = history.counts
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(counts > 0, history.sums / counts, self.initial_value)
        return np.isclose(q, q.max(axis=1, keepdims=True), rtol=0, atol=1e-12)


class EpsilonGreedyPolicy(GreedyPolicy):
    """Greedy with probability ``1 - epsilon``, a uniformly random arm otherwise."""

    name = "epsilon-greedy"

    def __init__(self, *, epsilon: float = 0.1, initial_value: float = 0.0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon={epsilon!r} must be in [0, 1].")
        super().__init__(initial_value=initial_value)
        self.epsilon = epsilon

    def action_distribution(self, history: HistoryBatch) -> Float[np.ndarray, "n arms"]:
        """Greedy's distribution mixed with ``epsilon`` of the uniform one."""
        k = history.cfg.n_arms
        return (1 - self.epsilon) * super().action_distribution(history) + self.epsilon / k


class RandomPolicy(_MaskPolicy):
    """Uniformly random arms."""

    name = "random"

    def _mask(self, history: HistoryBatch) -> Bool[np.ndarray, "n arms"]:
        return np.ones((history.n, history.cfg.n_arms), dtype=bool)


REFERENCE_POLICIES = {
    "ucb": UCBPolicy,
    "greedy": GreedyPolicy,
    "epsilon-greedy": EpsilonGreedyPolicy,
    "random": RandomPolicy,
}


def make_policy(name: str, **kwargs: float) -> Policy:
    """Build a reference policy by name (``ucb``, ``greedy``, ``epsilon-greedy``, ``random``)."""
    if name not in REFERENCE_POLICIES:
        raise ValueError(
            f"policy={name!r} is unknown; use one of {sorted(REFERENCE_POLICIES)} "
            "or pass --model for a language model."
        )
    return REFERENCE_POLICIES[name](**kwargs)
