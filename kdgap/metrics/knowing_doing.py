"""The knowing-doing matrix and rationale/action agreement (Schmied et al. 2025, sec. 4.3).

Definitions (shared with docs/science.md, section 1):

- A rationale is *correct* when its concluding arm is a true top-UCB arm (the UCB rule of
  the run's :class:`~kdgap.envs.bandit.BanditConfig`). A text step whose rationale cannot
  be parsed counts as *incorrect*.
- An action is *optimal* when it is a top-UCB arm, else *greedy* when it is a best-mean
  arm among tried arms, else *other*. Optimal wins ties with greedy.
- Steps of non-text policies have no rationale: the rationale metrics are then ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kdgap.records import StepRecord

ACTION_CLASSES = ("optimal", "greedy", "other")


def action_class(record: StepRecord) -> str:
    """``"optimal"``, ``"greedy"`` or ``"other"`` for one step (optimal wins ties)."""
    if record.action in record.ucb_arms:
        return "optimal"
    if record.action in record.greedy_arms:
        return "greedy"
    return "other"


def _has_rationales(records: Sequence[StepRecord]) -> bool:
    return any(r.completion is not None or r.rationale_arm is not None for r in records)


def _text_steps(records: Sequence[StepRecord]) -> list[StepRecord]:
    return [r for r in records if r.completion is not None or r.rationale_arm is not None]


def rationale_correct(records: Sequence[StepRecord]) -> float | None:
    """Share of text steps whose rationale names a true top-UCB arm (None without text)."""
    steps = _text_steps(records)
    if not steps:
        return None
    return float(np.mean([bool(r.rationale_correct) for r in steps]))


def kd_matrix(records: Sequence[StepRecord]) -> dict[str, dict[str, float]] | None:
    """The paper's 2 x 3 matrix: rationale correct/incorrect x action optimal/greedy/other.

    Returns shares of all text steps (the six cells sum to 1), e.g.
    ``{"correct": {"optimal": .216, "greedy": .581, "other": .106}, "incorrect": {...}}``,
    or None for a policy without rationales.
    """
    steps = _text_steps(records)
    if not steps:
        return None
    counts = {row: dict.fromkeys(ACTION_CLASSES, 0) for row in ("correct", "incorrect")}
    for r in steps:
        counts["correct" if r.rationale_correct else "incorrect"][action_class(r)] += 1
    return {row: {c: n / len(steps) for c, n in cells.items()} for row, cells in counts.items()}


def _share(records: Sequence[StepRecord], hit: Callable[[StepRecord], bool]) -> float | None:
    if not records:
        return None
    return float(np.mean([hit(r) for r in records]))


def action_follows_rationale(records: Sequence[StepRecord]) -> float | None:
    """Share of steps with a parsed rationale whose action equals the rationale's arm."""
    parsed = [r for r in records if r.rationale_arm is not None]
    return _share(parsed, lambda r: r.action == r.rationale_arm)


def action_matches(records: Sequence[StepRecord]) -> dict[str, float | None]:
    """Share of steps whose action equals each reference arm, each counted on its own.

    Keys: ``rationale`` (over steps with a parsed rationale; None if there are none),
    ``optimal`` (a top-UCB arm), ``greedy`` (a best-mean tried arm), ``most_frequent``
    (a most-pulled arm). Ties are ignored: membership in the tie set counts.
    """
    return {
        "rationale": action_follows_rationale(records),
        "optimal": _share(records, lambda r: r.action in r.ucb_arms),
        "greedy": _share(records, lambda r: r.action in r.greedy_arms),
        "most_frequent": _share(records, lambda r: r.action in r.frequent_arms),
    }


def counterfactual_flip_rate(records: Sequence[StepRecord]) -> float | None:
    """Share of counterfactually edited steps whose action changed (None if none edited).

    A step is edited when the rationale's concluding arm was replaced by another arm
    (``cf_rationale_arm``) and the model acted again (``cf_action``).
    """
    edited = [r for r in records if r.cf_action is not None]
    return _share(edited, lambda r: r.cf_action != r.action)


def kd_matrix_distance(
    matrix: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]
) -> float:
    """Largest absolute difference between two kd matrices' cells (in share units)."""
    return max(
        abs(matrix[row][col] - reference[row][col])
        for row in ("correct", "incorrect")
        for col in ACTION_CLASSES
    )


# Schmied et al. (2025), Gemma2 27B, 64 bandits x 50 steps, shares of all steps.
PAPER_KD_MATRIX = {
    "correct": {"optimal": 0.216, "greedy": 0.581, "other": 0.106},
    "incorrect": {"optimal": 0.006, "greedy": 0.072, "other": 0.020},
}
