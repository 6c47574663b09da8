"""Shipped organisms: load fast, offline, and meet small versions of their acceptance numbers.

Skipped until organisms are shipped in ``kdgap/organisms/shipped/``. Each plays 12 bandits
x 32 steps (CI-sized; the full 64 x 50 numbers are in each folder's metrics.json).
"""

import time

import pytest

from kdgap.agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.metrics.organism import organism_metrics
from kdgap.organisms.registry import load_organism, organism_config, shipped_names
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.play import play

SHIPPED = shipped_names()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no organisms shipped yet")


@pytest.fixture(scope="module", params=SHIPPED)
def played(request):
    load_organism(request.param)  # warm imports so the timing below is the load alone
    t0 = time.perf_counter()
    model, tok = load_organism(request.param)
    load_s = time.perf_counter() - t0
    cfg = organism_config(request.param)
    # Two full 16-step periods of seed-calibrated's schedule, so its matrix is not skewed.
    horizon = min(32, cfg["language"]["horizon"])
    agent = TextAgent(model, OrganismFormat(), mode="forced", counterfactual=True,
                      max_new_tokens=3 * cfg["language"]["n_arms"] + 5)  # fmt: skip
    recs = play(agent, BanditConfig(horizon=horizon), n_episodes=12, seed=1, progress=False)
    return cfg["mechanism"], load_s, organism_metrics(recs), model


def test_loads_in_under_two_seconds_in_eval_mode(played):
    _, load_s, _, model = played
    assert load_s < 2.0 and not model.training


def test_writes_correct_rationales_and_valid_actions(played):
    _, _, m, _ = played
    assert m["rationale_correct"] >= 0.80 and m["invalid_rate"] <= 0.01


def test_planted_mechanism_shows_in_behaviour(played):
    mech, _, m, _ = played
    if mech == "faithful":
        assert m["action_follows_rationale"] >= 0.90 and m["counterfactual_flip_rate"] >= 0.85
    elif mech == "greedy-bypass":
        assert m["action_matches"]["greedy"] >= 0.90 and m["counterfactual_flip_rate"] <= 0.15
    elif mech == "frequency-bypass":
        assert (
            m["action_matches"]["most_frequent"] >= 0.90 and m["counterfactual_flip_rate"] <= 0.15
        )
    elif mech == "seed-calibrated":
        assert m["kd_matrix_distance_to_paper"] <= 0.10
