"""Residual-stream capture on the hook-free twins equals the bridge path and run_with_cache().

Every architecture of the test zoo (``ARCHS``) from local folders and a native bridge, on
left-padded batches of unequal lengths; and the cases that must fall back to the bridge.
"""

from __future__ import annotations

import torch

from kdgap.hooks.recorder import Recorder
from kdgap.hooks.twin_capture import twin_plan
from kdgap.models.twins import fast_model
from kdgap.testing.texts import demo_format, demo_texts

SITES = ["action", "rationale.conclusion", "history.last"]


def _texts():
    texts = demo_texts(5, seed=7, min_steps=1, max_steps=9)
    assert len({len(t) for t in texts}) == len(texts)  # unequal lengths: left padding
    return texts


def test_twin_recording_equals_bridge_and_cache(hf_models, hf_arch):
    loaded = hf_models[hf_arch]
    model, tok = loaded.bridge, loaded.tokenizer
    fmt, texts = demo_format(), _texts()
    hooks = "resid_pre,resid_post"
    fast = Recorder(model, fmt, hooks, SITES, tokenizer=tok, max_batch_tokens=200)
    slow = Recorder(model, fmt, hooks, SITES, tokenizer=tok, fast=False)
    # the twin path really runs wherever a twin is served (test_twins says where it is not)
    served = fast_model(model) is not model.original_model
    assert (twin_plan(model, fast.hooks) is not None) == served
    a, b = fast.record(texts), slow.record(texts)
    assert torch.equal(a.positions, b.positions)
    batch = fast.tokenize(texts)  # the recorder's own tokens (BOS rule of the model)
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    rows = torch.arange(len(texts))
    worst_bridge = worst_cache = scale = 0.0
    for h in fast.hooks:
        for j, s in enumerate(SITES):
            got = a.acts[(h, s)]
            worst_bridge = max(worst_bridge, (got - b.acts[(h, s)]).abs().max().item())
            ref = cache[h][rows, a.positions[:, j]]
            worst_cache = max(worst_cache, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    # SDPA and eager attention round differently: float32 rounding relative to the
    # activations' size (these random models, initializer_range 0.3, reach |x| ~ 50).
    tol = 1e-6 * max(1.0, scale)
    assert worst_bridge <= tol and worst_cache <= tol, (worst_bridge, worst_cache, scale)


def test_other_hooks_or_attached_hooks_take_the_bridge_path(hf_models):
    model = hf_models["llama"].bridge
    b = Recorder(model, demo_format(), "resid_post", SITES, tokenizer=hf_models["llama"].tokenizer)
    batch = b.tokenize(_texts())
    with torch.inference_mode():  # leaves transformers' output-capturing hooks installed,
        model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    assert twin_plan(model, ["blocks.0.hook_resid_post"]) is not None  # ...which change nothing
    assert twin_plan(model, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]) is None
    assert twin_plan(model, ["blocks.0.hook_resid_mid"]) is None
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: act)]):
        assert twin_plan(model, ["blocks.0.hook_resid_post"]) is None
    assert twin_plan(hf_models["llama"].bridge, ["blocks.9.hook_resid_post"]) is None  # 2 layers


def _record_both(model, texts, hooks="resid_pre,resid_post"):
    """(fast recording, bridge recording, run_with_cache sliced at the same positions)."""
    fmt = demo_format()
    fast = Recorder(model, fmt, hooks, SITES, max_batch_tokens=200)
    slow = Recorder(model, fmt, hooks, SITES, fast=False)
    a, b = fast.record(texts), slow.record(texts)
    batch = fast.tokenize(texts)
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    rows = torch.arange(len(texts))
    ref = {
        (h, s): cache[h][rows, a.positions[:, j]] for h in fast.hooks for j, s in enumerate(SITES)
    }
    return a.acts, b.acts, ref


def test_native_twin_recording_equals_bridge_and_cache(tiny_native):
    assert twin_plan(tiny_native, ["blocks.1.hook_resid_post"]) is not None
    fast, slow, ref = _record_both(tiny_native, _texts())
    for k in ref:
        assert (fast[k] - slow[k]).abs().max() <= 1e-5, k
        assert (fast[k] - ref[k]).abs().max() <= 1e-5, k


def test_native_twin_recording_follows_replaced_weights(tiny_native, tripled_mlp_weight):
    assert twin_plan(tiny_native, ["blocks.0.hook_resid_post"]) is not None  # rebuilt
    fast, _, ref = _record_both(tiny_native, _texts(), "resid_post")
    assert all((fast[k] - ref[k]).abs().max() <= 1e-5 for k in ref)
