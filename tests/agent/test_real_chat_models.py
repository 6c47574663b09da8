"""Forced choice on real chat-model folders: GPT-2, Llama and Qwen2 (tiny, random, offline).

Each model is saved to a temp folder with a chat template, as a user's checkpoint would
be, and loaded through :func:`kdgap.models.load_model`. Button names tokenise differently
with a leading space or a capital (``"red"``, ``" red"``, ``"Red"``, ``" Red"``, some of
them several tokens): the forced-choice score of an arm is the logsumexp of all its
spellings' sequence log-probs, checked here against a hand computation from raw logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdgap.agent.prompts import PaperFormat
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.models import load_model
from kdgap.models.tokens import encode

PREFIX = "<ucb_values>\nred: 0.71\ngreen: 0.52\n</ucb_values>\nACTION="


def _hand_arm_logprobs(bridge, tok, prefix: str, names, fmt) -> torch.Tensor:
    """``[arms]`` logsumexp over each arm's distinct spellings of the summed token
    log-probs, from one unpadded forward pass of ``prefix + spelling`` per spelling
    (prefix under kdgap's BOS rule, :func:`~kdgap.models.tokens.encode`)."""
    pre = encode(bridge, [prefix], tokenizer=tok)[0]
    out = []
    for name in names:
        variants = {tuple(tok(v, add_special_tokens=False).input_ids)
                    for v in fmt.arm_continuations(name)}  # fmt: skip
        lps = []
        for ids in variants:
            seq = torch.tensor([pre + list(ids)])
            with torch.no_grad():
                logp = torch.log_softmax(bridge(seq)[0].double(), dim=-1)  # [pos, vocab]
            n = len(pre)
            lps.append(sum(logp[n - 1 + k, t] for k, t in enumerate(ids)))
        out.append(torch.logsumexp(torch.stack(lps), 0))
    return torch.stack(out).float()


def test_button_spellings_tokenise_differently(tiny_tokenizer):
    fmt = PaperFormat()
    names = BanditConfig().arm_names
    lengths = set()
    for name in names:
        spellings = [tuple(tiny_tokenizer(v, add_special_tokens=False).input_ids)
                     for v in fmt.arm_continuations(name)]  # fmt: skip
        assert len(set(spellings)) == 4, f"{name}: {spellings}"
        lengths.update(len(s) for s in spellings)
    assert max(lengths) > 1, "some spelling must take several tokens for the test to bite"


def test_forced_choice_sums_spellings_like_a_hand_logsumexp(chat_models, hf_arch, chat_template):
    loaded = chat_models[hf_arch]
    tok, fmt, cfg = loaded.tokenizer, PaperFormat(knowing_doing=True), BanditConfig()
    assert tok.chat_template == chat_template, "the template must survive save + load_model"
    agent = TextAgent(loaded.bridge, fmt, mode="forced", max_new_tokens=4)
    agent.reset(cfg, 0)
    prefixes = [PREFIX, "Step=0 Action=blue Reward=1\nACTION="]
    got = agent.arm_logprobs(prefixes)  # [2, arms]
    for i, p in enumerate(prefixes):
        want = _hand_arm_logprobs(loaded.bridge, tok, p, cfg.arm_names, fmt)
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-4)
    # the variants matter: the sum over spellings is never below the bare name, and above it
    bare = _hand_arm_logprobs(loaded.bridge, tok, PREFIX, cfg.arm_names, _BareFormat())
    assert (got[0] >= bare - 1e-4).all() and (got[0] - bare).max() > 0.1


class _BareFormat:
    def arm_continuations(self, name: str) -> list[str]:
        return [name]


def test_forced_agent_plays_with_the_chat_template(chat_models, hf_arch):
    from kdgap.policies.play import play

    loaded = chat_models[hf_arch]
    cfg = BanditConfig(horizon=2)
    agent = TextAgent(loaded.bridge, PaperFormat(knowing_doing=True), mode="forced",
                      max_new_tokens=6, seed=1)  # fmt: skip
    recs = play(agent, cfg, n_episodes=2, seed=0, progress=False)
    assert len(recs) == 4
    for r in recs:
        assert r.prompt.startswith("<bos>user: You are in a room with 5 buttons")
        assert r.prompt.endswith("<eos><bos>assistant:")
        assert r.valid and r.prompt.count("<bos>") == 2
        p = np.asarray(r.action_probs)
        assert p.shape == (5,) and abs(p.sum() - 1) < 1e-5 and r.action == int(p.argmax())
        assert r.completion.rstrip().endswith(cfg.arm_names[r.action].capitalize()) or (
            r.completion.rstrip().lower().endswith(cfg.arm_names[r.action])
        )
    free = TextAgent(loaded.bridge, PaperFormat(), mode="free", max_new_tokens=4, seed=1)
    recs = play(free, cfg, n_episodes=2, seed=0, progress=False)
    assert all(r.action_probs is None for r in recs)
    assert all(0 <= r.action < 5 for r in recs)


def test_raw_prompt_when_no_chat_template_is_asked_for(tiny_hf_dir):
    loaded = load_model(str(tiny_hf_dir))
    assert not getattr(loaded.tokenizer, "chat_template", None)
    agent = TextAgent(loaded.bridge, PaperFormat(use_chat_template=False), max_new_tokens=2)
    (prompt,) = _prompts(agent, BanditConfig(horizon=2))
    assert prompt.startswith("You are in a room with 5 buttons")


def test_no_chat_template_when_one_is_asked_for_is_a_clear_error(tiny_hf_dir):
    loaded = load_model(str(tiny_hf_dir))
    agent = TextAgent(loaded.bridge, PaperFormat(use_chat_template=True), max_new_tokens=2)
    with pytest.raises(ValueError, match="chat template"):
        _prompts(agent, BanditConfig(horizon=2))
    # the default (None) uses a template only when there is one: the raw prompt here
    auto = TextAgent(loaded.bridge, PaperFormat(), max_new_tokens=2)
    assert _prompts(auto, BanditConfig(horizon=2))[0].startswith("You are in a room")


def test_make_agent_works_without_a_chat_template(tiny_hf_dir, chat_models):
    """The commands' format asks for a template exactly when the tokenizer has one."""
    from kdgap.agent.prompts import format_for
    from kdgap.report.session import make_agent

    agent = make_agent(str(tiny_hf_dir), max_new_tokens=2)
    assert agent.fmt.use_chat_template is False
    assert _prompts(agent, BanditConfig(horizon=2))[0].startswith("You are in a room")
    assert format_for(chat_models["llama"]).use_chat_template is True


def _prompts(agent: TextAgent, cfg: BanditConfig) -> list[str]:
    from kdgap.envs.bandit import VectorBandit
    from kdgap.policies.play import history_of

    env = VectorBandit(cfg, 1)
    env.reset(seed=0)
    agent.reset(cfg, 0)
    return agent.prompts(history_of(env, np.arange(1)))


@pytest.fixture(scope="module")
def wordlevel_model(tmp_path_factory):
    """A GPT-2 whose WordLevel tokenizer knows lower-case colours only ([UNK] otherwise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "[UNK]", "ACTION", "=", "red", "green", "blue",
             "yellow", "Step", "Action", "Reward", "0", "1"]  # fmt: skip
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("=", "isolated")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="[UNK]")  # fmt: skip
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(words), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    path = tmp_path_factory.mktemp("wordlevel")
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return load_model(str(path))


def test_unknown_spellings_tokenise_to_unk(wordlevel_model):
    tok = wordlevel_model.tokenizer
    assert tok("red", add_special_tokens=False).input_ids == [6]
    assert tok("Red", add_special_tokens=False).input_ids == [tok.unk_token_id]
    assert tok("orange", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_arm_name_not_in_vocabulary_is_a_clear_error(wordlevel_model):
    agent = TextAgent(wordlevel_model.bridge, PaperFormat(use_chat_template=False))
    agent.reset(BanditConfig(), 0)  # 5 arms: red green blue yellow orange
    with pytest.raises(ValueError, match="orange"):
        agent.arm_logprobs(["ACTION="])


def test_unk_spellings_are_dropped_when_the_arm_has_a_known_one(wordlevel_model):
    """'Red' is [UNK]; only 'red' (and ' red', the same ids) is scored for arm red."""
    tok = wordlevel_model.tokenizer
    cfg = BanditConfig(n_arms=4)  # red green blue yellow
    agent = TextAgent(wordlevel_model.bridge, PaperFormat(use_chat_template=False))
    agent.reset(cfg, 0)
    ids, owner, _ = agent._continuations()
    assert sorted(owner) == [0, 1, 2, 3] and [tok.unk_token_id] not in ids
    got = agent.arm_logprobs(["ACTION="])[0]
    with torch.no_grad():
        pre = encode(wordlevel_model.bridge, ["ACTION="], tokenizer=tok)[0]
        logp = torch.log_softmax(wordlevel_model.bridge(torch.tensor([pre]))[0, -1], -1)
    want = logp[[tok.convert_tokens_to_ids(n) for n in cfg.arm_names]]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class _AliasFormat(PaperFormat):
    """Spells arm green as 'red ' (the tokens of red): two arms, one token sequence."""

    def arm_continuations(self, name: str) -> list[str]:
        return ["red" if name == "red" else "red "]


def test_arms_sharing_a_token_sequence_are_a_clear_error(wordlevel_model):
    agent = TextAgent(wordlevel_model.bridge, _AliasFormat(use_chat_template=False))
    agent.reset(BanditConfig(n_arms=2), 0)
    with pytest.raises(ValueError, match="share the token sequence"):
        agent.arm_logprobs(["ACTION="])
