"""Mediation: closed-form bootstrap ratio, and exact identities on an untrained organism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.patch.mediation import flip_mediation, mediation, ratio_ci
from kdgap.hooks.patch.pairs import make_pair, tokenize_pairs
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.transcript import OrganismFormat

CFG, FMT = BanditConfig(n_arms=5, horizon=20), OrganismFormat()
STEPS = [
    ([0, 1, 0, 2, 0], [1, 0, 1, 0, 0], "red 3 2 green 1 0 blue 1 0 yellow 0 0 orange 0 0 ucb blue"),
    ([3, 3, 1], [1, 0, 1], "red 0 0 green 1 1 blue 0 0 yellow 2 1 orange 0 0 ucb red"),
    ([4, 0, 4, 2], [1, 1, 0, 0], "red 1 1 green 0 0 blue 1 0 yellow 0 0 orange 2 1 ucb green"),
]  # fmt: skip


@pytest.fixture(scope="module")
def organism():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    tok = OrganismLanguage(n_arms=5, horizon=20).build_tokenizer()
    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_layers=2, n_ctx=64, n_heads=4, d_mlp=64,
        d_vocab=len(tok), act_fn="gelu", normalization_type="LN", seed=1,
    )  # fmt: skip
    return TransformerBridge.boot_native(cfg).eval(), tok


def test_ratio_ci_closed_form():
    num, den = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    point, ci = ratio_ci(num, den, n_boot=200)
    assert point == pytest.approx(0.5) and ci == pytest.approx([0.5, 0.5])  # constant ratio
    point, ci = ratio_ci(np.array([0.0, 2.0]), np.array([1.0, 1.0]), n_boot=2000)
    assert point == pytest.approx(1.0) and ci[0] == 0.0 and ci[1] == 2.0
    with pytest.raises(ZeroDivisionError, match="total effect is 0"):
        ratio_ci(num, np.zeros(3))


def test_conclusion_edits_fully_mediated_by_rationale(organism):
    # A conclusion edit changes only rationale tokens, and the rationale runs up to the
    # receiver: the all-layer path through it carries the whole effect, in any model.
    model, tok = organism
    pairs = [make_pair("conclusion", FMT, CFG, a, r, c) for a, r, c in STEPS]
    res = mediation(model, pairs, tok, FMT, n_boot=200)
    assert res.fraction == pytest.approx(1.0, abs=1e-4)
    assert res.fraction_ci == pytest.approx((1.0, 1.0), abs=1e-4)
    assert np.allclose(res.path_effect, res.total_effect, atol=1e-5)
    assert res.layer_fraction.shape == (2,) and res.layer_ci.shape == (2, 2)
    assert "mediated by rationale" in res.summary()
    # The unchanged history carries nothing of a conclusion edit.
    hist = mediation(model, pairs, tok, FMT, senders="history", n_boot=50)
    assert hist.fraction == pytest.approx(0.0, abs=1e-4)


def test_history_edits_and_errors(organism):
    model, tok = organism
    pairs = [make_pair("history", FMT, CFG, a, r, c) for a, r, c in STEPS]
    res = mediation(model, pairs, tok, FMT, senders="history", n_boot=50)
    assert np.isfinite(res.fraction) and res.layer_effect.shape == (3, 2)
    with pytest.raises(ValueError, match="senders="):
        mediation(model, pairs, tok, FMT, senders="everything")
    with pytest.raises(ValueError, match="pairs is empty"):
        mediation(model, [], tok, FMT)


def test_ratio_ci_cluster_bootstrap_resamples_whole_episodes():
    num, den = np.array([1.0, 1.0, 3.0, 3.0]), np.ones(4)
    point, ci = ratio_ci(num, den, n_boot=2000, groups=[7, 7, 9, 9], level=0.8)
    # Two clusters: every resample is 1, 2 or 3 (p = 1/4, 1/2, 1/4): the 80% CI is [1, 3].
    assert point == pytest.approx(2.0) and ci.tolist() == [1.0, 3.0]
    _, pair_ci = ratio_ci(num, den, n_boot=2000, level=0.8)
    assert pair_ci[1] - pair_ci[0] < ci[1] - ci[0]  # pairs look more independent than they are
    with pytest.raises(ValueError, match="one per pair"):
        ratio_ci(num, den, groups=[0, 1])


def test_flip_mediation_skips_pairs_without_a_preferred_action(organism):
    model, tok = organism
    pairs = [make_pair("conclusion", FMT, CFG, a, r, c) for a, r, c in STEPS]
    swapped = [replace(p, arm_a=p.arm_b, arm_b=p.arm_a) for p in pairs]
    both = flip_mediation(model, pairs + swapped, tok, FMT, n_boot=50)
    # Exactly one of (a, b) and (b, a) has LD_clean > 0 in each pair.
    assert both["n_pairs"] == 3 and both["n_skipped"] == 3
    # Conclusion edits: the all-layer rationale path is the whole effect in any model.
    assert both["fraction"] == pytest.approx(both["total_fraction"], abs=1e-4)
    with pytest.raises(ValueError, match="LD_clean <= 0"):
        flip_mediation(model, [q for q in pairs + swapped if _ld(model, tok, q) <= 0], tok, FMT)


def _ld(model, tok, pair):
    (g,) = tokenize_pairs([pair], tok, FMT)
    with torch.no_grad():
        return float(g.metric.at(model(g.clean_tokens), torch.arange(1))[0])
