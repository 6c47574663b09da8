"""Path patching: closed-form identities on tiny models (native and Hugging Face GPT-2)."""

from __future__ import annotations

import pytest
import torch

from kdgap.hooks.patch.core import LogitDiff
from kdgap.hooks.patch.path import path_patch
from kdgap.hooks.patch.sweep import patch_sweep


@pytest.fixture(params=["tiny_native", "tiny_hf_bridge"])
def model(request):
    return request.getfixturevalue(request.param)


def _pair(vocab: int):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, vocab, (3, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:4] = torch.randint(3, vocab, (3, 2), generator=g)
    return clean, corrupt, LogitDiff.of([5, 6, 7], [8, 9, 10])


def test_all_senders_all_layers_recovers_source(model):
    # Receiver token unchanged, every position a sender, every layer patched: the receiver
    # reads exactly the corrupt keys/values everywhere, so it ends up as in the corrupt run.
    clean, corrupt, metric = _pair(model.cfg.d_vocab)
    res = path_patch(model, clean, corrupt, metric, torch.arange(8))
    assert torch.allclose(res.all_layers, res.ld_source, atol=1e-4)
    assert (res.ld_source - res.ld_base).abs().min() > 1e-3  # the edit matters


def test_layer0_path_equals_attn_out_patch_at_receiver(model):
    # At layer 0 keys/values differ only at the edited positions, so patching them for the
    # receiver equals patching the receiver's whole layer-0 attention output.
    clean, corrupt, metric = _pair(model.cfg.d_vocab)
    res = path_patch(model, clean, corrupt, metric, [2, 3])
    ref = patch_sweep(model, clean, corrupt, metric, "attn_out", direction="noise", cells=[[0, 7]])
    assert torch.allclose(res.per_layer[:, 0], ref.values[:, 0], atol=1e-4)
    # Senders before the edit are identical in both runs (causal): they carry nothing.
    early = path_patch(model, clean, corrupt, metric, [0, 1])
    assert torch.allclose(early.all_layers, early.ld_base, atol=1e-5)
    # A later unedited sender differs only from layer 1 on (it read the edit at layer 0).
    later = path_patch(model, clean, corrupt, metric, [5])
    assert torch.allclose(later.per_layer[:, 0], later.ld_base, atol=1e-5)


def test_chunking_does_not_change_numbers(tiny_native):
    clean, corrupt, metric = _pair(tiny_native.cfg.d_vocab)
    a = path_patch(tiny_native, clean, corrupt, metric, [2, 3], max_rows=2)
    b = path_patch(tiny_native, clean, corrupt, metric, [2, 3], max_rows=100, direction="noise")
    assert torch.allclose(a.per_layer, b.per_layer, atol=1e-5)


def test_errors(tiny_native):
    clean, corrupt, metric = _pair(tiny_native.cfg.d_vocab)
    with pytest.raises(ValueError, match="senders select no position"):
        path_patch(tiny_native, clean, corrupt, metric, torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="corrupt_tokens"):
        path_patch(tiny_native, clean, corrupt[:, :5], metric, [2])
