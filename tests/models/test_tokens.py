"""The one tokenisation rule (kdgap.models.tokens): BOS, left padding, character offsets."""

from __future__ import annotations

import copy

import pytest

from kdgap.models.tokens import (
    arm_spellings,
    arm_token_ids,
    encode,
    left_pad,
    tokenize_batch,
    tokenize_like_agent,
)
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.transcript import OrganismFormat


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


def test_tokenize_like_agent_follows_the_agents_bos_rule(tiny_native, tiny_tokenizer):
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


def test_encode_prepends_one_bos_and_never_doubles_it(tiny_native, tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    plain = tiny_tokenizer("red green", add_special_tokens=False)["input_ids"]
    ids = encode(tiny_native, ["red green", "<bos>red green"])
    assert ids[0] == [bos, *plain] and ids[1] == [bos, *plain]
    with pytest.raises(TypeError, match="one string"):
        encode(tiny_native, "red")


def test_left_pad_layout():
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)


def test_tokenizer_override_does_not_touch_model(tiny_native, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    assert encode(tiny_native, ["red"], tokenizer=tok) == encode(tiny_native, ["red"])


class _Spellings:
    """A format stub: only ``arm_continuations`` matters for arm tokens."""

    name = "stub"

    def __init__(self, spellings):
        self.spellings = spellings

    def arm_continuations(self, arm_name):
        return self.spellings[arm_name]


def test_arm_tokens_come_from_every_spelling(tiny_tokenizer):
    fmt = _Spellings({"red": ["red", " red", "red"], "blue": ["", "blue"]})
    spellings = arm_spellings(tiny_tokenizer, fmt, ["red", "blue"])
    first = [tiny_tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in ("red", " red")]
    assert [v for v, _ in spellings[0]] == ["red", " red", "red"] and spellings[1][0] == ("", [])
    assert arm_token_ids(tiny_tokenizer, fmt, ["red", "blue"])[0] == sorted(set(first))
    with pytest.raises(ValueError, match="arm 'none'"):
        arm_token_ids(tiny_tokenizer, _Spellings({"none": [""]}), ["none"])


def test_an_organism_arm_is_one_token():
    tok = OrganismLanguage(n_arms=5, horizon=20).build_tokenizer()
    assert arm_token_ids(tok, OrganismFormat(), ["green"]) == [[tok.convert_tokens_to_ids("green")]]
