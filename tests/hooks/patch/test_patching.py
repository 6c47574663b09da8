"""Batched patching equals transformer_lens.patching exactly, plus invariants and errors."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tlp

from kdgap.hooks.patch.core import LogitDiff
from kdgap.hooks.patch.sweep import patch_sweep

TL = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "z": tlp.get_act_patch_attn_head_out_by_pos,
}


def _pair(vocab: int, batch: int = 3, n_pos: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (batch, n_pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(3, vocab, (batch,), generator=g)
    metric = LogitDiff.of([5, 6, 7][:batch], [8, 9, 10][:batch])
    return clean, corrupt, metric


@pytest.fixture(params=["tiny_native", "tiny_hf_bridge"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("site", sorted(TL))
def test_equals_transformer_lens(model, site):
    clean, corrupt, metric = _pair(model.cfg.d_vocab)
    _, cache = model.run_with_cache(clean)
    ref = TL[site](
        model, corrupt, cache, lambda lg: metric.at(lg, torch.arange(3)), reduce="none"
    ).values  # [layer pos (head) batch]
    ours = patch_sweep(model, clean, corrupt, metric, site, max_rows=5)
    assert torch.allclose(ours.values.movedim(0, -1), ref, atol=1e-4)
    assert ours.values.std() > 1e-3  # the sweep is not trivially constant


def test_noising_equals_transformer_lens_with_roles_swapped(model):
    clean, corrupt, metric = _pair(model.cfg.d_vocab)
    _, cache = model.run_with_cache(corrupt)
    ref = tlp.get_act_patch_resid_pre(
        model, clean, cache, lambda lg: metric.at(lg, torch.arange(3)), reduce="none"
    ).values
    ours = patch_sweep(model, clean, corrupt, metric, "resid_pre", direction="noise")
    assert torch.allclose(ours.values.movedim(0, -1), ref, atol=1e-4)


def test_invariants(model):
    clean, corrupt, metric = _pair(model.cfg.d_vocab)
    last = model.cfg.n_layers - 1
    den = patch_sweep(model, clean, corrupt, metric, "resid_pre")
    # Layer 0: only the edited position differs, so patching it recovers clean exactly,
    # and patching any other position changes nothing.
    assert torch.allclose(den.values[:, 0, 2], den.ld_clean, atol=1e-4)
    assert torch.allclose(den.values[:, 0, 0], den.ld_corrupt, atol=1e-4)
    norm = den.normalised()
    assert norm[0, 2] == pytest.approx(1.0, abs=1e-4) and norm[0, 0] == pytest.approx(0, abs=1e-4)
    # The last position's residual after its last attention decides the logits: patching
    # resid_mid there patches the residual stream itself (not only the ln2 input; note
    # transformer-lens 4.3 clones under grad, so its resid_mid patch reaches only ln2).
    for site in ("resid_post", "resid_mid"):
        r = patch_sweep(model, clean, corrupt, metric, site, direction="noise", cells=[[last, 6]])
        assert torch.allclose(r.values[:, 0], r.ld_corrupt, atol=1e-4)
    # Growing the batch at each layer is exact: same numbers as full recomputation.
    for site in ("resid_mid", "z"):
        a = patch_sweep(model, clean, corrupt, metric, site, max_rows=4, grow=True)
        b = patch_sweep(model, clean, corrupt, metric, site, max_rows=64, grow=False)
        assert torch.allclose(a.values, b.values, atol=1e-5)


def test_errors(tiny_native):
    clean, corrupt, metric = _pair(tiny_native.cfg.d_vocab)
    with pytest.raises(ValueError, match="share a token"):
        LogitDiff.of([5, 6], [5, 7])
    with pytest.raises(ValueError, match=r"prompts \[1\]"):
        LogitDiff.of([[1, 2], [3, 4]], [[5], [6, 3]])
    with pytest.raises(ValueError, match="corrupt_tokens"):
        patch_sweep(tiny_native, clean, corrupt[:, :-1], metric)
    with pytest.raises(ValueError, match="site='hook_foo'"):
        patch_sweep(tiny_native, clean, corrupt, metric, "hook_foo")
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(tiny_native, clean, corrupt, metric, direction="sideways")
    tiny_native.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            patch_sweep(tiny_native, clean, corrupt, metric)
    finally:
        tiny_native.eval()


def test_an_arm_of_several_tokens_reads_as_its_log_probability_mass():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    metric = LogitDiff.of([[1, 2], [3]], [[4], [5, 6]], [-1, 1])
    got = metric.at(logits, torch.arange(2))
    a, b = logits[0, -1], logits[1, 1]
    want = torch.stack([torch.logsumexp(a[[1, 2]], 0) - a[4],
                        b[3] - torch.logsumexp(b[[5, 6]], 0)])  # fmt: skip
    torch.testing.assert_close(got, want)
    # The log-sum-exp differs from the log-probability difference only by the shared
    # normaliser: the metric is log p(arm A) - log p(arm B).
    lp = torch.log_softmax(a, 0)
    assert got[0].item() == pytest.approx((torch.logsumexp(lp[[1, 2]], 0) - lp[4]).item(), abs=1e-5)
    one = LogitDiff.of([7, 8], [9, 10], -1).at(logits, torch.arange(2))  # one id: exact
    assert torch.equal(one, logits[:, -1, 7:9].diagonal() - logits[:, -1, 9:11].diagonal())
