"""Attribution patching: first-order exactness, zero for identical runs, top-k re-check."""

from __future__ import annotations

import torch

from kdgap.hooks.attribution import attribution_sweep, verify_top_k
from kdgap.hooks.patching import LogitDiff, hook_name, patch_sweep


def _pair(vocab: int):
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(3, vocab, (2, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(3, vocab, (2,), generator=g)
    return clean, corrupt, LogitDiff.of([5, 6], [8, 9])


def test_matches_directional_derivative(tiny_native):
    # attribution[l, p] = d/de LD(a_base + e (a_src - a_base) at (l, p)) at e = 0.
    m = tiny_native
    clean, corrupt, metric = _pair(m.cfg.d_vocab)
    attr = attribution_sweep(m, clean, corrupt, metric, ("resid_pre", "mlp_out", "z"))
    _, src = m.run_with_cache(corrupt)
    for site, cell in (("resid_pre", (1, 3)), ("mlp_out", (0, 3)), ("z", (1, 6, 2))):
        name = hook_name(site, cell[0])
        src_act = src[name]

        def ld(eps, name=name, cell=cell, src_act=src_act):
            def hook(x, hook):
                x = x.clone()
                idx = (slice(None), *cell[1:])
                x[idx] = x[idx] + eps * (src_act[idx] - x[idx])
                return x

            logits = m.run_with_hooks(clean, fwd_hooks=[(name, hook)])
            return metric.at(logits, torch.arange(2))

        with torch.no_grad():
            fd = (ld(1e-3) - ld(-1e-3)) / 2e-3
        est = attr.effects[site][(slice(None), *cell)]
        assert torch.allclose(est, fd, atol=2e-3, rtol=2e-2), (site, est, fd)


def test_identical_runs_give_zero(tiny_hf_bridge):
    clean, _, metric = _pair(tiny_hf_bridge.cfg.d_vocab)
    attr = attribution_sweep(tiny_hf_bridge, clean, clean.clone(), metric)
    assert all(float(v.abs().max()) == 0.0 for v in attr.effects.values())


def test_verify_top_k_reruns_exactly(tiny_native):
    clean, corrupt, metric = _pair(tiny_native.cfg.d_vocab)
    attr = attribution_sweep(tiny_native, clean, corrupt, metric, ("attn_out",))
    check = verify_top_k(tiny_native, clean, corrupt, metric, attr, "attn_out", k=4)
    full = patch_sweep(tiny_native, clean, corrupt, metric, "attn_out", direction="noise")
    want = (full.values - full.ld_clean[:, None, None]).mean(0)[tuple(check.cells.T)]
    assert torch.allclose(check.exact, want, atol=1e-5)
    top = attr.effects["attn_out"].mean(0).abs()
    assert float(check.estimated.abs().min()) >= float(top.flatten().sort().values[-4]) - 1e-7
