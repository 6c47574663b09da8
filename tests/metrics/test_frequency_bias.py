import numpy as np
import pytest

from kdgap.envs import BanditConfig
from kdgap.metrics.frequency_bias import (
    FreqBiasHistory,
    build_histories,
    class_masses,
    entropy,
    summarise,
)
from kdgap.policies.reference import make_policy
from kdgap.report.behavior import run_freqbias


def test_histories_follow_the_protocol():
    hists = build_histories(BanditConfig(), n_histories=5, repetitions=(0, 7, 100), seed=3)
    assert len(hists) == 15
    for h in hists:
        assert 2 <= h.prefix_len <= 10
        assert len(h.actions) == h.prefix_len + h.repetitions
        assert (h.actions[h.prefix_len - 1 :] == h.actions[h.prefix_len - 1]).all()
    # The prefix is shared across repetition counts of one bandit.
    same = [h for h in hists if h.episode == 2]
    assert all((h.actions[: h.prefix_len] == same[0].actions[: h.prefix_len]).all() for h in same)


def test_class_masses_greedy_wins_ties_with_frequent():
    # Arm 0 pulled 3x (mean 1/3), arm 1 once (mean 1): greedy = 1, frequent = 0.
    h = FreqBiasHistory(0, 4, 0, np.array([0, 0, 0, 1]), np.array([1.0, 0, 0, 1]))
    m = class_masses(h, np.array([0.5, 0.3, 0.2, 0.0]))
    assert m == pytest.approx({"F_f": 0.5, "F_g": 0.3, "F_o": 0.2})
    # Frequent arm is also the greedy one: its mass counts as greedy.
    h2 = FreqBiasHistory(0, 2, 0, np.array([0, 0, 1]), np.array([1.0, 1, 0]))
    assert class_masses(h2, np.array([1.0, 0, 0, 0])) == pytest.approx(
        {"F_f": 0, "F_g": 1, "F_o": 0}
    )  # noqa: E501


def test_entropy_closed_form():
    assert entropy(np.array([0.25] * 4)) == pytest.approx(np.log(4))
    assert entropy(np.array([1.0, 0, 0])) == 0.0


def test_reference_policies_through_protocol():
    cfg = BanditConfig()
    greedy = run_freqbias(make_policy("greedy"), cfg, n_histories=8, repetitions=(0, 50, 100))
    rnd = run_freqbias(make_policy("random"), cfg, n_histories=8, repetitions=(0, 50, 100))
    # Greedy puts (almost) all its mass on the greedy arms in every window.
    assert greedy["windows"]["90-100"]["F_g"] > 0.95
    # Random is maximally uncertain everywhere.
    assert rnd["entropy"] == pytest.approx([np.log(5)] * 3)
    assert rnd["entropy_repetition_corr"] is None
    for w in rnd["windows"].values():
        assert w["F_f"] + w["F_g"] + w["F_o"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distributions"):
        summarise(build_histories(cfg, n_histories=1, repetitions=(0,)), np.ones((2, 5)) / 5)
