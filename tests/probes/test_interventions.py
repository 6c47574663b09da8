"""Steering and ablation on a tiny boot_native model (``tiny_native`` from tests/conftest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdgap.probes import ablate, arm_distribution, causal_check, steer

HOOK = "blocks.1.hook_resid_post"  # last block: only ln_final and W_U follow


@pytest.fixture(scope="module")
def batch(tiny_native):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, tiny_native.cfg.d_vocab, (6, 12), generator=g)
    positions = torch.tensor([11, 10, 11, 9, 11, 8])
    return tokens, positions, [5, 17, 29]  # three "arms"


def test_steering_along_unembedding_difference_moves_the_action(tiny_native, batch):
    """Adding alpha (W_U[:, a] - W_U[:, b]) right before ln_final raises logit_a - logit_b
    by alpha |centred difference|^2 / scale, so p(a) / p(b) grows with alpha and shrinks
    for negative alpha (closed form up to the layer norm's rescaling)."""
    tokens, pos, arms = batch
    W_U = tiny_native.W_U.detach()
    direction = W_U[:, arms[0]] - W_U[:, arms[1]]
    alphas = [-20.0, -5.0, 0.0, 5.0, 20.0]
    probs = steer(tiny_native, tokens, pos, HOOK, direction, alphas, arms)
    assert probs.shape == (5, 6, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 6))
    base = arm_distribution(tiny_native, tokens, pos, arms)
    torch.testing.assert_close(probs[2], base)  # alpha 0 is a no-op
    log_ratio = (probs[..., 0] / probs[..., 1]).log()  # [alpha, batch]
    assert (log_ratio.diff(dim=0) > 0).all()  # monotone in alpha for every example
    assert (probs[-1, :, 0] > 0.9).all() and (probs[0, :, 1] > 0.9).all()

    rep = causal_check(tiny_native, tokens, pos, HOOK, direction, arms,
                       alphas=(-20.0, 20.0), target_arm=0, decodes=True)  # fmt: skip
    assert rep.moves_action and rep.verdict == "decodes and moves the action"
    assert rep.target_shift[1] > 0.3 and rep.target_shift[0] < 0  # sign follows alpha
    assert rep.flips.max() > 0.5 and len(rep.to_frame()) == 3


def test_direction_that_does_not_move_the_action_is_reported(tiny_native, batch):
    tokens, pos, arms = batch
    W_U = tiny_native.W_U.detach()
    # orthogonal to the arms' unembeddings and to the all-ones vector (which LN removes)
    basis = torch.linalg.qr(torch.cat([W_U[:, arms], torch.ones(W_U.shape[0], 1)], 1))[0]
    v = torch.randn(W_U.shape[0], generator=torch.Generator().manual_seed(1))
    v = v - basis @ (basis.T @ v)
    rep = causal_check(tiny_native, tokens, pos, HOOK, v, arms, alphas=(-0.3, 0.3),
                       decodes=True, min_tv=0.05)  # fmt: skip
    assert not rep.moves_action and rep.verdict == "decodes but does not move the action"
    assert np.all(rep.tv < 0.05)


def test_ablation_and_errors(tiny_native, batch):
    tokens, pos, arms = batch
    direction = tiny_native.W_U.detach()[:, arms[0]]
    probs = ablate(tiny_native, tokens, pos, HOOK, direction, [[arms[0], arms[2]], arms[1]])
    assert probs.shape == (6, 2) and torch.allclose(probs.sum(-1), torch.ones(6))
    with pytest.raises(ValueError, match="arm_token_ids"):
        arm_distribution(tiny_native, tokens, pos, [5])
    with pytest.raises(ValueError, match="action_positions"):
        arm_distribution(tiny_native, tokens, torch.tensor([12] * 6), arms)
    with pytest.raises(ValueError, match="zero"):
        steer(tiny_native, tokens, pos, HOOK, torch.zeros(32), [1.0], arms)
