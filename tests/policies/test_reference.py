"""Reference policies: the textbook regret ordering, UCB's coverage, epsilon-greedy."""

import numpy as np
import pytest

from kdgap.envs import BanditConfig
from kdgap.metrics import coverage_curve
from kdgap.policies.play import play
from kdgap.policies.reference import EpsilonGreedyPolicy, make_policy
from kdgap.report.behavior import PlayConfig, run_play


@pytest.fixture(scope="module")
def default_results():
    # The acceptance setting: `kdgap play` defaults, 64 Bernoulli 5-arm bandits x 50 steps.
    return {
        p: run_play(make_policy(p), PlayConfig(), progress=False)
        for p in ["ucb", "greedy", "random"]
    }


def test_textbook_ordering_of_regret(default_results):
    reg = {p: out["cumulative_regret"] for p, (out, _) in default_results.items()}
    assert reg["ucb"] < reg["greedy"] < reg["random"]


def test_ucb_covers_all_arms_after_k_steps_and_greedy_does_not(default_results):
    _, ucb_records = default_results["ucb"]
    cov = coverage_curve(ucb_records)
    assert cov[4] == 1.0  # after k = 5 steps
    assert cov[3] == pytest.approx(0.8)
    assert default_results["greedy"][0]["action_coverage"] < 0.9
    assert default_results["random"][0]["rationale_correct"] is None


def test_epsilon_greedy_distribution_and_errors():
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonGreedyPolicy(epsilon=2)
    with pytest.raises(ValueError, match="policy"):
        make_policy("thompson")
    recs = play(EpsilonGreedyPolicy(epsilon=0.2), BanditConfig(horizon=3), n_episodes=2, seed=0,
                progress=False)  # fmt: skip
    probs = np.array(recs[-1].action_probs)
    assert probs.sum() == pytest.approx(1.0)
    assert probs.min() >= 0.2 / 5 - 1e-12
