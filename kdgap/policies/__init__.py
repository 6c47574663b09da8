"""Reference policies and the loop that plays any policy on the bandits (no models here).

:mod:`~kdgap.policies.reference` holds the policy protocol and the UCB, greedy,
epsilon-greedy and random policies; :mod:`~kdgap.policies.play` plays a policy (or a text
agent, which satisfies the same protocol) and writes step records; ``play_together``
plays several groups of episodes in lockstep.
"""

from kdgap.policies.play import Group, history_of, play, play_together
from kdgap.policies.reference import (
    REFERENCE_POLICIES,
    Decisions,
    EpsilonGreedyPolicy,
    GreedyPolicy,
    HistoryBatch,
    Policy,
    RandomPolicy,
    UCBPolicy,
    make_policy,
)

__all__ = [
    "REFERENCE_POLICIES",
    "Decisions",
    "EpsilonGreedyPolicy",
    "GreedyPolicy",
    "Group",
    "HistoryBatch",
    "Policy",
    "RandomPolicy",
    "UCBPolicy",
    "history_of",
    "make_policy",
    "play",
    "play_together",
]
