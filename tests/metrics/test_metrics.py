"""Metric functions against small hand-computed episodes, tie rules included."""

import numpy as np
import pytest

from kdgap.metrics import (
    PAPER_KD_MATRIX,
    action_class,
    action_matches,
    counterfactual_flip_rate,
    coverage_curve,
    invalid_rate,
    kd_matrix,
    kd_matrix_distance,
    rationale_correct,
    regret_curve,
    suffix_failure_curve,
    suffix_failure_rate,
)
from kdgap.records import StepRecord, read_records, write_records


def rec(ep, t, action, *, ucb=(0,), greedy=(1,), freq=(2,), rat=None, valid=True, regret=0.0,
        best=0, text=False, cf=None):  # fmt: skip
    return StepRecord(
        episode=ep, step=t, n_arms=4, action=action, reward=0.0, regret=regret, valid=valid,
        best_arm=best, ucb_arms=ucb, greedy_arms=greedy, frequent_arms=freq,
        rationale_arm=rat, completion="..." if text else None,
        cf_rationale_arm=None if cf is None else (action + 1) % 4, cf_action=cf,
    )  # fmt: skip


def test_coverage_regret_suffix_by_hand():
    # Episode 0 pulls 0,0,1,2 ; episode 1 pulls 3,3,3,3. Best arm is 0 in both.
    e0 = [rec(0, t, a, regret=r) for t, (a, r) in enumerate([(0, 0), (0, 0), (1, 0.5), (2, 0.25)])]
    e1 = [rec(1, t, 3, regret=1.0) for t in range(4)]
    records = e1 + e0  # order must not matter
    # Arms seen: e0 {0},{0},{0,1},{0,1,2}; e1 {3} throughout.
    np.testing.assert_allclose(
        coverage_curve(records), [0.25, 0.25, (2 / 4 + 1 / 4) / 2, (3 / 4 + 1 / 4) / 2]
    )  # noqa: E501
    np.testing.assert_allclose(regret_curve(records), [0.5, 1.0, 1.75, 2.375])
    # Episode 0 last pulls the best arm at t=1: fails from t=2 on; episode 1 always fails.
    np.testing.assert_allclose(suffix_failure_curve(records), [0.5, 0.5, 1.0, 1.0])
    assert suffix_failure_rate(records) == 1.0  # t = T // 2 = 2
    assert suffix_failure_rate(records, t=0) == 0.5
    with pytest.raises(ValueError, match="t="):
        suffix_failure_rate(records, t=9)


def test_action_class_tie_rules():
    assert action_class(rec(0, 0, 0, ucb=(0,), greedy=(0,))) == "optimal"  # optimal wins
    assert action_class(rec(0, 0, 1, ucb=(0,), greedy=(1, 3))) == "greedy"
    assert action_class(rec(0, 0, 3, ucb=(0, 3), greedy=(3,))) == "optimal"
    assert action_class(rec(0, 0, 2, ucb=(0,), greedy=(1,))) == "other"


def test_kd_matrix_hand_computed():
    steps = [
        rec(0, 0, 0, rat=0, text=True),  # correct, optimal
        rec(0, 1, 1, rat=0, text=True),  # correct, greedy
        rec(0, 2, 1, rat=0, text=True),  # correct, greedy
        rec(0, 3, 2, rat=3, text=True),  # incorrect, other
        rec(0, 4, 1, rat=None, text=True),  # unparsable rationale -> incorrect, greedy
    ]
    m = kd_matrix(steps)
    assert m["correct"] == {"optimal": 0.2, "greedy": 0.4, "other": 0.0}
    assert m["incorrect"] == {"optimal": 0.0, "greedy": 0.2, "other": 0.2}
    assert rationale_correct(steps) == pytest.approx(0.6)
    am = action_matches(steps)
    assert am["rationale"] == pytest.approx(1 / 4)  # over the 4 parsed rationales
    assert am["optimal"] == pytest.approx(0.2)
    assert am["greedy"] == pytest.approx(0.6)
    assert am["most_frequent"] == pytest.approx(0.2)
    assert kd_matrix_distance(m, m) == 0.0
    assert sum(sum(r.values()) for r in PAPER_KD_MATRIX.values()) == pytest.approx(1.0, abs=2e-3)


def test_ties_counted_on_their_own_in_action_matches():
    s = [rec(0, 0, 1, ucb=(0, 1), greedy=(1,), freq=(1, 2))]
    assert action_matches(s) == {"rationale": None, "optimal": 1.0, "greedy": 1.0,
                                 "most_frequent": 1.0}  # fmt: skip


def test_no_rationale_policy_gives_none_and_invalid_rate():
    s = [rec(0, 0, 1, valid=False), rec(0, 1, 1)]
    assert kd_matrix(s) is None and rationale_correct(s) is None
    assert invalid_rate(s) == 0.5
    assert counterfactual_flip_rate(s) is None


def test_counterfactual_flip_rate():
    s = [rec(0, 0, 1, cf=2), rec(0, 1, 1, cf=1), rec(0, 2, 1, cf=0), rec(0, 3, 1)]
    assert counterfactual_flip_rate(s) == pytest.approx(2 / 3)


def test_records_roundtrip(tmp_path):
    s = [rec(0, 0, 1, rat=2, text=True, cf=3), rec(0, 1, 2)]
    write_records(tmp_path / "r.jsonl", s)
    assert read_records(tmp_path / "r.jsonl") == s


def test_ragged_episodes_rejected():
    with pytest.raises(ValueError, match="lengths"):
        coverage_curve([rec(0, 0, 1), rec(1, 0, 1), rec(1, 1, 1)])
    with pytest.raises(ValueError, match="empty"):
        coverage_curve([])
