"""The suffix engine (rows from their layer and position on, prefix keys reused) gives the
bridge engine's numbers on every site it takes, and transformer-lens's where TL has a sweep."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tlp

from kdgap.hooks.patch.core import LogitDiff
from kdgap.hooks.patch.suffix import SUFFIX_SITES, native_model
from kdgap.hooks.patch.sweep import patch_sweep


@pytest.fixture(scope="module")
def rotary_gqa():
    """A native bridge with rotary positions and grouped keys (2 kv heads for 4 heads), RMS
    norms, a gated MLP and soft-capped scores: every branch the suffix blocks reproduce."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_layers=3, n_ctx=64, n_heads=4, n_key_value_heads=2, d_mlp=48,
        d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, attn_scores_soft_cap=30.0, seed=3,
    )  # fmt: skip
    model = TransformerBridge.boot_native(cfg).eval()
    with torch.no_grad():  # boot_native's init is tiny: give the activations some size
        for p in model.original_model.parameters():
            if p.ndim > 1:
                p.mul_(8.0)
    return model


def _pair(vocab: int, batch: int = 3, n_pos: int = 9, edit: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (batch, n_pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, edit] = clean[:, edit] + 1 + torch.randint(0, vocab - 4, (batch,), generator=g)
    corrupt[:, edit] = 3 + (corrupt[:, edit] - 3) % (vocab - 3)
    return clean, corrupt


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", ["tiny_native", "rotary_gqa"])
def test_suffix_engine_equals_bridge_engine_on_every_site(request, name, direction):
    model = request.getfixturevalue(name)
    clean, corrupt = _pair(model.cfg.d_vocab)
    # Per-prompt metric positions, one of them before the last token: rows patched after
    # their prompt's metric position cannot change it.
    metric = LogitDiff.of([5, 6, 7], [8, 9, 10], position=[-1, 6, 8])
    for site in SUFFIX_SITES:
        assert native_model(model, site) is not None
        kw = dict(direction=direction, max_rows=4)
        fast = patch_sweep(model, clean, corrupt, metric, site, engine="native", **kw)
        slow = patch_sweep(model, clean, corrupt, metric, site, engine="bridge", **kw)
        assert torch.allclose(fast.values, slow.values, atol=1e-4), site
        assert torch.allclose(fast.ld_clean, slow.ld_clean, atol=1e-5)
        assert torch.allclose(fast.ld_corrupt, slow.ld_corrupt, atol=1e-5)
        assert fast.values.std() > 1e-3
        # Prompt 1 reads its metric at position 6: patches at 7 and 8 change nothing.
        base = fast.ld_corrupt if direction == "denoise" else fast.ld_clean
        assert torch.equal(fast.values[1, :, 7:], base[1].expand(model.cfg.n_layers, 2))


def test_suffix_engine_equals_transformer_lens_with_rotary_and_grouped_keys(rotary_gqa):
    clean, corrupt = _pair(rotary_gqa.cfg.d_vocab)
    metric = LogitDiff.of([5, 6, 7], [8, 9, 10])
    _, cache = rotary_gqa.run_with_cache(clean)
    ref = tlp.get_act_patch_resid_pre(
        rotary_gqa, corrupt, cache, lambda lg: metric.at(lg, torch.arange(3)), reduce="none"
    ).values
    ours = patch_sweep(rotary_gqa, clean, corrupt, metric, "resid_pre", engine="native")
    assert torch.allclose(ours.values.movedim(0, -1), ref, atol=1e-4)


def test_explicit_cells_and_chunks_do_not_change_numbers(rotary_gqa):
    clean, corrupt = _pair(rotary_gqa.cfg.d_vocab)
    metric = LogitDiff.of([5, 6, 7], [8, 9, 10])
    full = patch_sweep(rotary_gqa, clean, corrupt, metric, "mlp_out", engine="native")
    cells = torch.tensor([[2, 8], [0, 3], [1, 5], [0, 4]])
    some = patch_sweep(rotary_gqa, clean, corrupt, metric, "mlp_out", cells=cells,
                       engine="native", max_rows=1)  # fmt: skip
    assert torch.allclose(some.values, full.values[:, cells[:, 0], cells[:, 1]], atol=1e-5)


def test_suffix_engine_refuses_what_it_cannot_run(tiny_native, tiny_hf_bridge):
    clean, corrupt = _pair(50)
    metric = LogitDiff.of([5, 6, 7], [8, 9, 10])
    with pytest.raises(ValueError, match="engine='native' needs a causal native bridge"):
        patch_sweep(tiny_hf_bridge, clean, corrupt, metric, engine="native")
    with pytest.raises(ValueError, match=r"sites=\[.z.\]"):
        patch_sweep(tiny_native, clean, corrupt, metric, "z", engine="native")
    with pytest.raises(ValueError, match="engine='fast' is unknown"):
        patch_sweep(tiny_native, clean, corrupt, metric, engine="fast")
    # A hook on the model: the suffix engine would not run it, so auto takes the bridge.
    handle = tiny_native.blocks[0].hook_in.add_hook(lambda x, hook: x)
    try:
        assert native_model(tiny_native, "resid_pre") is None
    finally:
        tiny_native.reset_hooks()
        del handle


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_native_attribution_equals_the_bridge_hooks(rotary_gqa, direction):
    from kdgap.hooks.patch.attribution import attribution_sweep

    clean, corrupt = _pair(rotary_gqa.cfg.d_vocab)
    metric = LogitDiff.of([5, 6, 7], [8, 9, 10], position=[-1, 6, 8])
    sites = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    fast = attribution_sweep(rotary_gqa, clean, corrupt, metric, sites, direction=direction,
                             engine="native")  # fmt: skip
    slow = attribution_sweep(rotary_gqa, clean, corrupt, metric, sites, direction=direction,
                             engine="bridge")  # fmt: skip
    assert torch.allclose(fast.ld_base, slow.ld_base, atol=1e-5)
    for s in sites:
        assert fast.effects[s].abs().max() > 1e-3
        assert torch.allclose(fast.effects[s], slow.effects[s], atol=1e-4, rtol=1e-3), s
