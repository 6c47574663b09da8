"""The patch core: capture, the setters and their entries, on tiny models and plain tensors."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from kdgap.hooks.patch.core import capture, capture_hook, edit_at, entries, set_at

NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.hook_resid_pre"]


@pytest.fixture(params=["tiny_native", "tiny_hf_bridge"])
def model(request):
    return request.getfixturevalue(request.param)


def test_capture_equals_the_cache(model):
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    acts, got_logits = capture(model, tokens, NAMES)
    assert torch.allclose(got_logits, logits, atol=1e-5)
    for name in NAMES:
        assert torch.allclose(acts[name], cache[name], atol=1e-6), name
    # Stopping after the last block a hook needs changes none of the captured values.
    last, none = capture(model, tokens, NAMES[:1], select=lambda a: a[:, -1], logits=False)
    assert none is None and torch.equal(last[NAMES[0]], acts[NAMES[0]][:, -1])


def test_capture_hook_binds_the_requested_key_and_calls_then():
    store, calls = {}, []
    hook = capture_hook(store, "wanted", lambda a: a * 2, then=lambda: calls.append(len(store)))
    x = torch.ones(2, 3)
    assert hook(x, hook=None) is None  # the activation itself is left alone
    assert torch.equal(store["wanted"], 2 * x) and calls == [1]


def test_set_at_copies_the_masked_entries_from_their_source_rows():
    act, src = torch.zeros(3, 4, 2), torch.arange(24.0).reshape(3, 4, 2)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    index, src_index = entries(torch.tensor([2, 0]), torch.tensor([1, 1]), mask)
    out = set_at(act, None, index=index, src=src, src_index=src_index)
    want = torch.zeros(3, 4, 2)
    want[2, 0], want[2, 3], want[0, 1] = src[1, 0], src[1, 3], src[1, 1]
    assert out is act and torch.equal(out, want)  # in place


def test_edit_at_in_place_or_on_a_copy():
    act = torch.ones(2, 3, 4)
    index = (torch.tensor([0, 1]), torch.tensor([2, 0]))
    hook = partial(edit_at, index=index, fn=lambda x: x + 1, copy=True)
    out = hook(act, hook=None)
    assert torch.equal(act, torch.ones(2, 3, 4))  # the copy leaves the input alone
    assert out[0, 2].eq(2).all() and out[1, 0].eq(2).all() and out.sum() == 24 + 8
    edit_at(act, None, index=index, fn=lambda x: x + 1)
    assert torch.equal(act, out)
