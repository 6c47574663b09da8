import numpy as np
import pytest

from kdgap.envs import BanditConfig
from kdgap.metrics import coverage_curve
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy
from kdgap.report.behavior import PlayConfig, run_play


@pytest.fixture(scope="module")
def default_results():
    # The acceptance setting: `kdgap play` defaults, 64 Bernoulli 5-arm bandits x 50 steps.
    return {
        p: run_play(make_policy(p), PlayConfig(), progress=False)
        for p in ["ucb", "greedy", "random"]
    }  # noqa: E501


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


def test_ucb_follows_its_own_label_and_policies_are_reproducible():
    cfg = BanditConfig(horizon=20)
    a = play(make_policy("ucb"), cfg, n_episodes=4, seed=1, progress=False)
    assert all(r.action == r.ucb_arm for r in a)
    r1 = play(make_policy("random"), cfg, n_episodes=6, seed=2, progress=False)
    r2 = play(make_policy("random"), cfg, n_episodes=6, seed=2, batch_size=4, progress=False)
    assert [r.action for r in r1] == [r.action for r in r2]  # batch layout does not matter


def test_epsilon_greedy_distribution_and_errors():
    from kdgap.policies.reference import EpsilonGreedyPolicy

    with pytest.raises(ValueError, match="epsilon"):
        EpsilonGreedyPolicy(epsilon=2)
    with pytest.raises(ValueError, match="policy"):
        make_policy("thompson")
    recs = play(EpsilonGreedyPolicy(epsilon=0.2), BanditConfig(horizon=3), n_episodes=2, seed=0,
                progress=False)  # fmt: skip
    probs = np.array(recs[-1].action_probs)
    assert probs.sum() == pytest.approx(1.0)
    assert probs.min() >= 0.2 / 5 - 1e-12


def test_off_policy_play_records_the_policy_but_executes_the_driver():
    cfg = BanditConfig(horizon=12)
    recs = play(make_policy("greedy"), cfg, n_episodes=3, seed=4, driver=make_policy("ucb"),
                progress=False)  # fmt: skip
    ucb_run = play(make_policy("ucb"), cfg, n_episodes=3, seed=4, progress=False)
    # The histories are UCB's: executed arms equal UCB's own actions step for step.
    assert [r.executed_action for r in recs] == [r.action for r in ucb_run]
    # Labels come from those histories, and the recorded action is the greedy policy's.
    assert [r.ucb_arms for r in recs] == [r.ucb_arms for r in ucb_run]
    assert any(r.action != r.executed_action for r in recs)
    assert all(r.executed_action is None for r in ucb_run)
    # Rewards/regrets are those of the recorded (greedy) arm.
    same = [(a, b) for a, b in zip(recs, ucb_run) if a.action == b.action]
    assert same and all(a.reward == b.reward and a.regret == b.regret for a, b in same)
