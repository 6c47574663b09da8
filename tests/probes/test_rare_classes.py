"""rare_classes: stop on a rare class (default) or drop it and record what was dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdgap.probes import knowing_doing, knowing_doing_summary, sweep
from kdgap.probes.dataset import format_dropped, handle_rare_classes
from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels


@pytest.fixture(scope="module")
def rare_store():
    """Faithful labels where arm 3 is almost never the action (and rationale): 6 steps."""
    labels = bandit_labels(n_episodes=30, n_steps=20, mode="faithful", seed=3)
    rare = np.flatnonzero(labels["action"].to_numpy() == 3)
    relabel = rare[6:]  # keep 6 examples of class 3, move the rest to class 0
    for col in ("action", "rationale_arm", "ucb_arm"):
        labels.loc[relabel, col] = 0
    plants = [Plant("rationale_arm", 3.0)]
    return SyntheticStore(labels, n_layers=2, d_model=16, plants=plants, seed=4)


def test_handle_rare_classes_unit():
    y = np.array([0] * 12 + [1] * 12 + [2] * 3 + [-1] * 2)
    with pytest.raises(ValueError, match=r"rare_classes='drop'.*|too few examples"):
        handle_rare_classes(y, label="action", min_count=10)
    out, dropped = handle_rare_classes(y, label="action", min_count=10, rare_classes="drop")
    assert dropped == {2: 3}
    assert (out == 2).sum() == 0 and (out == -1).sum() == 5 and (y == 2).sum() == 3  # a copy
    assert format_dropped({3: 14, 1: 2}) == "1:2,3:14"
    with pytest.raises(ValueError, match="at least 2"):  # only one class would remain
        handle_rare_classes(np.array([0] * 12 + [1] * 3), label="a", min_count=10,
                            rare_classes="drop")  # fmt: skip
    with pytest.raises(ValueError, match="rare_classes='keep'"):
        handle_rare_classes(y, label="a", min_count=10, rare_classes="keep")


def test_sweep_stops_by_default_and_drops_on_request(rare_store):
    kw = dict(labels=["action", "rationale_arm"], probes=("diffmeans",), n_boot=50)
    with pytest.raises(ValueError, match=r"label='action'.*\{3: 6\}"):
        sweep(rare_store, **kw)
    df = sweep(rare_store, rare_classes="drop", **kw)
    assert set(df["dropped_classes"]) == {"3:6"}
    assert (df["n_dropped"] == 6).all()
    assert (df["n_classes"] == 4).all()  # class 3 left out of fitting and scoring
    full = sweep(rare_store, min_class_count=2, **kw)  # nothing rare at this threshold
    assert (full["dropped_classes"] == "").all() and (full["n_classes"] == 5).all()
    n_used, n_full = df["n_train"] + df["n_test"], full["n_train"] + full["n_test"]
    assert (n_full - n_used == 6).all()


def test_knowing_doing_drops_and_reports(rare_store):
    with pytest.raises(ValueError, match="too few examples"):
        knowing_doing(rare_store, n_boot=50)
    rep = knowing_doing(rare_store, rare_classes="drop", n_boot=50)
    assert rep.dropped_classes == {"rationale_arm": {3: 6}, "action": {3: 6}}
    assert rep.per_layer["knowing_acc"].min() > 0.8  # planted at strength 3


def test_summary_is_json_and_aligned(rare_store):
    s = knowing_doing_summary(rare_store, n_boot=50)  # drops rare classes by default
    json.dumps(s, allow_nan=False)  # no NaN leaks into the JSON
    n = len(s["layers"])
    assert s["layers"] == [0, 1] and s["hooks"][0] == "blocks.0.hook_resid_post"
    for key in ("knowing_acc", "knowing_ci", "doing_acc", "doing_ci", "agreement",
                "knowing_acc_disagree", "doing_ci_disagree"):  # fmt: skip
        assert len(s[key]) == n, key
    for acc, (lo, hi) in zip(s["knowing_acc"], s["knowing_ci"]):
        assert lo <= acc <= hi
    assert s["n_disagree"] == 0 and s["divergence_layer"] is None  # faithful labels
    assert s["tracking"]["tracks"] is None and s["knowing_ci_disagree"][0] == [None, None]
    assert s["dropped_classes"]["action"] == {"3": 6}
    assert 0 < s["chance"]["knowing"] < 0.6 and "first layer" in s["definition"]
    assert s["best_knowing_acc"] == max(s["knowing_acc"])
    one = knowing_doing_summary(rare_store, hook="blocks.1.hook_resid_post", n_boot=50)
    assert one["layers"] == [1] and one["knowing_acc"] == s["knowing_acc"][1:]
    with pytest.raises(ValueError, match="hooks="):
        knowing_doing_summary(rare_store, hook="blocks.9.hook_resid_post")


def test_knowing_doing_drops_again_when_the_other_labels_drop_leaves_a_class_rare():
    # Arm 4 is the rationale on 14 steps, but 6 of them are steps whose action (arm 3, seen
    # on those 6 only) is dropped as rare; the 8 steps of arm 4 that remain fall below
    # min_class_count=10, so the knowing label drops arm 4 in a second round.
    labels = bandit_labels(n_episodes=30, n_steps=20, mode="faithful", seed=3)
    for col in ("action", "rationale_arm", "ucb_arm"):
        labels[col] = labels[col].where(labels[col] < 3, 0)  # arms 3 and 4 never appear
    labels.loc[0:5, "action"], labels.loc[0:13, "rationale_arm"] = 3, 4
    store = SyntheticStore(labels, n_layers=2, d_model=16, plants=[Plant("action", 3.0)], seed=4)
    rep = knowing_doing(store, rare_classes="drop", n_boot=50)
    assert rep.dropped_classes == {"rationale_arm": {4: 8}, "action": {3: 6}}
    with pytest.raises(ValueError, match=r"label='action'.*\{3: 6\}"):
        knowing_doing(store, n_boot=50)  # "raise" stops at the first rare class
