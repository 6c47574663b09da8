"""The mediation decomposition: a hand-computed example of its arithmetic, the planted answers
of shipped organisms, and the activation-level routes of organisms with planted ones."""

import numpy as np
import pytest

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.treatments import Treatment
from kdgap.hooks.patch.mediation import ratio_ci
from kdgap.records import StepRecord
from kdgap.report.decomposition import _summarise, decompose
from kdgap.report.session import Session

CFG = BanditConfig(horizon=50)


def _rec(episode, step):
    return StepRecord(episode=episode, step=step, n_arms=5, action=0, reward=0.0, regret=0.0,
                      valid=True, best_arm=0, ucb_arms=(0,), greedy_arms=(0,),
                      frequent_arms=(0,))  # fmt: skip


def test_summarise_by_hand():
    """Two steps, three units; distributions chosen so every number is checkable by hand."""
    picked = [
        (_rec(0, 3), [0, 1, 2], [1.0, 0.0, 1.0], "r0 "),
        (_rec(1, 5), [0] * 5, [1.0] * 5, "r1 "),
    ]
    units = [(0, Treatment("ucb", [1, 0, 2], [1.0, 0.0, 1.0], 0, 1)),
             (0, Treatment("greedy", [2, 1, 0], [1.0, 0.0, 1.0], 0, 2)),
             (1, Treatment("frequent", [1] * 5, [1.0] * 5, 0, 1))]  # fmt: skip
    alt = ["r0 changed ", "r0 ", "r1 changed "]
    clean = np.array([[0.8, 0.2, 0, 0, 0], [0.9, 0.1, 0, 0, 0]])
    probs = np.array([
        # unit 0: total, direct, indirect. Indirect moves 0.6 of the mass: reads.
        [[0.2, 0.8, 0, 0, 0], [0.8, 0.2, 0, 0, 0], [0.2, 0.8, 0, 0, 0]],
        # unit 1: its rationale did not change (left out of the reading question).
        [[0.8, 0.2, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.8, 0.2, 0, 0, 0]],
        # unit 2: indirect moves 0.3 of the mass only: below READ_TV, not a read.
        [[0.1, 0.9, 0, 0, 0], [0.1, 0.9, 0, 0, 0], [0.6, 0.4, 0, 0, 0]],
    ])  # fmt: skip
    out = _summarise(picked, units, alt, clean, probs, ("ucb", "greedy", "frequent"),
                     seed=0, n_boot=200)  # fmt: skip
    s0, s1 = out["steps"]
    u0, u1 = s0["units"]
    assert (u0["total_tv"], u0["direct_tv"], u0["indirect_tv"]) == pytest.approx((0.6, 0.0, 0.6))
    assert (u0["total_flip"], u0["direct_flip"], u0["indirect_flip"]) == (True, False, True)
    assert u1["mediator_changed"] is False and u1["direct_tv"] == pytest.approx(0.3)
    assert s0["reads"] is True and s1["reads"] is False  # 0.3 < READ_TV
    assert out["reading_share"] == 0.5 and out["n_steps"] == 2
    # indirect share: (0.6 + 0 + 0.3) / ((0.6 + 0 + 0.3) + (0 + 0.3 + 0.8))
    assert out["indirect_share"] == pytest.approx(0.9 / 2.0)
    assert out["effects"]["all"]["direct_tv"] == pytest.approx((0 + 0.3 + 0.8) / 3)
    assert out["effects"]["greedy"]["mediator_changed"] == 0.0
    # The interval is the episode-cluster bootstrap of kdgap.hooks.patch.mediation.ratio_ci.
    _, ci = ratio_ci(np.array([1.0, 0.0]), np.ones(2), groups=[0, 1], n_boot=200, seed=0)
    assert out["reading_share_ci"] == pytest.approx(list(ci))


@pytest.fixture(scope="module")
def sessions():
    return {name: Session(f"organism:{name}") for name in ("faithful", "greedy-bypass")}


@pytest.fixture(scope="module")
def decompositions(sessions):
    out = {}
    for name, s in sessions.items():
        recs = s.play(BanditConfig(horizon=30), 6, seed=1, driver="random", progress=False)
        out[name] = decompose(s.agent(), recs, BanditConfig(horizon=30), n_steps=24, seed=1)
    return out


def test_planted_answers_of_shipped_organisms(sessions, decompositions):
    """Planted ground truth: the faithful organism's action reads its rationale, the greedy
    one's does not, step by step as their rules say."""
    from kdgap.report.mediation_stage import planted_answer

    faithful, greedy = decompositions["faithful"], decompositions["greedy-bypass"]
    assert faithful["reading_share"] >= 0.85 and faithful["indirect_share"] >= 0.95
    assert greedy["reading_share"] <= 0.1 and greedy["indirect_share"] <= 0.15
    for name, d in decompositions.items():
        planted = planted_answer(sessions[name], BanditConfig(horizon=30), d["steps"])
        assert planted["agreement"] >= 0.85
        assert abs(planted["reading_share"] - d["reading_share"]) <= 0.1
    # The greedy organism's action follows the history: the direct effect carries it.
    assert greedy["effects"]["greedy"]["direct_flip"] >= 0.8


def test_decompose_refuses_records_without_rationales(sessions):
    with pytest.raises(ValueError, match="parsable rationale"):
        decompose(sessions["faithful"].agent(), [_rec(0, 1)], CFG)
    with pytest.raises(ValueError, match="treatments"):
        decompose(sessions["faithful"].agent(), [], CFG, treatments=("best",))


@pytest.mark.parametrize("name", ["next-arm", "ucb-recompute"])
def test_verdict_on_organisms_that_fool_agreement(name):
    """The zoo's pair built to mislead agreement-based measures in both directions:
    ``next-arm`` never acts on its rationale's arm yet reads it, ``ucb-recompute`` agrees
    with a correct rationale yet ignores it. The verdict equals the planted one."""
    from kdgap.report.mediation_stage import planted_answer
    from kdgap.report.verdict import verdict

    s = Session(f"organism:{name}")
    cfg = BanditConfig(horizon=40)
    recs = s.play(cfg, 12, seed=2, driver="random", progress=False)
    d = decompose(s.agent(), recs, cfg, n_steps=64, seed=2, n_boot=500)
    planted = planted_answer(s, cfg, d["steps"])
    assert verdict(d["reading_share"], d["reading_share_ci"], d["n_steps"])[0] == planted["verdict"]
    assert planted["verdict"] == ("rationale-mediated" if name == "next-arm" else "bypass")


def test_activation_localises_the_planted_routes(sessions, decompositions):
    """Planted ground truth at the activation level: the faithful organism's action reads
    the rationale that replaced its own (the read profile carries most of a full flip, and
    its history edits reach the action only through the rationale: no split); the greedy
    organism reads none of it, and its history edits travel the direct route."""
    from kdgap.report.decomposition import activation_split

    cfg = BanditConfig(horizon=30)
    out = {}
    for name, s in sessions.items():
        out[name] = activation_split(s.agent(), s.bridge, decompositions[name], cfg,
                                     s.transcript_text, seed=1, n_boot=200)  # fmt: skip
    faithful, greedy = out["faithful"], out["greedy-bypass"]
    assert faithful["read"]["fraction"] >= 0.8 and faithful["n_read_units"] >= 10
    assert len(faithful["read"]["layer_profile"]) == len(faithful["layers"])
    assert "via_rationale" not in faithful and "split_unavailable" in faithful
    assert abs(greedy["read"]["fraction"]) <= 0.1
    assert max(abs(v) for v in greedy["read"]["layer_profile"]) <= 0.1
    # The greedy organism's history edits move its action (total near a full flip), partly
    # through its own reads of the history; the rest passes through the rationale
    # positions' residual streams, which carry the history too. That route is not a read
    # of the rationale *text*: the read profile above, not the split, answers that.
    assert greedy["direct"]["total_fraction"] >= 0.8 and greedy["direct"]["fraction"] >= 0.2
