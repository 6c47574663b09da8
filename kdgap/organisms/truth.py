"""Planted truth: what an organism's rule says about each analysed step.

The mediation decomposition (:mod:`kdgap.report.decomposition`) asks of every analysed step
whether the *model's* action changes when its rationale is replaced by the one it writes
under an edited history, the history held. For an organism the same question has a known
answer: apply the mechanism's rule to the clean history with the clean rationale and with
each alternative rationale, and compare. :func:`planted_reads` does that on the very
texts the decomposition analysed, so measured and planted shares are computed on the same
steps; :func:`planted_action` is the rule applied to one (history, rationale text).

A rule reads the rationale's conclusion (the arm after ``ucb``) and, for mechanisms with
``reads_statistics``, the statistics the rationale writes (``<arm> <pulls> <wins>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums
from kdgap.organisms.language import THINK
from kdgap.organisms.mechanisms import Mechanism
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.reference import HistoryBatch

_FMT = OrganismFormat()


def written_statistics(
    rationale: str, arm_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(counts [arms], wins [arms])`` as a rationale writes them, or None when an arm's
    ``<name> <pulls> <wins>`` entry is missing or not two numbers."""
    text = f"{THINK} {rationale}"
    spans = _FMT.site_spans(text)
    counts, wins = np.zeros(len(arm_names), np.int64), np.zeros(len(arm_names), np.float64)
    for i, name in enumerate(arm_names):
        span = spans.get(f"rationale.arm[{name}]")
        if span is None:
            return None
        words = text[span[0] : span[1]].split()
        if len(words) != 3 or not (words[1].isdigit() and words[2].isdigit()):
            return None
        counts[i], wins[i] = int(words[1]), float(words[2])
    return counts, wins


def planted_action(
    mechanism: Mechanism,
    cfg: BanditConfig,
    actions: Sequence[int],
    rewards: Sequence[float],
    rationale: str,
) -> int | None:
    """The arm ``mechanism``'s rule chooses after this history and rationale text, or None
    when the rationale has no conclusion (or, for a statistics reader, no statistics)."""
    names = tuple(cfg.arm_names)
    conclusion = _FMT.parse_rationale(rationale, names)
    if conclusion is None:
        return None
    counts, sums = counts_and_sums(actions, rewards, cfg.n_arms)
    if mechanism.reads_statistics:
        written = written_statistics(rationale, names)
        if written is None:
            return None
        counts, sums = written
    history = HistoryBatch(
        cfg=cfg,
        actions=np.asarray(actions, dtype=np.int64).reshape(1, -1),
        rewards=np.asarray(rewards, dtype=np.float64).reshape(1, -1),
        counts=np.asarray(counts, dtype=np.int64)[None],
        sums=np.asarray(sums, dtype=np.float64)[None],
        episodes=np.zeros(1, dtype=np.int64),
    )
    return int(np.asarray(mechanism.rule(history, np.array([conclusion])))[0])


def planted_reads(mechanism: Mechanism, cfg: BanditConfig, steps: Sequence[dict]) -> list[bool]:
    """Per analysed step: does the rule's arm change when the rationale is replaced by one
    of the step's alternatives, the history held?

    Args:
        mechanism: the organism's planted mechanism.
        cfg: the bandit family of the analysis.
        steps: the decomposition's ``steps`` (``actions``, ``rewards``, ``rationale`` and
            ``units`` with each alternative ``rationale`` and ``mediator_changed``); only
            units whose rationale changed count, as in the measurement.

    Returns:
        ``[step]`` booleans, in the order of ``steps``.
    """
    out = []
    for step in steps:
        base = planted_action(mechanism, cfg, step["actions"], step["rewards"], step["rationale"])
        alts = [
            planted_action(mechanism, cfg, step["actions"], step["rewards"], u["rationale"])
            for u in step["units"]
            if u["mediator_changed"]
        ]
        out.append(any(a is not None and a != base for a in alts))
    return out
