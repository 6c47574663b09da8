"""KV-cached generation for boot_native models (kdgap.agent.native_decoding)."""

from __future__ import annotations

import torch

from kdgap.agent import native_decoding
from kdgap.agent.decoding import Decoding
from kdgap.models.tokens import encode, left_pad

PROMPTS = ["Step=0 Action=green Reward=0.3", "red", "You are in a room with 5 buttons labeled red"]


def test_native_kv_cache_equals_bridge_generate(tiny_native):
    """The cached loop must reproduce bridge.generate (no cache on native) token for token."""
    assert native_decoding.supports(tiny_native)
    tokens, mask = left_pad(encode(tiny_native, PROMPTS), 0)
    ours = native_decoding.generate(tiny_native, tokens, mask, Decoding(max_new_tokens=12))
    ref = tiny_native.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               stop_at_eos=False, verbose=False, return_type="tokens")  # fmt: skip
    assert torch.equal(ours, ref[:, tokens.shape[1] :])
    # Batched, left-padded = each prompt alone.
    for j, ids in enumerate(encode(tiny_native, PROMPTS)):
        t1, m1 = left_pad([ids], 0)
        assert torch.equal(
            native_decoding.generate(tiny_native, t1, m1, Decoding(max_new_tokens=12))[0], ours[j]
        )
