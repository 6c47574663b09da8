"""Counterfactual pairs on the organism format: edits, arms, masks and clear errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums, first_arm, greedy_arms
from kdgap.hooks.patch.pairs import (
    format_history,
    make_pair,
    pairs_from_records,
    span_mask,
    tokenize_pairs,
)
from kdgap.models.tokens import tokenize_batch
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.transcript import OrganismFormat
from kdgap.records import StepRecord

CFG = BanditConfig(n_arms=5, horizon=20)
FMT = OrganismFormat()
ACTIONS, REWARDS = [0, 1, 0, 2, 0], [1, 0, 1, 0, 0]  # red 2/3, green 0/1, blue 0/1
COMPLETION = "red 3 2 green 1 0 blue 1 0 yellow 0 0 orange 0 0 ucb yellow act yellow"


def greedy_arm(actions, rewards, n_arms: int = 5) -> int:
    """The greedy arm as kdgap.envs.stats defines it (lowest index of the tie set)."""
    return int(first_arm(greedy_arms(*counts_and_sums(actions, rewards, n_arms))))


@pytest.fixture(scope="module")
def tok():
    return OrganismLanguage(n_arms=5, horizon=20).build_tokenizer()


def test_conclusion_and_statistics_edits():
    a = make_pair("conclusion", FMT, CFG, ACTIONS, REWARDS, COMPLETION, new_arm=2)
    assert a.clean.endswith("ucb yellow act") and a.corrupt.endswith("ucb blue act")
    assert (a.arm_a, a.arm_b) == (3, 2)
    b = make_pair("statistics", FMT, CFG, ACTIONS, REWARDS, COMPLETION, new_arm=0)
    # yellow's "0 0" and red's "3 2" swap; the written conclusion is held.
    assert "red 0 0 green 1 0 blue 1 0 yellow 3 2 orange 0 0 ucb yellow act" in b.corrupt
    b2 = make_pair("statistics", FMT, CFG, ACTIONS, REWARDS, COMPLETION, 0, also_conclusion=True)
    assert b2.corrupt.endswith("ucb red act")


def test_history_edit_moves_greedy_arm_and_holds_rationale():
    assert greedy_arm(ACTIONS, REWARDS, 5) == 0
    c = make_pair("history", FMT, CFG, ACTIONS, REWARDS, COMPLETION)
    assert (c.arm_a, c.arm_b) == (0, 1)
    assert c.corrupt.startswith("green1 red0 green1 blue0 green0 think")
    assert c.clean.split("think")[1] == c.corrupt.split("think")[1]
    with pytest.raises(ValueError, match="ties with the greedy arm"):
        make_pair("history", FMT, CFG, [0, 1], [1, 1], COMPLETION, new_arm=1)


def test_tokenize_pairs_masks_and_metric(tok):
    pairs = [
        make_pair("conclusion", FMT, CFG, ACTIONS, REWARDS, COMPLETION, new_arm=2),
        make_pair("history", FMT, CFG, ACTIONS, REWARDS, COMPLETION),
        make_pair("conclusion", FMT, CFG, ACTIONS[:3], REWARDS[:3], COMPLETION, new_arm=1),
    ]
    groups = tokenize_pairs(pairs, tok, FMT)
    assert sorted(i for g in groups for i in g.index) == [0, 1, 2] and len(groups) == 2
    g = next(g for g in groups if 0 in g.index)
    n_hist = len(ACTIONS) + 1  # history words and "think"
    assert g.history[0, 1 : 1 + n_hist].all() and not g.history[0, 0]  # BOS is no history
    assert g.rationale[0].sum() == 17 and not g.rationale[0, -1]  # 15 stats + ucb + arm
    assert g.metric.token_a[0] == tok.convert_tokens_to_ids("yellow")
    assert g.metric.token_b[0] == tok.convert_tokens_to_ids("blue")
    assert (g.clean_tokens != g.corrupt_tokens).sum(1).tolist() == [1, 4]  # red x3, green x1


def test_errors(tok):
    with pytest.raises(ValueError, match="kind="):
        make_pair("vibes", FMT, CFG, ACTIONS, REWARDS, COMPLETION)
    with pytest.raises(ValueError, match="equals the clean conclusion"):
        make_pair("conclusion", FMT, CFG, ACTIONS, REWARDS, COMPLETION, new_arm=3)

    class OneToken(OrganismFormat):
        def arm_continuations(self, arm_name):
            return [" red"]

    p = make_pair("conclusion", FMT, CFG, ACTIONS, REWARDS, COMPLETION, new_arm=2)
    with pytest.raises(ValueError, match="share the tokens"):
        tokenize_pairs([p], tok, OneToken())

    class TwoTokens(OrganismFormat):
        def arm_continuations(self, arm_name):
            return [f" {arm_name} {arm_name}"]

    # A spelling of several tokens is read by its first (forced choice's first factor).
    two = tokenize_pairs([p], tok, TwoTokens())[0].metric
    assert two.token_a[0].tolist() == [tok.convert_tokens_to_ids("yellow")]

    class Wordy(OrganismFormat):
        def edit_conclusion(self, completion, new_arm, arm_names):
            return completion.replace("ucb yellow", "ucb blue blue")

    with pytest.raises(ValueError, match="equal lengths"):
        tokenize_pairs([make_pair("conclusion", Wordy(), CFG, ACTIONS, REWARDS, COMPLETION, 2)],
                       tok, FMT)  # fmt: skip


def test_span_mask_overlap():
    offsets = tokenize_batch(
        OrganismLanguage(5, 20).build_tokenizer(), ["red1 think red 1"]
    ).offsets
    assert span_mask(offsets, [(5, 10)])[0].tolist() == [False, False, True, False, False]
    assert torch.equal(span_mask(offsets, [(0, 0)]), torch.zeros(1, 5, dtype=torch.bool))


def _record(prompt, completion, action, episode=0, step=5):
    return StepRecord(episode, step, 5, action, 0.0, 0.0, True, 0, (0,), (0,), (0,),
                      prompt=prompt, completion=completion)  # fmt: skip


def test_history_is_read_back_by_the_format():
    prompt = FMT.render_prompt(CFG, ACTIONS, REWARDS)
    want = (ACTIONS, [float(r) for r in REWARDS])
    assert FMT.parse_history(prompt, CFG.arm_names) == want
    assert format_history(FMT, CFG.arm_names)(_record(prompt, "", 0)) == want
    assert FMT.parse_history("think ", CFG.arm_names) == ([], [])
    with pytest.raises(ValueError, match="not an organism prompt"):
        FMT.parse_history("red7 think ", CFG.arm_names)
    # A format that cannot read its prompts back needs the caller's history_fn.
    with pytest.raises(ValueError, match="history_fn="):
        format_history(SimpleNamespace(name="site-only"), CFG.arm_names)
    rec = _record(prompt, COMPLETION, 0)
    own = pairs_from_records([rec], FMT, "history", history_fn=lambda r: (ACTIONS, REWARDS))
    assert own == pairs_from_records([rec], FMT, "history")


def test_pairs_from_records_arms_start_at_the_action():
    prompt = FMT.render_prompt(CFG, ACTIONS, REWARDS)
    # Conclusion yellow (3), action red (0): the edited arm is neither.
    recs = [_record(prompt, COMPLETION.replace("act yellow", "act red"), 0, episode=e)
            for e in range(6)]  # fmt: skip
    conc = pairs_from_records(recs, FMT, "conclusion", n_pairs=4, seed=1)
    assert len(conc) == 4 and {p.episode for p in conc} <= set(range(6))
    for p in conc:
        assert p.pair.arm_a == 0 and p.pair.arm_b not in (0, 3)
        assert p.pair.corrupt.endswith(f"ucb {CFG.arm_names[p.pair.arm_b]} act")
    # History: greedy red (2/3) swaps with a lower-mean arm that is not the action (red).
    hist = pairs_from_records(recs, FMT, "history", n_pairs=6, seed=0)
    for p in hist:
        assert p.pair.arm_a == 0 and p.pair.arm_b in (1, 2, 3, 4)  # yellow, orange untried
        acts, rews = FMT.parse_history(p.pair.corrupt, CFG.arm_names)
        assert greedy_arm(acts, rews, 5) == p.pair.arm_b
    # Every arm ties on the greedy mean: no history edit can move the greedy arm.
    ties = _record("red1 green1 blue1 yellow1 orange1 think ", COMPLETION, 0)
    assert pairs_from_records([ties], FMT, "history") == []
    with pytest.raises(ValueError, match="prompt/completion"):
        pairs_from_records([_record(None, None, 0)], FMT, "conclusion")
    with pytest.raises(ValueError, match="kind="):
        pairs_from_records(recs, FMT, "statistics")
