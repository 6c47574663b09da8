"""TextAgent end to end through kdgap.policies.play.play, with invariants and references."""

import copy

import numpy as np
import pytest
import torch

from kdgap.agent import PaperFormat, TextAgent
from kdgap.envs import BanditConfig, VectorBandit
from kdgap.models.tokens import encode
from kdgap.policies.play import history_of, play
from kdgap.policies.reference import Policy

CFG = BanditConfig(horizon=2)
UCB_TEXT = (
    "<ucb_values>\nred: 0.9\ngreen: 0.2\nblue: 0.1\nyellow: 0.3\norange: 0.4\n</ucb_values>\n"
)


def test_forced_play_tiny_native(tiny_native):
    fmt = PaperFormat(knowing_doing=True)
    agent = TextAgent(tiny_native, fmt, mode="forced", max_new_tokens=4)
    assert isinstance(agent, Policy) and agent.name == "text-forced:paper-ucb"
    recs = play(agent, CFG, n_episodes=2, seed=1, progress=False)
    assert len(recs) == 4 and all(r.valid for r in recs)
    for r in recs:
        p = np.array(r.action_probs)
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and r.action == int(p.argmax())
        # The completion ends with marker + a spelling of the chosen arm, and the
        # action site is that marker's '=' (after the prompt, not the instruction's).
        name = CFG.arm_names[r.action]
        assert any(r.completion.endswith("ACTION=" + v) for v in fmt.arm_continuations(name))
        text = r.prompt + r.completion
        s, e = fmt.site_spans(text)["action"]
        assert text[s] == "=" and text[:e].endswith("ACTION=") and s >= len(r.prompt)
    again = play(TextAgent(tiny_native, fmt, max_new_tokens=4), CFG, n_episodes=2, seed=1,
                 progress=False)  # fmt: skip
    assert [r.action for r in again] == [r.action for r in recs]


def test_free_play_hf_model_all_invalid(tiny_hf_bridge):
    """Random tiny models never write ACTION=: every step invalid, still valid records."""
    agent = TextAgent(tiny_hf_bridge, PaperFormat(), mode="free", max_new_tokens=6, seed=5)
    recs = play(agent, CFG, n_episodes=3, seed=2, progress=False)
    assert len(recs) == 6 and not any(r.valid for r in recs)
    assert all(0 <= r.action < 5 and r.action_probs is None for r in recs)
    assert all(r.completion is not None and "ACTION=" not in r.completion for r in recs)
    # Random fallback is seeded per (seed, episode, step): batch layout does not matter.
    agent2 = TextAgent(tiny_hf_bridge, PaperFormat(), mode="free", max_new_tokens=6, seed=5)
    one_by_one = play(agent2, CFG, n_episodes=3, seed=2, batch_size=1, progress=False)
    assert [r.action for r in one_by_one] == [r.action for r in recs]


def test_forced_probs_match_independent_scoring(tiny_hf_bridge):
    """action_probs = softmax over arms of logsumexp over deduplicated spellings."""
    agent = TextAgent(tiny_hf_bridge, PaperFormat(), max_new_tokens=3)
    env = VectorBandit(CFG, 2)
    env.reset(seed=0)
    agent.reset(CFG, 0)
    hist = history_of(env, np.arange(2))
    dec = agent.act(hist)
    tok = tiny_hf_bridge.tokenizer
    for j in range(2):
        prefix = dec.prompts[j] + dec.completions[j][: dec.completions[j].rindex("ACTION=") + 7]
        (ids,) = encode(tiny_hf_bridge, [prefix])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_hf_bridge(torch.tensor([ids]))[0, -1].float(), -1)
        per_arm = []
        for name in CFG.arm_names:
            variants = (name, " " + name, name.capitalize(), " " + name.capitalize())
            spellings = {tuple(tok(v, add_special_tokens=False)["input_ids"]) for v in variants}
            vals = []
            for sp in spellings:
                with torch.no_grad():
                    lp = torch.log_softmax(
                        tiny_hf_bridge(torch.tensor([ids + list(sp)]))[0].float(), -1
                    )
                vals.append(sum(float(lp[len(ids) - 1 + k, t]) for k, t in enumerate(sp)))
            per_arm.append(torch.logsumexp(torch.tensor(vals), 0))
        ref = torch.softmax(torch.stack(per_arm), 0).numpy()
        np.testing.assert_allclose(dec.action_probs[j], ref, atol=1e-4)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-4)
    dist = agent.action_distribution(hist)
    np.testing.assert_allclose(dist, dec.action_probs, atol=1e-6)


class _ScriptedRationale(PaperFormat):
    """PaperFormat whose 'model rationale' is fixed, so the counterfactual path runs."""

    def strip_action(self, completion):
        return UCB_TEXT


def test_counterfactual_edit(tiny_native):
    fmt = _ScriptedRationale(knowing_doing=True)
    agent = TextAgent(tiny_native, fmt, max_new_tokens=2, counterfactual=True)
    recs = play(agent, CFG, n_episodes=2, seed=0, progress=False)
    assert all(r.rationale_arm == 0 for r in recs)  # red: 0.9 is the top value
    assert all(r.cf_rationale_arm is not None and r.cf_rationale_arm != 0 for r in recs)
    for r in recs:  # the cf action is the forced choice after the edited rationale
        edited = fmt.edit_conclusion(UCB_TEXT, r.cf_rationale_arm, CFG.arm_names)
        scores = agent.arm_logprobs([r.prompt + edited + "ACTION="])
        assert r.cf_action == int(scores[0].argmax())


def test_chat_template_applied_without_double_bos(tiny_native, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ bos_token }}User: {{ messages[0]['content'] }}\nAssistant:"
    agent = TextAgent(tiny_native, PaperFormat(), tokenizer=tok, max_new_tokens=2)
    env = VectorBandit(CFG, 1)
    env.reset(seed=0)
    (prompt,) = agent.prompts(history_of(env, np.arange(1)))
    assert prompt.startswith("<bos>User: You are in a room") and prompt.endswith("Assistant:")
    (ids,) = encode(tiny_native, [prompt], tokenizer=tok)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    raw = TextAgent(tiny_native, PaperFormat(use_chat_template=False), tokenizer=tok)
    assert raw.prompts(history_of(env, np.arange(1)))[0].startswith("You are in a room")


def test_bad_arguments_name_the_parameter(tiny_native):
    with pytest.raises(ValueError, match="mode='sample'"):
        TextAgent(tiny_native, PaperFormat(), mode="sample")
    with pytest.raises(TypeError, match="TranscriptFormat"):
        TextAgent(tiny_native, object())
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        TextAgent(tiny_native, PaperFormat(), max_new_tokens=0)
