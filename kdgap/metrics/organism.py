"""The organisms' acceptance numbers: a view of the metrics every model is measured with.

:func:`organism_metrics` turns the step records of an organism's play into the numbers
its ``metrics.json`` holds. Every key it shares with ``summary.json``'s ``behavior``
block (and ``kdgap play``) means the same thing there, computed by the same function of
:mod:`kdgap.metrics.knowing_doing` / :mod:`kdgap.metrics.behavior`: shares in [0, 1] and
the knowing-doing matrix of docs/science.md section 1 as nested shares ("optimal wins
ties"). The other keys are organism-only breakdowns, named as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdgap.metrics import knowing_doing as km
from kdgap.metrics.behavior import invalid_rate
from kdgap.records import StepRecord

#: The matrix the ``seed-calibrated`` organism is calibrated to: Gemma2 27B's (docs/science.md
#: section 1), rows correct / incorrect rationale, columns optimal / greedy / other, shares
#: of all steps (the same values as :data:`kdgap.metrics.knowing_doing.PAPER_KD_MATRIX`).
SEED_KD_MATRIX = km.PAPER_KD_MATRIX

#: Step buckets of ``rationale_correct_by_step``: name -> ``[first step, last step + 1)``.
STEP_BUCKETS: dict[str, tuple[int, int]] = {"0-19": (0, 20), "20-34": (20, 35), "35+": (35, 10_000)}


def _share(x: Sequence[bool]) -> float | None:
    return float(np.mean(x)) if len(x) else None


def organism_metrics(records: Sequence[StepRecord]) -> dict:
    """Acceptance numbers of an organism's run, in ``summary.json``'s vocabulary.

    Keys shared with ``summary.json``'s ``behavior`` block: ``rationale_correct``,
    ``invalid_rate``, ``action_follows_rationale``, ``action_matches`` (``rationale``,
    ``optimal``, ``greedy``, ``most_frequent``), ``kd_matrix`` (``{"correct"|"incorrect":
    {"optimal", "greedy", "other"}}``, shares of all text steps; None without rationales)
    and ``counterfactual_flip_rate``.

    Organism-only keys: ``steps`` (records scored), ``rationale_parsed`` (share of steps
    with a parsed rationale), ``rationale_correct_by_step`` (``rationale_correct`` over the
    steps of each :data:`STEP_BUCKETS` bucket), ``action_follows_rationale_when_wrong``
    (over steps whose parsed rationale is wrong), ``counterfactual_follows_edit`` (share of
    edited steps whose new action is the edited conclusion's arm) and
    ``kd_matrix_distance_to_paper`` (largest absolute cell difference from
    :data:`SEED_KD_MATRIX`, in share units). A value is None where its steps are absent.

    Raises:
        ValueError: ``records`` is empty.
    """
    recs = list(records)
    if not recs:
        raise ValueError("records is empty: play at least one step.")
    parsed = [r for r in recs if r.rationale_arm is not None]
    edited = [r for r in recs if r.cf_action is not None]
    kd = km.kd_matrix(recs)
    return {
        "steps": len(recs),
        "rationale_parsed": len(parsed) / len(recs),
        "rationale_correct": km.rationale_correct(recs),
        "rationale_correct_by_step": {
            name: km.rationale_correct([r for r in recs if lo <= r.step < hi])
            for name, (lo, hi) in STEP_BUCKETS.items()
        },
        "invalid_rate": invalid_rate(recs),
        "action_follows_rationale": km.action_follows_rationale(recs),
        "action_follows_rationale_when_wrong": km.action_follows_rationale(
            [r for r in parsed if not r.rationale_correct]
        ),
        "action_matches": km.action_matches(recs),
        "counterfactual_flip_rate": km.counterfactual_flip_rate(recs),
        "counterfactual_follows_edit": _share([r.cf_action == r.cf_rationale_arm for r in edited]),
        "kd_matrix": kd,
        "kd_matrix_distance_to_paper": (
            None if kd is None else km.kd_matrix_distance(kd, SEED_KD_MATRIX)
        ),
    }
