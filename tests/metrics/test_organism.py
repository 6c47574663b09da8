"""The organisms' acceptance numbers speak summary.json's vocabulary, with the same values."""

import json

import pytest

from kdgap.metrics import (
    PAPER_KD_MATRIX,
    SEED_KD_MATRIX,
    action_matches,
    kd_matrix,
    kd_matrix_distance,
    organism_metrics,
)
from kdgap.metrics.organism import STEP_BUCKETS
from kdgap.organisms.registry import SHIPPED_DIR, list_organisms, shipped_names
from kdgap.records import StepRecord
from kdgap.report.behavior import behavior_metrics
from kdgap.report.summary import BEHAVIOR_KEYS


def rec(ep, t, action, *, rat=None, valid=True, cf=None, cf_arm=None):
    # Arm 0 is the UCB arm, 1 the greedy arm, 2 the most-pulled arm; a text step always.
    return StepRecord(
        episode=ep, step=t, n_arms=4, action=action, reward=0.0, regret=0.0, valid=valid,
        best_arm=0, ucb_arms=(0,), greedy_arms=(1,), frequent_arms=(2,), rationale_arm=rat,
        completion="...", cf_rationale_arm=cf_arm, cf_action=cf,
    )  # fmt: skip


@pytest.fixture
def records():
    # Two full episodes of 4 steps. Rationales: right (0), wrong (1, 3) or unparsed (None).
    return [
        rec(0, 0, 0, rat=0, cf=1, cf_arm=1),  # follows a right rationale; edit followed
        rec(0, 1, 1, rat=0, cf=1, cf_arm=2),  # greedy despite a right rationale; no flip
        rec(0, 2, 1, rat=1),  # follows a wrong rationale
        rec(0, 3, 2, rat=None, valid=False),  # unparsed rationale, invalid action
        rec(1, 0, 0, rat=0),
        rec(1, 1, 3, rat=3, cf=0, cf_arm=0),  # follows a wrong rationale; edit followed
        rec(1, 2, 1, rat=0),
        rec(1, 3, 0, rat=1),  # acts optimally against a wrong rationale
    ]


def test_keys_are_the_summary_vocabulary_plus_named_organism_extras(records):
    m = organism_metrics(records)
    shared = {"rationale_correct", "invalid_rate", "action_follows_rationale", "action_matches",
              "kd_matrix", "counterfactual_flip_rate"}  # fmt: skip
    extras = {"steps", "rationale_parsed", "rationale_correct_by_step",
              "action_follows_rationale_when_wrong", "counterfactual_follows_edit",
              "kd_matrix_distance_to_paper"}  # fmt: skip
    assert set(m) == shared | extras
    assert shared <= set(BEHAVIOR_KEYS)
    assert set(m["kd_matrix"]) == {"correct", "incorrect"}
    assert all(set(row) == {"optimal", "greedy", "other"} for row in m["kd_matrix"].values())
    assert set(m["action_matches"]) == {"rationale", "optimal", "greedy", "most_frequent"}
    assert set(m["rationale_correct_by_step"]) == set(STEP_BUCKETS)


def test_shared_keys_equal_what_kdgap_play_reports(records):
    m = organism_metrics(records)
    b = behavior_metrics(records)
    for key in ("rationale_correct", "invalid_rate", "action_follows_rationale",
                "action_matches", "kd_matrix", "counterfactual_flip_rate"):  # fmt: skip
        assert m[key] == b[key], key


def test_values_by_hand(records):
    m = organism_metrics(records)
    assert m["steps"] == 8
    assert m["rationale_parsed"] == pytest.approx(7 / 8)
    assert m["invalid_rate"] == pytest.approx(1 / 8)
    # 7 parsed rationales, 4 followed; 4 right (arm 0): steps (0,0), (0,1), (1,0), (1,2).
    assert m["action_follows_rationale"] == pytest.approx(4 / 7)
    assert m["rationale_correct"] == pytest.approx(4 / 8)  # unparsed counts as incorrect
    assert m["action_follows_rationale_when_wrong"] == pytest.approx(2 / 3)
    assert m["rationale_correct_by_step"] == {"0-19": pytest.approx(0.5), "20-34": None,
                                              "35+": None}  # fmt: skip
    assert m["action_matches"] == action_matches(records)
    assert m["action_matches"]["greedy"] == pytest.approx(3 / 8)
    assert m["counterfactual_flip_rate"] == pytest.approx(2 / 3)
    assert m["counterfactual_follows_edit"] == pytest.approx(2 / 3)
    kd = kd_matrix(records)
    assert m["kd_matrix"] == kd
    assert sum(v for row in kd.values() for v in row.values()) == pytest.approx(1.0)
    assert m["kd_matrix_distance_to_paper"] == kd_matrix_distance(kd, PAPER_KD_MATRIX)
    assert SEED_KD_MATRIX == PAPER_KD_MATRIX


def test_rationale_free_steps_and_no_records():
    plain = [StepRecord(episode=0, step=t, n_arms=2, action=0, reward=0.0, regret=0.0,
                        valid=True, best_arm=0, ucb_arms=(0,), greedy_arms=(0,),
                        frequent_arms=(0,)) for t in range(3)]  # fmt: skip
    m = organism_metrics(plain)
    assert m["kd_matrix"] is None and m["kd_matrix_distance_to_paper"] is None
    assert m["rationale_correct"] is None and m["counterfactual_flip_rate"] is None
    with pytest.raises(ValueError, match="empty"):
        organism_metrics([])


@pytest.mark.skipif(not shipped_names(), reason="no organisms shipped yet")
def test_shipped_metrics_files_use_the_same_vocabulary(records):
    ref = organism_metrics(records)
    for name in shipped_names():
        data = json.loads((SHIPPED_DIR / name / "metrics.json").read_text())
        m = data["metrics"]
        assert list(m) == list(ref), name
        for key in ("action_matches", "kd_matrix", "rationale_correct_by_step"):
            assert list(m[key]) == list(ref[key]), (name, key)
        cells = [v for row in m["kd_matrix"].values() for v in row.values()]
        assert sum(cells) == pytest.approx(1.0) and all(0 <= v <= 1 for v in cells)
        assert m["kd_matrix_distance_to_paper"] == kd_matrix_distance(
            m["kd_matrix"], PAPER_KD_MATRIX
        )
        for check in data["checks"]:
            value = m
            for part in check["metric"].split("."):
                value = value[part]
            assert value == check["value"], (name, check["metric"])
        assert data["pass"] == all(c["pass"] for c in data["checks"])
    rows = {row["name"]: row for row in list_organisms()}
    assert set(rows) == set(shipped_names())
    assert all(set(row["metrics"]) == set(ref) for row in rows.values())
    assert all(row["acceptance"]["pass"] for row in rows.values())
