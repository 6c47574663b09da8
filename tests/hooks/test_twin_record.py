"""Residual-stream recording on the SDPA twin equals the bridge path and run_with_cache().

Three architectures (GPT-2, Llama, Qwen-2 with tied embeddings) from local folders, on
left-padded batches of unequal lengths; and the cases that must fall back to the bridge.
"""

from __future__ import annotations

import pytest
import torch

from kdgap.hooks.recorder import Recorder
from kdgap.hooks.twin_capture import twin_plan
from kdgap.testing.texts import demo_format, demo_texts
from tests.agent.test_hf_cache import ARCHS, models  # noqa: F401  (module fixture)

SITES = ["action", "rationale.conclusion", "history.last"]


def _texts():
    texts = demo_texts(5, seed=7, min_steps=1, max_steps=9)
    assert len({len(t) for t in texts}) == len(texts)  # unequal lengths: left padding
    return texts


@pytest.mark.parametrize("arch", ARCHS)
def test_twin_recording_equals_bridge_and_cache(models, arch):  # noqa: F811
    loaded = models[arch]
    model, tok = loaded.bridge, loaded.tokenizer
    fmt, texts = demo_format(), _texts()
    hooks = "resid_pre,resid_post"
    fast = Recorder(model, fmt, hooks, SITES, tokenizer=tok, max_batch_tokens=200)
    slow = Recorder(model, fmt, hooks, SITES, tokenizer=tok, fast=False)
    assert twin_plan(model, fast.hooks) is not None  # the twin path really runs
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


def test_other_hooks_or_attached_hooks_take_the_bridge_path(models):  # noqa: F811
    model = models["llama"].bridge
    b = Recorder(model, demo_format(), "resid_post", SITES, tokenizer=models["llama"].tokenizer)
    batch = b.tokenize(_texts())
    with torch.inference_mode():  # leaves transformers' output-capturing hooks installed,
        model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    assert twin_plan(model, ["blocks.0.hook_resid_post"]) is not None  # ...which change nothing
    assert twin_plan(model, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]) is None
    assert twin_plan(model, ["blocks.0.hook_resid_mid"]) is None
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: act)]):
        assert twin_plan(model, ["blocks.0.hook_resid_post"]) is None
    assert twin_plan(models["llama"].bridge, ["blocks.9.hook_resid_post"]) is None  # 2 layers


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
    from kdgap.models.twins import native_twin

    twin = native_twin(tiny_native)
    assert twin is not None and twin_plan(tiny_native, ["blocks.1.hook_resid_post"]) is not None
    bridge_ptrs = {p.data_ptr() for p in tiny_native.original_model.parameters()}
    assert {p.data_ptr() for p in twin.parameters()} <= bridge_ptrs  # shared, not copied
    fast, slow, ref = _record_both(tiny_native, _texts())
    for k in ref:
        assert (fast[k] - slow[k]).abs().max() <= 1e-5, k
        assert (fast[k] - ref[k]).abs().max() <= 1e-5, k


def test_native_twin_follows_weights_and_mode(tiny_native):
    from kdgap.models.twins import native_twin

    lin = tiny_native.original_model.layers[0].mlp
    name = next(n for n, p in lin.named_parameters() if p.dim() == 2)
    old = dict(lin.named_parameters())[name]
    owner = lin.get_submodule(name.rsplit(".", 1)[0]) if "." in name else lin
    leaf = name.rsplit(".", 1)[-1]
    try:
        with torch.no_grad():  # a replaced tensor (load_state_dict, a new Parameter): rebuilt
            setattr(owner, leaf, torch.nn.Parameter(old.detach() * 3.0))
        twin = native_twin(tiny_native)
        assert twin is not None
        assert any(p.data_ptr() == getattr(owner, leaf).data_ptr() for p in twin.parameters())
        fast, _, ref = _record_both(tiny_native, _texts(), "resid_post")
        assert all((fast[k] - ref[k]).abs().max() <= 1e-5 for k in ref)
        tiny_native.train()
        assert native_twin(tiny_native) is None  # training mode: only the bridge forward
    finally:
        tiny_native.eval()
        setattr(owner, leaf, old)
    assert native_twin(tiny_native) is not None
