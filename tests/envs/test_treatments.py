"""History edits (treatments) on hand-made histories: which arm each statistic favours moves."""

import numpy as np
import pytest

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums
from kdgap.envs.treatments import TREATMENTS, favoured_arms, treat

CFG = BanditConfig(n_arms=4)
# red: 3 pulls 1 win; green: 1 pull 1 win; blue: 2 pulls 0 wins; yellow: 2 pulls 1 win.
ACTS = [0, 0, 0, 1, 2, 2, 3, 3]
REWS = [1, 0, 0, 1, 0, 0, 1, 0]


def test_favoured_arms_by_hand():
    assert favoured_arms("greedy", ACTS, REWS, CFG).tolist() == [False, True, False, False]
    assert favoured_arms("frequent", ACTS, REWS, CFG).tolist() == [True, False, False, False]
    # UCB with c=0.5 at t=8: green (mean 1, one pull) has the highest bound.
    assert favoured_arms("ucb", ACTS, REWS, CFG).tolist() == [False, True, False, False]


@pytest.mark.parametrize("kind", TREATMENTS)
def test_treatment_moves_the_favoured_arm_and_keeps_everything_else(kind):
    edits = treat(kind, ACTS, REWS, CFG, np.random.default_rng(0), max_partners=3)
    assert edits, "every treatment applies to this history"
    before = counts_and_sums(ACTS, REWS, 4)
    for e in edits:
        assert e.kind == kind and e.rewards == [float(r) for r in REWS]
        assert favoured_arms(kind, ACTS, REWS, CFG)[e.arm_from]
        after = favoured_arms(kind, e.actions, e.rewards, CFG)
        assert after.sum() == 1 and after[e.arm_to] and e.arm_to != e.arm_from
        # Statistics are those of the clean history with the two arms exchanged.
        counts, sums = counts_and_sums(e.actions, e.rewards, 4)
        perm = np.arange(4)
        perm[[e.arm_from, e.arm_to]] = [e.arm_to, e.arm_from]
        assert counts.tolist() == before[0][perm].tolist()
        assert sums.tolist() == before[1][perm].tolist()
    assert len({e.arm_to for e in edits}) == len(edits)  # distinct partners


def test_no_treatment_for_ties_or_empty_histories():
    # Two arms tie for greedy (both mean 1): moving "the" greedy arm is undefined.
    assert treat("greedy", [0, 1], [1, 1], CFG, np.random.default_rng(0)) == []
    assert treat("ucb", [], [], CFG, np.random.default_rng(0)) == []
    # Partners with the favoured arm's own statistics change nothing: none qualifies.
    assert treat("frequent", [0, 0, 1, 1, 2], [1, 0, 1, 0, 0], CFG, np.random.default_rng(0)) == []


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="kind='best'"):
        treat("best", ACTS, REWS, CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_partners=0"):
        treat("ucb", ACTS, REWS, CFG, np.random.default_rng(0), max_partners=0)
