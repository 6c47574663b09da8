import numpy as np
import pytest

from kdgap.envs import BanditConfig, VectorBandit, arm_names


def test_same_seed_same_bandits_and_rewards_and_batch_prefix():
    cfg = BanditConfig(n_arms=5, horizon=10)
    a, b = VectorBandit(cfg, 8), VectorBandit(cfg, 3)
    a.reset(seed=7)
    b.reset(seed=7)
    np.testing.assert_array_equal(a.means[:3], b.means)
    acts = np.array([0, 1, 2])
    _, r_b, *_ = b.step(acts)
    _, r_a, *_ = a.step(np.array([0, 1, 2, 0, 0, 0, 0, 0]))
    np.testing.assert_array_equal(r_a[:3], r_b)
    c = VectorBandit(cfg, 8)
    c.reset(seed=8)
    assert not np.allclose(c.means, a.means)


def test_first_episode_offset_selects_the_same_bandits():
    cfg = BanditConfig(horizon=5)
    full, part = VectorBandit(cfg, 6), VectorBandit(cfg, 2, first_episode=4)
    full.reset(seed=1)
    part.reset(seed=1)
    np.testing.assert_array_equal(full.means[4:6], part.means)


def test_bernoulli_rewards_are_binary_and_gaussian_has_sigma():
    cfg = BanditConfig(n_arms=5, horizon=50)
    env = VectorBandit(cfg, 4)
    env.reset(seed=0)
    for _ in range(50):
        _, r, _, trunc, _ = env.step(np.zeros(4, dtype=int))
    assert set(np.unique(env.rewards)) <= {0.0, 1.0}
    assert trunc.all()
    with pytest.raises(RuntimeError, match="horizon"):
        env.step(np.zeros(4, dtype=int))
    g = VectorBandit(BanditConfig(reward="gaussian", sigma=3.0, horizon=50), 200)
    g.reset(seed=0)
    for _ in range(50):
        g.step(np.zeros(200, dtype=int))
    resid = g.rewards - g.means[:, :1]
    assert abs(resid.std() - 3.0) < 0.1


def test_gap_instances_have_one_best_arm():
    env = VectorBandit(BanditConfig(gap=0.2), 10)
    env.reset(seed=0)
    for m in env.means:
        assert sorted(np.round(m, 6).tolist()) == [0.4, 0.4, 0.4, 0.4, 0.6]


def test_common_random_numbers_nth_pull_same_reward():
    cfg = BanditConfig(n_arms=5, horizon=6)
    e1, e2 = VectorBandit(cfg, 1), VectorBandit(cfg, 1)
    e1.reset(seed=3)
    e2.reset(seed=3)
    for a in [0, 1, 0, 2, 0, 3]:
        e1.step(np.array([a]))
    for a in [0, 0, 0, 1, 2, 3]:
        e2.step(np.array([a]))
    r1 = e1.rewards[0][[0, 2, 4]]  # pulls 1..3 of arm 0
    r2 = e2.rewards[0][[0, 1, 2]]
    np.testing.assert_array_equal(r1, r2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_arms": 1}, "n_arms"),
        ({"n_arms": 21}, "n_arms"),
        ({"horizon": 0}, "horizon"),
        ({"reward": "poisson"}, "reward"),
        ({"sigma": 0}, "sigma"),
        ({"gap": 1.5}, "gap"),
        ({"arm_style": "emoji"}, "arm_style"),
        ({"ucb_bonus": "kl"}, "ucb_bonus"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BanditConfig(**kwargs)


def test_bad_actions_and_unseeded_reset_raise():
    env = VectorBandit(BanditConfig(), 2)
    with pytest.raises(ValueError, match="seed"):
        env.reset()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside"):
        env.step(np.array([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.array([0]))


def test_arm_names():
    assert arm_names(5) == ("red", "green", "blue", "yellow", "orange")
    assert arm_names(10)[5:] == ("purple", "pink", "brown", "black", "white")
    assert len(set(arm_names(20))) == 20
    assert arm_names(5, "numbers") == ("1", "2", "3", "4", "5")
