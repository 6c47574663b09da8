"""KV-cached generation and scoring on the SDPA twin (kdgap.agent.hf_decoding).

Generation on the twin equals the bridge path token for token (greedy and sampled) and
Hugging Face ``generate``; scoring with and without the generation's KV cache equals the
bridge forward and a hand computation from one unpadded forward per spelling, on GPT-2,
Llama and Qwen2; hooks (transformer-lens or plain torch) switch the fast path off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdgap.agent.generation import generate, score_continuations
from kdgap.agent.prompts import PaperFormat
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.models import twins
from kdgap.models.runtime import has_hooks
from kdgap.models.tokens import encode
from kdgap.policies.play import play

PROMPTS = [
    "Step=0 Action=red Reward=1\nStep=1 Action=blue",
    "You are in a room",
    "ACTION= the quick brown fox jumps over the unknown mean of green",
]
SPELLINGS = ["red", " red", "Red", " Red", "orange", " Orange", "yellow", " green"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_generation_equals_the_bridge_path(hf_models, hf_arch, temperature):
    bridge = hf_models[hf_arch].bridge
    kw = dict(max_new_tokens=12, temperature=temperature, seed=7)
    fast = generate(bridge, PROMPTS, **kw)
    slow = generate(bridge, PROMPTS, fast=False, **kw)
    assert fast.token_ids == slow.token_ids and fast.texts == slow.texts
    assert fast.n_tokens.tolist() == slow.n_tokens.tolist()
    # Left-padded batch = each prompt alone.
    if temperature == 0:
        for j, p in enumerate(PROMPTS):
            assert generate(bridge, [p], **kw).token_ids[0] == fast.token_ids[j]


def test_fast_generation_equals_hf_generate(hf_models, hf_arch):
    from transformers import AutoModelForCausalLM

    loaded = hf_models[hf_arch]
    hf = AutoModelForCausalLM.from_pretrained(loaded.identity["path"]).eval()
    out = generate(loaded.bridge, PROMPTS, max_new_tokens=12)
    eos = hf.config.eos_token_id
    for j, ids in enumerate(encode(loaded.bridge, PROMPTS)):
        x = torch.tensor([ids])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)  # fmt: skip
        new = ref[0, len(ids) :].tolist()
        assert out.token_ids[j] == (new[: new.index(eos)] if eos in new else new)


def _hand_scores(bridge, tok, prefixes, spellings) -> torch.Tensor:
    """``[n, spellings]`` from one unpadded bridge forward of prefix + spelling each."""
    out = torch.zeros(len(prefixes), len(spellings), dtype=torch.float64)
    for i, pre in enumerate(encode(bridge, prefixes, tokenizer=tok)):
        for j, s in enumerate(spellings):
            ids = tok(s, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(bridge(torch.tensor([pre + ids]))[0].double(), -1)
            out[i, j] = sum(logp[len(pre) - 1 + k, t] for k, t in enumerate(ids))
    return out.float()


def test_fast_scoring_with_and_without_the_cache_equals_the_bridge(hf_models, hf_arch):
    loaded = hf_models[hf_arch]
    bridge, tok = loaded.bridge, loaded.tokenizer
    assert max(len(tok(s, add_special_tokens=False).input_ids) for s in SPELLINGS) > 1
    gen = generate(bridge, PROMPTS, max_new_tokens=10, keep_cache=True)
    assert gen.cache is not None and len(gen.cache.fed) == len(PROMPTS)
    # The model's own text + marker; an edited one (diverges inside the generated part);
    # a prefix of another prompt's row; one sharing nothing.
    prefixes = [p + t + "\nACTION=" for p, t in zip(PROMPTS, gen.texts)]
    prefixes += [PROMPTS[0] + " green Reward=0\nACTION=", PROMPTS[1][:-3], "blue"]
    rows = [0, 1, 2, 0, 1, 2]
    old = score_continuations(bridge, prefixes, SPELLINGS, fast=False)
    fresh = score_continuations(bridge, prefixes, SPELLINGS)
    reused = score_continuations(bridge, prefixes, SPELLINGS, reuse=gen.cache, reuse_rows=rows)
    hand = _hand_scores(bridge, tok, prefixes, SPELLINGS)
    torch.testing.assert_close(old, hand, rtol=0, atol=2e-4)
    torch.testing.assert_close(fresh, old, rtol=0, atol=2e-4)
    torch.testing.assert_close(reused, old, rtol=0, atol=2e-4)
    # One at a time, and with a batch size of one: the same numbers.
    one = torch.cat([score_continuations(bridge, [p], SPELLINGS) for p in prefixes])
    torch.testing.assert_close(one, fresh, rtol=0, atol=2e-5)
    small = score_continuations(bridge, prefixes, SPELLINGS, batch_size=1)
    torch.testing.assert_close(small, fresh, rtol=0, atol=2e-5)


def test_cache_of_another_model_is_not_used(hf_models):
    a, b = hf_models["llama"].bridge, hf_models["qwen2"].bridge
    gen = generate(a, PROMPTS, max_new_tokens=4, keep_cache=True)
    prefixes = [p + t for p, t in zip(PROMPTS, gen.texts)]
    got = score_continuations(b, prefixes, SPELLINGS, reuse=gen.cache)
    torch.testing.assert_close(got, score_continuations(b, prefixes, SPELLINGS, fast=False),
                               rtol=0, atol=2e-4)  # fmt: skip


def test_forced_agent_is_the_same_with_the_fast_path(hf_models, hf_arch, monkeypatch):
    """A whole forced + counterfactual run: fast path vs the bridge path everywhere."""
    bridge = hf_models[hf_arch].bridge
    cfg = BanditConfig(horizon=3)

    def run():
        agent = TextAgent(bridge, PaperFormat(knowing_doing=True), mode="forced",
                          max_new_tokens=8, seed=2, counterfactual=True)  # fmt: skip
        return play(agent, cfg, n_episodes=2, seed=1, progress=False)

    fast = run()
    monkeypatch.setattr(twins, "fast_model", lambda bridge, **kw: None)
    slow = run()
    assert [r.completion for r in fast] == [r.completion for r in slow]
    assert [r.action for r in fast] == [r.action for r in slow]
    np.testing.assert_allclose([r.action_probs for r in fast], [r.action_probs for r in slow],
                               atol=1e-4)  # fmt: skip


def test_hooks_switch_the_fast_path_off(hf_models):
    bridge, tok = hf_models["llama"].bridge, hf_models["llama"].tokenizer
    prefixes = PROMPTS[:2]
    plain = score_continuations(bridge, prefixes, SPELLINGS)

    def push(resid, hook):
        return resid + 3.0

    with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", push)]):
        hooked = score_continuations(bridge, prefixes, SPELLINGS)
        hooked_gen = generate(bridge, PROMPTS, max_new_tokens=6, keep_cache=True)
        want = []
        for pre in encode(bridge, prefixes, tokenizer=tok):
            with torch.no_grad():
                want.append(torch.log_softmax(bridge(torch.tensor([pre]))[0, -1], -1))
    assert hooked_gen.cache is None  # the bridge path ran
    assert (hooked - plain).abs().max() > 1e-2
    first = [tok(s, add_special_tokens=False).input_ids for s in SPELLINGS]
    for i, lp in enumerate(want):
        for j, ids in enumerate(first):
            if len(ids) == 1:
                assert abs(float(hooked[i, j]) - float(lp[ids[0]])) < 2e-4


def test_torch_module_hooks_switch_the_fast_path_off(hf_models):
    """A plain torch forward hook on a submodule of the wrapped model (as patching registers
    them) is honoured: scoring runs through the bridge, which runs that module."""
    bridge = hf_models["llama"].bridge
    assert not has_hooks(bridge)
    plain = score_continuations(bridge, PROMPTS[:2], SPELLINGS)
    emb = bridge.original_model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda mod, args, out: out * 3.0)
    try:
        assert has_hooks(bridge)
        hooked = score_continuations(bridge, PROMPTS[:2], SPELLINGS)
        ref = score_continuations(bridge, PROMPTS[:2], SPELLINGS, fast=False)
    finally:
        handle.remove()
    assert not has_hooks(bridge)
    assert (hooked - plain).abs().max() > 1e-2  # the hook acted...
    torch.testing.assert_close(hooked, ref, rtol=0, atol=1e-5)  # ...exactly as on the bridge
