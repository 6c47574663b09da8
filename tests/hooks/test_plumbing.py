"""Hook-spec resolution, eval-mode checks and left-padded tokenisation with offsets."""

from __future__ import annotations

import pytest
import torch

from kdgap.hooks.names import HOOK_KINDS, hook_layer, resolve_hooks, stop_layer_for
from kdgap.models.runtime import model_tokenizer, prepend_bos_for, require_eval
from kdgap.models.tokens import tokenize_batch, tokenize_like_agent


def test_resolve_short_kinds_expand_over_layers(tiny_native):
    assert resolve_hooks(tiny_native, "resid_post") == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    assert resolve_hooks(tiny_native, "z", layers=[1]) == ["blocks.1.attn.hook_z"]
    got = resolve_hooks(tiny_native, "resid_pre,attn_out", layers=[0])
    assert got == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    for kind in HOOK_KINDS:  # every advertised kind exists on a real bridge
        assert len(resolve_hooks(tiny_native, kind)) == 2


def test_resolve_full_names_pass_through_and_dedupe(tiny_native):
    got = resolve_hooks(tiny_native, ["blocks.1.hook_resid_post", "resid_post", "hook_embed"])
    assert got == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "hook_embed"]


def test_resolve_errors_name_the_problem(tiny_native):
    with pytest.raises(ValueError, match="resid_psot.*resid_post"):
        resolve_hooks(tiny_native, "resid_psot")
    with pytest.raises(ValueError, match=r"layers=.*\[5\].*0\.\.1"):
        resolve_hooks(tiny_native, "resid_post", layers=[0, 5])
    with pytest.raises(ValueError, match="empty"):
        resolve_hooks(tiny_native, [])


def test_layers_and_stop_layer():
    assert hook_layer("blocks.12.attn.hook_z") == 12
    assert hook_layer("ln_final.hook_out") is None
    assert stop_layer_for(None, ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]) == 3
    assert stop_layer_for(None, ["hook_embed", "blocks.0.hook_resid_pre"]) == 1
    assert stop_layer_for(None, ["blocks.0.hook_resid_post", "ln_final.hook_out"]) is None


def test_require_eval_refuses_training_mode(tiny_native):
    require_eval(tiny_native)  # eval: fine
    tiny_native.train()
    try:
        with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
            require_eval(tiny_native, "patching")
    finally:
        tiny_native.eval()


def test_tokenize_left_pads_with_bos_and_offsets(tiny_tokenizer):
    texts = ["Step=0 Action=green Reward=0.3", "ACTION=red", "Step=1 Action=blue Reward=1\nOK"]
    b = tokenize_batch(tiny_tokenizer, texts)
    width = b.tokens.shape[1]
    for i, text in enumerate(texts):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) + 1
        assert b.lengths[i] == n and b.pad_left[i] == width - n
        assert b.attention_mask[i].tolist() == [0] * (width - n) + [1] * n
        assert b.tokens[i, width - n] == tiny_tokenizer.bos_token_id
        assert b.tokens[i, width - n + 1 :].tolist() == ids
        assert (b.offsets[i, : width - n + 1] == -1).all()  # padding and BOS cover nothing
        offs = b.offsets[i, width - n + 1 :].tolist()
        # Offsets tile the text in order, and each span decodes to its token.
        assert offs[0][0] == 0 and offs[-1][1] == len(text)
        for (s, e), tid in zip(offs, ids):
            assert text[s:e] == tiny_tokenizer.decode([tid])
    assert b.lengths.max() == width  # the longest example has no padding


def test_tokenize_without_bos_and_refuses_long_or_empty(tiny_tokenizer):
    b = tokenize_batch(tiny_tokenizer, ["red"], prepend_bos=False)
    assert tiny_tokenizer.bos_token_id not in b.tokens[0].tolist()
    with pytest.raises(ValueError, match=r"texts\[1\].*max_length=3"):
        tokenize_batch(tiny_tokenizer, ["red", "Step=0 Action=green Reward=0.3"], max_length=3)
    with pytest.raises(ValueError, match="empty"):
        tokenize_batch(tiny_tokenizer, [])


def test_model_tokenizer_and_bos_default(tiny_native, tiny_tokenizer):
    assert model_tokenizer(tiny_native, tiny_tokenizer) is tiny_tokenizer
    assert model_tokenizer(tiny_native).is_fast
    assert prepend_bos_for(tiny_native) is True and prepend_bos_for(tiny_native, False) is False

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        model_tokenizer(tiny_native, Slow())
    assert isinstance(tokenize_batch(tiny_tokenizer, ["red"]).tokens, torch.Tensor)


def test_tokenize_like_agent_follows_the_agents_bos_rule(tiny_native, tiny_tokenizer):
    from kdgap.models.tokens import encode

    bos = tiny_tokenizer.bos_token
    # A chat-templated text already starts with the BOS string: no second BOS for it,
    # while the plain text in the same batch gets one, exactly as encode() does.
    texts = ["Step=0 Action=green Reward=0.3", bos + "ACTION=red"]
    b = tokenize_like_agent(tiny_native, texts)
    want = encode(tiny_native, texts)
    assert want[0][0] == tiny_tokenizer.bos_token_id and want[1].count(want[1][0]) == 1
    for i in range(2):
        n = int(b.lengths[i])
        assert b.tokens[i, -n:].tolist() == want[i]
    assert b.offsets[0, -int(b.lengths[0])].tolist() == [-1, -1]  # prepended BOS: no text
    assert b.offsets[1, -int(b.lengths[1])].tolist() == [0, len(bos)]  # BOS from the text
    # A model that does not prepend BOS by default gets none, like the agent.
    tiny_native.cfg.default_prepend_bos = False
    try:
        plain = tokenize_like_agent(tiny_native, texts[:1])
    finally:
        tiny_native.cfg.default_prepend_bos = True
    assert (
        plain.tokens[0].tolist() == tiny_tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ValueError, match=r"ids\[0\]"):
        tokenize_batch(tiny_tokenizer, texts[:1], ids=[[1, 2, 3]])
