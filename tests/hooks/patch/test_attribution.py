"""Attribution patching: first-order exactness, zero for identical runs, top-k re-check."""

from __future__ import annotations

import torch

from kdgap.hooks.patch.attribution import attribution_sweep, verify_top_k
from kdgap.hooks.patch.core import LogitDiff, hook_name
from kdgap.hooks.patch.sweep import patch_sweep


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


def test_equals_plain_autograd_reference(tiny_hf_bridge):
    # The sweep stops the source run early and narrows the base run's unembedding to the
    # metric's position; every cell must still equal grad . (a_src - a_base) computed the
    # plain way (full forwards, full logits, retain_grad).
    m = tiny_hf_bridge
    clean, corrupt, metric = _pair(m.cfg.d_vocab)
    sites = ("resid_pre", "attn_out", "mlp_out", "z")
    attr = attribution_sweep(m, clean, corrupt, metric, sites, direction="denoise")
    names = [hook_name(s, layer) for s in sites for layer in range(m.cfg.n_layers)]
    _, src = m.run_with_cache(clean)
    base: dict[str, torch.Tensor] = {}

    def keep(x, hook, name):
        x = x + 0.0  # a fresh non-leaf whose gradient is retained
        x.retain_grad()
        base[name] = x
        return x

    hooks = [(n, lambda x, hook, n=n: keep(x, hook, n)) for n in names]
    try:
        with torch.enable_grad():
            logits = m.run_with_hooks(corrupt, fwd_hooks=hooks)
            metric.at(logits, torch.arange(2)).sum().backward()
    finally:
        m.zero_grad(set_to_none=True)
    for s in sites:
        layer_names = [hook_name(s, layer) for layer in range(m.cfg.n_layers)]
        want = [((src[n] - base[n]) * base[n].grad).sum(-1) for n in layer_names]
        assert torch.allclose(attr.effects[s], torch.stack(want, 1).detach(), atol=1e-6), s
