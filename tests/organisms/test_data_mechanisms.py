"""Action rules and the data generator's labels on hand-made histories."""

import numpy as np
import pytest

from kdgap.envs.bandit import BanditConfig
from kdgap.metrics import PAPER_KD_MATRIX, kd_matrix, kd_matrix_distance, rationale_correct
from kdgap.organisms.data import DataConfig, make_samples
from kdgap.organisms.mechanisms import (
    MECHANISMS,
    SEED_SCHEDULE,
    SEED_WRONG_STEPS,
    Mechanism,
    RulePolicy,
    frequency_rule,
    greedy_rule,
    other_arm,
    seed_calibrated_rule,
    true_ucb_arm,
)
from kdgap.policies.play import play
from kdgap.policies.reference import HistoryBatch

CFG = BanditConfig()


def batch(actions, rewards):
    """One-episode HistoryBatch from a hand-made history."""
    a = np.array([actions], dtype=np.int64).reshape(1, -1)
    r = np.array([rewards], dtype=np.float64).reshape(1, -1)
    counts = np.bincount(a[0], minlength=5)[None]
    sums = np.bincount(a[0], weights=r[0], minlength=5)[None]
    return HistoryBatch(CFG, a, r, counts, sums, np.array([0]))


def test_rules_on_a_hand_made_history():
    # red 3 pulls 1 win, green 1 pull 1 win, blue 2 pulls 0 wins; yellow/orange untried
    h = batch([0, 0, 0, 1, 2, 2], [1, 0, 0, 1, 0, 0])
    assert true_ucb_arm(h).tolist() == [3]  # untried arms first, lowest index
    assert greedy_rule(h, np.array([3])).tolist() == [1]  # green: mean 1.0
    assert frequency_rule(h, np.array([3])).tolist() == [0]  # red: 3 pulls
    assert MECHANISMS["faithful"].rule(h, np.array([4])).tolist() == [4]
    # other: not greedy (green), not the rationale (yellow): least pulled of orange/blue/red
    assert other_arm(h, np.array([3])).tolist() == [4]


def test_ucb_arm_with_every_arm_tried():
    # t=10; red 4/2, green 2/2, blue 2/0, yellow 1/0, orange 1/1
    h = batch([0, 0, 0, 0, 1, 1, 2, 2, 3, 4], [1, 1, 0, 0, 1, 1, 0, 0, 0, 1])
    # UCB = mean + 0.5 sqrt(ln 10 / N): orange 1 + 0.76 beats green 1 + 0.54
    assert true_ucb_arm(h).tolist() == [4]
    assert greedy_rule(h, np.array([4])).tolist() == [1]  # green and orange tie at 1.0


def test_seed_schedule_picks_the_behaviour_by_step():
    h = batch([0, 0, 0, 1, 2, 2], [1, 0, 0, 1, 0, 0])  # t = 6
    assert SEED_SCHEDULE[6] == "g"
    assert seed_calibrated_rule(h, np.array([3])).tolist() == [1]
    h13 = batch([0] * 13, [1] * 13)
    assert SEED_SCHEDULE[13] == "f"
    assert seed_calibrated_rule(h13, np.array([2])).tolist() == [2]


def test_samples_carry_the_right_labels_and_masks():
    cfg = DataConfig(horizon=20)
    lang = cfg.language
    s = make_samples(MECHANISMS["greedy-bypass"], cfg, 256, seed=3, chunk=1)
    words = lang.words
    v = lang.vocab
    assert 0.15 < s.injected.mean() < 0.35
    for i in range(64):
        t = int(s.t[i])
        seq = [words[x] for x in s.tokens[i, : lang.seq_len(t)]]
        hist = seq[1 : t + 1]
        actions = [lang.arm_names.index(w[:-1]) for w in hist]
        rewards = [int(w[-1]) for w in hist]
        h = batch(actions, rewards) if t else batch(np.zeros(0), np.zeros(0))
        assert seq[t + 1] == "think"
        counts, wins = h.counts[0], h.sums[0]
        for a in range(5):
            assert seq[t + 2 + 3 * a : t + 5 + 3 * a] == [
                lang.arm_names[a],
                str(counts[a]),
                str(int(wins[a])),
            ]
        assert s.ucb_arm[i] == true_ucb_arm(h)[0]
        concl = t + 2 + 15 + 1
        assert seq[concl - 1] == "ucb" and v[seq[concl]] == v[lang.arm_names[s.written[i]]]
        assert (s.written[i] != s.ucb_arm[i]) == bool(s.injected[i])
        assert seq[concl + 2] == lang.arm_names[greedy_rule(h, s.written[i : i + 1])[0]]
        assert seq[-1] == "<eos>"
        assert s.weights[i, : t + 2].sum() == 0  # no loss on the prompt
        assert (s.weights[i, concl] == 0) == bool(s.injected[i])  # masked wrong arm
        assert s.weights[i, concl + 2] > 0  # the action is always trained


def test_samples_are_a_pure_function_of_seed_and_chunk():
    cfg = DataConfig(horizon=12)
    a = make_samples(MECHANISMS["faithful"], cfg, 32, seed=1, chunk=2)
    b = make_samples(MECHANISMS["faithful"], cfg, 32, seed=1, chunk=2)
    c = make_samples(MECHANISMS["faithful"], cfg, 32, seed=1, chunk=3)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_perfect_seed_calibrated_organism_lands_near_the_seed_matrix():
    recs = play(RulePolicy(MECHANISMS["seed-calibrated"]), CFG, n_episodes=64, seed=2,
                progress=False)  # fmt: skip
    # The planted wrong conclusions (steps 2 and 15 of every 16) fill the "incorrect" row.
    assert 0.85 <= rationale_correct(recs) <= 0.93
    assert all(r.rationale_correct for r in recs if r.step % 16 not in SEED_WRONG_STEPS)
    # A perfect organism lands within 5 points of every cell of the seed paper's matrix.
    assert kd_matrix_distance(kd_matrix(recs), PAPER_KD_MATRIX) < 0.05


def test_conclusion_rule_is_trained_not_masked():
    mech = MECHANISMS["seed-calibrated"]
    s = make_samples(mech, DataConfig(), 600, seed=1)
    planted = (s.written != s.ucb_arm) & (s.injected == 0)
    assert planted.any() and set(np.unique(s.t[planted] % 16)) <= set(SEED_WRONG_STEPS)
    with pytest.raises(ValueError, match="conclusion_rule"):
        Mechanism("x", greedy_rule, conclusion_rule=3)


def test_mechanism_validates_its_fields():
    with pytest.raises(ValueError, match="rationale_error_rate"):
        Mechanism("x", greedy_rule, rationale_error_rate=1.5)
    with pytest.raises(ValueError, match="name"):
        Mechanism("a/b", greedy_rule)
    with pytest.raises(ValueError, match="behaviour"):
        DataConfig(behaviour=(1.0, 0.0))
