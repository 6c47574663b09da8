"""The play loop: reproducible whatever the batch layout, off-policy histories, its checks."""

import pytest

from kdgap.envs import BanditConfig
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy


def test_ucb_follows_its_own_label_and_policies_are_reproducible():
    cfg = BanditConfig(horizon=20)
    a = play(make_policy("ucb"), cfg, n_episodes=4, seed=1, progress=False)
    assert all(r.action == r.ucb_arm for r in a)
    r1 = play(make_policy("random"), cfg, n_episodes=6, seed=2, progress=False)
    r2 = play(make_policy("random"), cfg, n_episodes=6, seed=2, batch_size=4, progress=False)
    assert [r.action for r in r1] == [r.action for r in r2]  # batch layout does not matter


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


def test_counts_are_checked_before_playing():
    cfg = BanditConfig(horizon=2)
    with pytest.raises(ValueError, match=r"n_episodes=0 must be an integer >= 1"):
        play(make_policy("ucb"), cfg, n_episodes=0, progress=False)
    with pytest.raises(ValueError, match=r"batch_size=0 must be an integer >= 1 or None"):
        play(make_policy("ucb"), cfg, n_episodes=2, batch_size=0, progress=False)
