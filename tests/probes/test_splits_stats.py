"""Grouped splits, leakage, control tasks, intervals and chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kdgap.probes import (
    DiffMeansProbe,
    LogisticProbe,
    accuracy_ci,
    chance_level,
    cluster_bootstrap,
    control_labels,
    grouped_folds,
    grouped_train_test_split,
    wilson_interval,
)
from kdgap.probes.control import control_types, reward_history
from kdgap.probes.splits import check_no_shared_groups
from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels


def test_grouped_splits_keep_episodes_whole():
    groups = np.repeat(np.arange(20), 7)
    tr, te = grouped_train_test_split(groups, test_size=0.25, seed=3)
    check_no_shared_groups(groups, tr, te)
    assert len(np.unique(groups[te])) == 5 and len(tr) + len(te) == len(groups)
    folds = grouped_folds(groups, n_splits=4, seed=3)
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(len(groups)))
    for tr, va in folds:
        check_no_shared_groups(groups, tr, va)
    with pytest.raises(ValueError, match="leaks"):
        check_no_shared_groups(groups, np.arange(10), np.arange(5, 15))


def test_step_level_split_leaks_but_grouped_does_not():
    """Labels constant per episode + an episode fingerprint in the activations: a probe
    can score far above chance by recognising episodes when test steps' episodes are in
    the training set; with episodes held out whole it falls back to chance."""
    labels = bandit_labels(n_episodes=30, n_steps=40, seed=5)
    rng = np.random.default_rng(0)
    labels["episode_label"] = rng.integers(0, 3, 30)[labels["episode"]]
    store = SyntheticStore(labels, n_layers=1, d_model=64, plants=[Plant("episode", 6.0)])
    X = store.load("blocks.0.hook_resid_post", "action")[0].numpy()
    y, groups = labels["episode_label"].to_numpy(), labels["episode"].to_numpy()
    perm = rng.permutation(len(y))  # the leaky way: split steps, ignoring episodes
    leaky_tr, leaky_te = perm[:900], perm[900:]
    steps = np.arange(len(y))  # step-level groups: inner CV leaks the same way
    tr, te = grouped_train_test_split(groups, test_size=0.25, seed=0)
    # (a linear probe can memorise 30 fingerprints in 64 dims; a class-mean baseline
    # averages them away, so only the logistic probe demonstrates the leak)
    probe = LogisticProbe(Cs=(0.01, 1.0), cv=3)
    leaky = probe.fit(X[leaky_tr], y[leaky_tr], steps[leaky_tr]).score(X[leaky_te], y[leaky_te])
    honest = probe.fit(X[tr], y[tr], groups[tr]).score(X[te], y[te])
    # 3 classes, ~1/3 each: with whole episodes held out only chance is left
    assert honest < 0.5, honest
    assert leaky > honest + 0.3, (leaky, honest)


def test_random_and_control_labels_sit_near_chance():
    labels = bandit_labels(n_episodes=48, n_steps=25, seed=1)
    store = SyntheticStore(labels, n_layers=1, d_model=32, plants=[Plant("action", 3.0)])
    X = store.load("blocks.0.hook_resid_post", "action")[0].numpy()
    groups = labels["episode"].to_numpy()
    rng = np.random.default_rng(0)
    tr, te = grouped_train_test_split(groups, seed=0)
    y_rand = rng.integers(0, 5, len(groups))
    y_ctl = control_labels(labels["step"].to_numpy(), labels["action"].to_numpy(), seed=0)
    # the control map is a function of the step: constant across episodes at one step
    assert (labels.assign(c=y_ctl).groupby("step")["c"].nunique() == 1).all()
    for y in (y_rand, y_ctl):
        acc = LogisticProbe(Cs=(0.01, 0.1), cv=3).fit(X[tr], y[tr], groups[tr]).score(X[te], y[te])
        chance = max(chance_level(y[tr], y[te]), 1 / 5)
        assert acc < chance + 0.08, (acc, chance)


def _position_only_accuracy(step, y, tr, te):
    """Test accuracy of the best predictor that sees only the position (= the step): the
    training episodes' majority class at each step value."""
    train = pd.DataFrame({"step": step[tr], "y": y[tr]})
    per_step = train.groupby("step")["y"].agg(lambda v: v.value_counts().idxmax())
    return float(np.mean(per_step.reindex(step[te]).to_numpy() == y[te]))


def test_reward_history_control_is_not_a_function_of_position():
    labels = bandit_labels(n_episodes=64, n_steps=50, seed=0)
    groups, step, y = (labels[c].to_numpy() for c in ("episode", "step", "action"))
    tr, te = grouped_train_test_split(groups, seed=0)
    types = reward_history(labels)
    np.testing.assert_array_equal(types, control_types(labels))  # the sweep's default
    y_hist = control_labels(types, y, seed=0)
    y_step = control_labels(step, y, seed=0)
    # The step control is solved by reading the position alone ...
    assert _position_only_accuracy(step, y_step, tr, te) == 1.0
    # ... the reward-history control is not: the position adds little to the majority rate
    majority = np.bincount(y_hist[tr]).argmax()
    assert _position_only_accuracy(step, y_hist, tr, te) < np.mean(y_hist[te] == majority) + 0.05
    # yet its types recur across episodes, so memorising them can pay on held-out episodes
    assert np.isin(types[te], types[tr]).mean() > 0.95
    # 2**6 full patterns, plus at most 2**6 - 1 shorter ones in an episode's first steps
    assert 2**6 < len(np.unique(types)) <= 2**7 - 1


def test_reward_history_types():
    table = pd.DataFrame({"episode": [0, 0, 0, 1, 1, 1, 1], "step": [0, 1, 2, 0, 1, 2, 4],
                          "reward": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]})  # fmt: skip
    t = reward_history(table, k=2)
    assert t[0] == t[3]  # episode start, nothing seen yet
    assert t[1] == t[4]  # one reward seen: 1
    assert t[2] == t[5]  # last two rewards (0, 1) in both episodes
    assert len(set(t[[0, 1, 2, 6]])) == 4  # step 4 lacks step 3: its own symbol
    with pytest.raises(ValueError, match="'reward' column"):
        reward_history(table.drop(columns="reward"))
    with pytest.raises(ValueError, match="discrete"):
        reward_history(pd.DataFrame({"episode": 0, "step": range(20), "reward": np.arange(20.0)}))
    with pytest.raises(ValueError, match="repeated"):
        reward_history(pd.concat([table, table]))
    with pytest.raises(ValueError, match="neither 'reward_history' nor a column"):
        control_types(table, "nope")
    np.testing.assert_array_equal(control_types(table, "step"), table["step"].to_numpy())


def test_intervals_and_chance():
    lo, hi = wilson_interval(80, 100)
    assert lo < 0.8 < hi and 0.70 < lo and hi < 0.88
    assert np.isnan(wilson_interval(0, 0)[0])
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 10)
    est = cluster_bootstrap(rng.random(300) < 0.7, groups, n_boot=500)
    assert est.low < est.value < est.high and est.high - est.low < 0.2
    # clustered data: whole episodes right or wrong -> far wider than Wilson
    clustered = np.repeat(rng.random(30) < 0.7, 10)
    wide = accuracy_ci(clustered, np.ones(300, bool), groups)
    narrow = accuracy_ci(clustered, np.ones(300, bool), method="wilson")
    assert (wide.high - wide.low) > 2 * (narrow.high - narrow.low)
    assert chance_level(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == 0.25
    with pytest.raises(ValueError, match="groups"):
        accuracy_ci(np.ones(3), np.ones(3))


def test_probe_conventions_and_errors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6))
    y = (X[:, 0] > 0).astype(int)
    groups = np.repeat(np.arange(20), 10)
    probe = LogisticProbe(Cs=(0.1, 1.0), cv=3)
    assert probe.fit(X, y, groups) is probe
    assert probe.directions_.shape == (2, 6) and probe.score(X, y) > 0.9
    assert np.argmax(np.abs(probe.directions_[1])) == 0
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1.0)
    assert probe.get_params()["Cs"] == (0.1, 1.0)
    with pytest.raises(ValueError, match="groups"):
        LogisticProbe().fit(X, y)
    dm = DiffMeansProbe().fit(X, y)
    assert dm.directions_.shape == (2, 6) and dm.score(X, y) > 0.9
    with pytest.raises(ValueError, match="one class"):
        DiffMeansProbe().fit(X, np.zeros(200))
    with pytest.raises(ValueError, match="n_splits"):
        grouped_folds(np.arange(3), n_splits=4)
