"""Hook-free twins (kdgap.models.twins): shared tensors, verified, rebuilt, withheld.

The SDPA twin of a Hugging Face model shares the bridge's tensors, is cached, is rebuilt
when a parameter tensor is replaced, is refused when its logits disagree with the
bridge's, and falls back in training mode or when a tensor only the wrapped model reads is
edited; the native twin of a ``boot_native`` bridge follows the same rules. Where a twin
is refused, generation and scoring still equal the bridge path.
"""

from __future__ import annotations

import torch

from kdgap.agent.generation import generate, score_continuations
from kdgap.models import twins
from kdgap.models.twins import native_twin

PROMPTS = [
    "Step=0 Action=red Reward=1\nStep=1 Action=blue",
    "You are in a room",
    "ACTION= the quick brown fox jumps over the unknown mean of green",
]
SPELLINGS = ["red", " red", "Red", " Red", "orange", " Orange", "yellow", " green"]
#: Architectures with no SDPA twin: Gemma-2 soft-caps attention logits, which only eager
#: attention computes, so the wrapped model must be served.
NO_TWIN = ("gemma2",)


def test_twin_shares_the_bridge_tensors_and_uses_sdpa(hf_models, hf_arch):
    bridge = hf_models[hf_arch].bridge
    twin = twins.fast_model(bridge)
    if hf_arch in NO_TWIN:
        assert twin is bridge.original_model  # withheld: the eager model runs
        assert bridge.original_model.config._attn_implementation == "eager"
        return
    assert twin is not bridge.original_model
    assert twin.config._attn_implementation == "sdpa"
    assert bridge.original_model.config._attn_implementation == "eager"  # untouched
    ptrs = {p.data_ptr() for p in bridge.original_model.parameters()}
    assert all(p.data_ptr() in ptrs for p in twin.parameters())
    assert twins.fast_model(bridge) is twin  # cached


def test_replaced_parameter_rebuilds_the_twin(hf_models):
    bridge = hf_models["gpt2"].bridge
    twin = twins.fast_model(bridge)
    hf = bridge.original_model
    name, p = next((n, p) for n, p in hf.named_parameters() if p.ndim == 2)
    mod_name, leaf = name.rsplit(".", 1)
    mod = hf.get_submodule(mod_name)
    old = p
    try:
        setattr(mod, leaf, torch.nn.Parameter(p.detach().clone() * 1.5))
        again = twins.fast_model(bridge)
        assert again is not twin
        ptrs = {q.data_ptr() for q in hf.parameters()}
        assert all(q.data_ptr() in ptrs for q in again.parameters())
        P = PROMPTS[:2]
        torch.testing.assert_close(score_continuations(bridge, P, SPELLINGS),
                                   score_continuations(bridge, P, SPELLINGS, fast=False),
                                   rtol=0, atol=2e-4)  # fmt: skip
    finally:
        setattr(mod, leaf, old)
    assert twins.fast_model(bridge) is not None


def test_no_twin_when_it_would_disagree(hf_models, monkeypatch):
    """A twin whose logits differ from the bridge's is refused: the wrapped model runs."""
    bridge = hf_models["qwen2"].bridge
    twins._TWINS.pop(bridge, None)
    monkeypatch.setattr(twins, "_agrees", lambda bridge, twin: False)
    assert twins.fast_model(bridge) is bridge.original_model
    P = PROMPTS[:2]
    torch.testing.assert_close(score_continuations(bridge, P, SPELLINGS),
                               score_continuations(bridge, P, SPELLINGS, fast=False),
                               rtol=0, atol=2e-4)  # fmt: skip
    gen = generate(bridge, PROMPTS, max_new_tokens=8)
    assert gen.token_ids == generate(bridge, PROMPTS, max_new_tokens=8,
                                     fast=False).token_ids  # fmt: skip
    twins._TWINS.pop(bridge, None)


def test_training_mode_and_edited_unused_tensors_fall_back(hf_models):
    bridge = hf_models["gpt2"].bridge
    twin = twins.fast_model(bridge)
    assert twin is not bridge.original_model
    bridge.train()
    try:
        assert twins.fast_model(bridge) is None
    finally:
        bridge.eval()
    twins._TWINS[bridge] = (*twins._TWINS[bridge][:2], [torch.ones(1)])  # set in place
    try:
        assert twins.fast_model(bridge) is bridge.original_model
    finally:
        twins._TWINS.pop(bridge, None)
    assert twins.fast_model(bridge) is not bridge.original_model


def test_native_twin_shares_the_bridge_tensors(tiny_native):
    twin = native_twin(tiny_native)
    assert twin is not None
    bridge_ptrs = {p.data_ptr() for p in tiny_native.original_model.parameters()}
    assert {p.data_ptr() for p in twin.parameters()} <= bridge_ptrs  # shared, not copied


def test_native_twin_follows_weights_and_mode(tiny_native, tripled_mlp_weight):
    owner, leaf = tripled_mlp_weight  # a replaced tensor (load_state_dict, a new Parameter)
    twin = native_twin(tiny_native)  # rebuilt
    assert twin is not None
    assert any(p.data_ptr() == getattr(owner, leaf).data_ptr() for p in twin.parameters())
    try:
        tiny_native.train()
        assert native_twin(tiny_native) is None  # training mode: only the bridge forward
    finally:
        tiny_native.eval()
    assert native_twin(tiny_native) is not None
