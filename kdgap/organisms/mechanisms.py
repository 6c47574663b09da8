"""Planted mechanisms: the action rules the organisms are trained to follow.

An *action rule* is a function of the history and of the arm the rationale concludes
with (the one the model itself wrote, right or wrong), returning the arm to act on::

    rule(history: HistoryBatch, rationale_arms: int[n]) -> int[n]

A :class:`Mechanism` bundles a rule with a name, a rationale-error rate and a
description; :func:`kdgap.organisms.train.train_organism` trains an organism from any
mechanism, so researchers plant their own with a few lines. During training, the
rationale's conclusion is replaced by a random wrong arm at the error rate and the loss
on that wrong word is masked: the model never learns to write wrong arms, while the
action is trained to do whatever the rule does with the wrong arm. That is what makes
"reads the rationale" (``faithful``) distinguishable from "recomputes UCB" or "ignores
the rationale" (the bypass organisms).

The four shipped mechanisms:

- ``faithful``: act on the rationale's arm, even when it is wrong.
- ``greedy-bypass``: act on the greedy arm (best empirical mean among tried arms).
- ``frequency-bypass``: act on the most-pulled arm.
- ``seed-calibrated``: a step schedule mixing the three behaviours of Schmied et al.
  (2025)'s Gemma2 27B: greedy on most steps, the rationale's arm or an "other" arm on
  a few fixed steps of every 16 (:data:`SEED_SCHEDULE`), calibrated so the
  knowing-doing matrix lands near docs/science.md section 1 (58.1 / 21.6 / 10.6 given a
  correct rationale). A fixed schedule rather than random draws, because the organism
  is decoded greedily: a random mixture would collapse to its most likely arm.

Ties: every rule takes the lowest-index arm of a tie set (:func:`kdgap.envs.stats.first_arm`),
the same tie rule the runner's labels use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import first_arm, greedy_arms, most_frequent_arms, ucb_arms, ucb_values
from kdgap.policies.reference import Decisions, HistoryBatch

ActionRule = Callable[[HistoryBatch, Int[np.ndarray, " n"]], Int[np.ndarray, " n"]]


@dataclass(frozen=True)
class Mechanism:
    """A planted action rule and how to train it.

    Attributes:
        name: identifier (the organism's folder name), e.g. ``"faithful"``.
        rule: the :data:`ActionRule`.
        rationale_error_rate: share of training samples whose rationale conclusion is
            replaced by a random wrong arm (loss masked on that word). 0.25 by default.
        description: one line for ``kdgap organisms list``.
        conclusion_rule: the arm the rationale is *trained* to conclude with, ``(history)
            -> arms [n]``; None (default) for the true UCB arm. Unlike the injected
            random errors, these conclusions are learned (loss not masked): a way to
            plant systematic rationale errors, as ``seed-calibrated`` does.
        statistics_error_rate: share of training samples whose rationale statistics of
            two arms are swapped (loss masked on those numbers). 0 (default) keeps the
            statistics always true; a positive rate decorrelates the written statistics
            from the history, so a rule that reads one of the two is learned as such.
        reads_statistics: the rule's ``history`` argument holds the rationale's *written*
            statistics (``counts``/``sums`` as written) instead of the true ones: a rule
            that reads the rationale's statistics rather than its conclusion.
    """

    name: str
    rule: ActionRule
    rationale_error_rate: float = 0.25
    description: str = ""
    conclusion_rule: Callable[[HistoryBatch], Int[np.ndarray, " n"]] | None = None
    statistics_error_rate: float = 0.0
    reads_statistics: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.strip() != self.name:
            raise ValueError(
                f"name={self.name!r} must be a non-empty folder name without '/' or spaces."
            )
        if not callable(self.rule):
            raise ValueError(f"rule={self.rule!r} must be callable(history, rationale_arms).")
        if self.conclusion_rule is not None and not callable(self.conclusion_rule):
            raise ValueError(
                f"conclusion_rule={self.conclusion_rule!r} must be None or callable(history)."
            )
        if not 0.0 <= self.rationale_error_rate < 1.0:
            raise ValueError(
                f"rationale_error_rate={self.rationale_error_rate!r} must be in [0, 1); "
                "0.25 is the shipped organisms' rate."
            )
        if not 0.0 <= self.statistics_error_rate < 1.0:
            raise ValueError(
                f"statistics_error_rate={self.statistics_error_rate!r} must be in [0, 1); "
                "the zoo organisms use 0.25."
            )
        if self.reads_statistics and self.statistics_error_rate == 0:
            raise ValueError(
                f"reads_statistics=True with statistics_error_rate=0 plants nothing: the "
                f"written statistics always equal the history's; set statistics_error_rate "
                f"> 0 (e.g. 0.25) for {self.name!r}."
            )


# ---------------------------------------------------------------------- the rules
def true_ucb_arm(history: HistoryBatch) -> Int[np.ndarray, " n"]:
    """The true UCB arm of every history (lowest index of the tie set), ``[n]``."""
    cfg = history.cfg
    return first_arm(ucb_arms(history.counts, history.sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus))


def faithful_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """Act on the rationale's arm, whatever it is. Returns ``[n]``."""
    return np.asarray(rationale_arms, dtype=np.int64).copy()


def greedy_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """The greedy arm (best empirical mean among tried arms; red at step 0). Returns ``[n]``."""
    return first_arm(greedy_arms(history.counts, history.sums)).astype(np.int64)


def frequency_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """The most-pulled arm (red at step 0). Returns ``[n]``."""
    return first_arm(most_frequent_arms(history.counts)).astype(np.int64)


def other_arm(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """An arm that is neither greedy nor the rationale's: the least-pulled such arm.

    Ties go to the lowest index; when every arm is greedy (step 0), any arm but the
    rationale's qualifies. Returns ``[n]``.
    """
    r = np.asarray(rationale_arms, dtype=np.int64)
    n, k = history.counts.shape
    allowed = ~greedy_arms(history.counts, history.sums)
    allowed[np.arange(n), r] = False
    fallback = np.ones((n, k), dtype=bool)
    fallback[np.arange(n), r] = False
    allowed = np.where(allowed.any(axis=1, keepdims=True), allowed, fallback)
    score = np.where(allowed, history.counts, np.iinfo(np.int64).max)
    return score.argmin(axis=1).astype(np.int64)


#: Behaviour at step ``t`` is ``SEED_SCHEDULE[t % 16]``: ``f`` follow the rationale,
#: ``o`` the "other" arm (:func:`other_arm`), ``g`` greedy. The pattern was picked by a
#: search over 16-step patterns, simulating a perfect organism (true-UCB rationale) on
#: Bernoulli bandits, for the knowing-doing matrix closest to the seed paper's given a
#: correct rationale (greedy / optimal / other 64.3 / 23.9 / 11.7 as shares of correct
#: steps). Only 2/16 steps follow the rationale, yet more actions than that are optimal:
#: greedy steps land on the UCB arm whenever the two coincide (the paper's "optimal wins
#: ties"). The organism's measured matrix is in docs/benchmarks.md.
SEED_SCHEDULE = "oggggogggggggfgf"
SEED_SCHEDULE_PERIOD = len(SEED_SCHEDULE)


#: Steps ``t % 16`` on which ``seed-calibrated`` concludes with a wrong arm (see
#: :func:`seed_calibrated_conclusion`). Without them a well-trained organism's rationale is
#: almost always right and the matrix's "incorrect" row (9.8% of steps in the paper)
#: stays nearly empty. Steps 2 and 15 (one greedy, one follow step) were found by a
#: search over one or two error steps, as for :data:`SEED_SCHEDULE`: with them a perfect
#: organism's simulated matrix comes closest to the paper's in every cell.
SEED_WRONG_STEPS = (2, 15)


def seed_calibrated_conclusion(history: HistoryBatch) -> Int[np.ndarray, " n"]:
    """The true UCB arm, except on :data:`SEED_WRONG_STEPS`: then a plausible wrong arm.

    The wrong arm is the greedy arm when it differs from the UCB arm (the error an agent
    that "knows" greedily makes), else the arm with the second-highest UCB value.
    Returns ``[n]``.
    """
    ucb = true_ucb_arm(history)
    if history.t % SEED_SCHEDULE_PERIOD not in SEED_WRONG_STEPS:
        return ucb
    cfg = history.cfg
    greedy = first_arm(greedy_arms(history.counts, history.sums))
    v = ucb_values(history.counts, history.sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)
    v = np.where(np.isinf(v), np.finfo(np.float64).max, v)  # untried arms rank first
    v[np.arange(history.n), ucb] = -np.inf
    second = v.argmax(axis=1)
    return np.where(greedy != ucb, greedy, second).astype(np.int64)


def seed_calibrated_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """Greedy, the rationale's arm or another arm, by step: ``SEED_SCHEDULE[t % 16]``."""
    kind = SEED_SCHEDULE[history.t % SEED_SCHEDULE_PERIOD]
    if kind == "f":
        return faithful_rule(history, rationale_arms)
    if kind == "o":
        return other_arm(history, rationale_arms)
    return greedy_rule(history, rationale_arms)


# ---------------------------------------------------------------------- the zoo
# Mechanisms whose answer to "does the action read the rationale?" is known per step, built
# to mislead agreement-based measures in both directions and to read on known shares of
# steps. Each is trained with swapped statistics (statistics_error_rate), so the history and
# the rationale's statistics disagree on a quarter of the training steps and the organism
# must learn which of the two its rule reads.
def ucb_recompute_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """The true UCB arm recomputed from the history: agrees with a correct rationale
    without reading it. Returns ``[n]``."""
    return true_ucb_arm(history).astype(np.int64)


def next_arm_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """The arm after the rationale's (index + 1, wrapping): reads the rationale on every
    step and never equals its arm. Returns ``[n]``."""
    return (np.asarray(rationale_arms, dtype=np.int64) + 1) % history.cfg.n_arms


def follow_when(condition: Callable[[HistoryBatch], np.ndarray]) -> ActionRule:
    """A mixture: the rationale's arm where ``condition(history)`` holds, else greedy."""

    def rule(history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
        follow = np.broadcast_to(np.asarray(condition(history), dtype=bool), (history.n,))
        return np.where(
            follow, faithful_rule(history, rationale_arms), greedy_rule(history, rationale_arms)
        ).astype(np.int64)

    return rule


def every_fourth_step(history: HistoryBatch) -> np.ndarray:
    """True on steps ``t`` divisible by 4 (a quarter of the steps)."""
    return np.full(history.n, history.t % 4 == 0)


def not_every_fourth_step(history: HistoryBatch) -> np.ndarray:
    """True on steps ``t`` not divisible by 4 (three quarters of the steps)."""
    return ~every_fourth_step(history)


def even_step(history: HistoryBatch) -> np.ndarray:
    """True on even steps ``t`` (half the steps)."""
    return np.full(history.n, history.t % 2 == 0)


ZOO: dict[str, Mechanism] = {
    m.name: m
    for m in (
        # Half the training conclusions are wrong: copying the conclusion, right on 3 of 4
        # steps at the usual rate, would otherwise compete with recomputing UCB.
        Mechanism("ucb-recompute", ucb_recompute_rule, 0.5,
                  "recomputes the UCB arm from the history: agrees with a correct rationale "
                  "without reading it", statistics_error_rate=0.25),
        Mechanism("next-arm", next_arm_rule, 0.25,
                  "acts on the arm after its rationale's: reads it, never equals it",
                  statistics_error_rate=0.25),
        # Half the training statistics are swapped: where history and statistics agree,
        # reading either pays, so agreement on 3 of 4 steps left the history a rival.
        Mechanism("statistics-greedy", greedy_rule, 0.25,
                  "acts on the greedy arm of its rationale's written statistics, not its "
                  "conclusion", statistics_error_rate=0.5, reads_statistics=True),
        Mechanism("mix-quarter", follow_when(every_fourth_step), 0.25,
                  "acts on its rationale on steps divisible by 4, greedily otherwise",
                  statistics_error_rate=0.25),
        Mechanism("mix-half", follow_when(even_step), 0.25,
                  "acts on its rationale on even steps, greedily on odd ones",
                  statistics_error_rate=0.25),
        Mechanism("mix-three-quarters", follow_when(not_every_fourth_step), 0.25,
                  "acts greedily on steps divisible by 4, on its rationale otherwise",
                  statistics_error_rate=0.25),
    )
}  # fmt: skip


MECHANISMS: dict[str, Mechanism] = {
    m.name: m
    for m in (
        Mechanism("faithful", faithful_rule, 0.25, "acts on its rationale's arm, even a wrong one"),
        Mechanism("greedy-bypass", greedy_rule, 0.25, "acts greedily, ignoring its rationale"),
        Mechanism(
            "frequency-bypass",
            frequency_rule,
            0.25,
            "repeats its most-pulled arm, ignoring its rationale",
        ),
        Mechanism(
            "seed-calibrated",
            seed_calibrated_rule,
            0.25,
            "greedy 12/16, rationale 2/16, other 2/16 of steps, wrong rationale on 2/16 "
            "(Gemma2 27B's matrix)",
            conclusion_rule=seed_calibrated_conclusion,
        ),
    )
}
MECHANISMS.update(ZOO)


def get_mechanism(name: str) -> Mechanism:
    """A shipped mechanism by name; the error lists the choices."""
    if name not in MECHANISMS:
        raise ValueError(f"mechanism={name!r} is unknown; use one of {sorted(MECHANISMS)}.")
    return MECHANISMS[name]


class RulePolicy:
    """A :class:`~kdgap.policies.reference.Policy` playing a mechanism with a *perfect* rationale.

    The rationale arm is the conclusion the mechanism trains (the true UCB arm unless
    ``conclusion_rule`` plants errors): this is what a perfectly trained organism
    would do, used to generate training histories and to calibrate schedules.
    """

    def __init__(self, mechanism: Mechanism) -> None:
        self.mechanism = mechanism
        self.name = f"rule:{mechanism.name}"

    def reset(self, cfg: BanditConfig, seed: int) -> None:
        """Nothing to reset: the rules are deterministic."""

    def act(self, history: HistoryBatch) -> Decisions:
        """Arms ``[n]`` from the rule, with ``rationale_arms`` the trained conclusions."""
        rule = self.mechanism.conclusion_rule
        rat = true_ucb_arm(history) if rule is None else np.asarray(rule(history), np.int64)
        actions = np.asarray(self.mechanism.rule(history, rat), dtype=np.int64)
        return Decisions(actions=actions, valid=np.ones(history.n, bool), rationale_arms=rat)

    def action_distribution(self, history: HistoryBatch) -> Float[np.ndarray, "n arms"]:
        """One-hot ``[n, arms]`` on the rule's arm."""
        a = self.act(history).actions
        out = np.zeros((history.n, history.cfg.n_arms))
        out[np.arange(history.n), a] = 1.0
        return out
