"""Fake activation stores with planted signals, shared by the probe tests."""

from __future__ import annotations

import pytest

from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels


@pytest.fixture(scope="module")
def bypass_store():
    """Greedy-bypass agent: rationale arm readable at every layer, action from layer 2 on."""
    labels = bandit_labels(n_episodes=40, n_steps=30, mode="greedy-bypass", p_disagree=0.35)
    plants = [Plant("rationale_arm", 4.0), Plant("action", 4.0, layers=[2, 3])]
    return SyntheticStore(labels, n_layers=4, d_model=24, plants=plants, seed=1)


@pytest.fixture(scope="module")
def faithful_store():
    """Faithful agent: the action is the rationale arm, both readable at every layer."""
    labels = bandit_labels(n_episodes=40, n_steps=30, mode="faithful")
    plants = [Plant("rationale_arm", 3.0), Plant("greedy_arm", 1.0, layers=[0, 1])]
    return SyntheticStore(labels, n_layers=4, d_model=24, plants=plants, seed=2)
