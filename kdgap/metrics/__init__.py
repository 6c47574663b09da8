"""Behaviour metrics: pure functions over step records (no models here).

:mod:`~kdgap.metrics.behavior` (coverage, regret, suffix failures, validity),
:mod:`~kdgap.metrics.knowing_doing` (the knowing-doing matrix, rationale/action agreement),
:mod:`~kdgap.metrics.frequency_bias` (the frequency-bias protocol) and
:mod:`~kdgap.metrics.organism` (the organisms' acceptance numbers, a view of the same
vocabulary).
"""

from kdgap.metrics.behavior import (
    coverage_curve,
    invalid_rate,
    regret_curve,
    suffix_failure_curve,
    suffix_failure_rate,
)
from kdgap.metrics.frequency_bias import build_histories, class_masses, entropy, summarise
from kdgap.metrics.knowing_doing import (
    PAPER_KD_MATRIX,
    action_class,
    action_follows_rationale,
    action_matches,
    counterfactual_flip_rate,
    kd_matrix,
    kd_matrix_distance,
    rationale_correct,
)
from kdgap.metrics.organism import SEED_KD_MATRIX, organism_metrics

__all__ = [
    "PAPER_KD_MATRIX",
    "SEED_KD_MATRIX",
    "action_class",
    "action_follows_rationale",
    "action_matches",
    "build_histories",
    "class_masses",
    "counterfactual_flip_rate",
    "coverage_curve",
    "entropy",
    "invalid_rate",
    "kd_matrix",
    "kd_matrix_distance",
    "organism_metrics",
    "rationale_correct",
    "regret_curve",
    "suffix_failure_curve",
    "suffix_failure_rate",
    "summarise",
]
