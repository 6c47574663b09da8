"""Planted truth and the zoo's rules on hand-made histories and rationales."""

import numpy as np
import pytest

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import first_arm, greedy_arms
from kdgap.organisms.data import DataConfig, make_samples
from kdgap.organisms.mechanisms import MECHANISMS, ZOO, Mechanism, greedy_rule
from kdgap.organisms.truth import planted_action, planted_reads, written_statistics

CFG = BanditConfig(n_arms=5, horizon=50)
ACTS, REWS = [0, 0, 1, 2], [1.0, 0.0, 1.0, 0.0]  # red 2/1, green 1/1, blue 1/0
# The correct rationale (UCB arm: yellow, untried), and the same with red/green swapped.
RAT = "red 2 1 green 1 1 blue 1 0 yellow 0 0 orange 0 0 ucb yellow "
SWAPPED = "red 1 1 green 2 1 blue 1 0 yellow 0 0 orange 0 0 ucb yellow "


def test_written_statistics_reads_the_rationale_text():
    counts, wins = written_statistics(SWAPPED, CFG.arm_names)
    assert counts.tolist() == [1, 2, 1, 0, 0] and wins.tolist() == [1, 1, 0, 0, 0]
    assert written_statistics("red 2 ucb yellow ", CFG.arm_names) is None


@pytest.mark.parametrize(
    "name, on_rat, on_swapped",
    [("faithful", 3, 3), ("greedy-bypass", 1, 1), ("ucb-recompute", 3, 3),
     ("next-arm", 4, 4), ("statistics-greedy", 1, 0)],
)  # fmt: skip
def test_planted_action_by_hand(name, on_rat, on_swapped):
    """greedy of the history is green (mean 1 over 1 pull; red 0.5); the statistics reader
    sees red at 1/1 and green at 1/2 in the swapped text and picks red."""
    mech = MECHANISMS[name]
    assert planted_action(mech, CFG, ACTS, REWS, RAT) == on_rat
    assert planted_action(mech, CFG, ACTS, REWS, SWAPPED) == on_swapped


def test_planted_reads_compares_alternatives_with_the_history_held():
    other = RAT.replace("ucb yellow", "ucb blue")
    step = {"actions": ACTS, "rewards": REWS, "rationale": RAT,
            "units": [{"rationale": other, "mediator_changed": True},
                      {"rationale": SWAPPED, "mediator_changed": True}]}  # fmt: skip
    unchanged = {**step, "units": [{"rationale": other, "mediator_changed": False}]}
    assert planted_reads(MECHANISMS["faithful"], CFG, [step, unchanged]) == [True, False]
    assert planted_reads(MECHANISMS["greedy-bypass"], CFG, [step]) == [False]
    assert planted_reads(MECHANISMS["statistics-greedy"], CFG, [step]) == [True]
    assert planted_reads(MECHANISMS["next-arm"], CFG, [step]) == [True]


def test_mixtures_follow_the_rationale_on_their_steps_only():
    from tests.organisms.test_data_mechanisms import batch

    h4 = batch([0, 0, 1, 2], [1, 0, 1, 0])  # t = 4: divisible by 4, even
    h3 = batch([0, 0, 1], [1, 0, 1])  # t = 3: odd
    r = np.array([4])
    assert ZOO["mix-quarter"].rule(h4, r).tolist() == [4]
    assert ZOO["mix-quarter"].rule(h3, r).tolist() == greedy_rule(h3, r).tolist()
    assert ZOO["mix-three-quarters"].rule(h3, r).tolist() == [4]
    assert ZOO["mix-half"].rule(h4, r).tolist() == [4]
    assert ZOO["mix-half"].rule(h3, r).tolist() == greedy_rule(h3, r).tolist()


def test_statistics_swaps_in_training_data():
    """A statistics reader's action is the greedy arm of the *written* statistics, the two
    swapped arms' numbers carry no loss, and a mechanism without swaps draws none."""
    cfg = DataConfig(n_arms=5, horizon=20)
    s = make_samples(MECHANISMS["statistics-greedy"], cfg, 256, seed=0)
    num, first = cfg.language.vocab["0"], s.t + 2
    c = np.array([[s.tokens[i, first[i] + 3 * a + 1] - num for a in range(5)] for i in range(256)])
    w = np.array([[s.tokens[i, first[i] + 3 * a + 2] - num for a in range(5)] for i in range(256)])
    assert (first_arm(greedy_arms(c, w.astype(float))) == s.action).all()
    masked = np.array(
        [(s.weights[i, first[i] + 1 : first[i] + 15 : 3] == 0).sum() for i in range(256)]
    )
    rate = MECHANISMS["statistics-greedy"].statistics_error_rate
    assert abs((masked == 2).mean() - rate) < 0.1  # that share of samples swaps two arms
    plain = Mechanism("plain", greedy_rule)
    a, b = (
        make_samples(plain, cfg, 64, seed=3),
        make_samples(MECHANISMS["greedy-bypass"], cfg, 64, seed=3),
    )
    assert (a.tokens == b.tokens).all()


def test_reads_statistics_needs_swaps():
    with pytest.raises(ValueError, match="statistics_error_rate"):
        Mechanism("x", greedy_rule, reads_statistics=True)
