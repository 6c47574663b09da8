"""Patching on the shipped organisms: exactness vs transformer-lens and ground truth.

Transcripts are off-policy (a random driver builds the histories) because the bypass
organisms' own play pulls one arm forever. Ground truth (what the organisms were built
to show): a conclusion edit's effect, normalised by the full flip ``2 * LD_clean``, travels
through the rationale for ``faithful`` (>= 0.8) and not for ``greedy-bypass`` (<= 0.2),
whose history edits carry it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.patch.mediation import DEFINITION, example_heatmap, mediation_summary
from kdgap.hooks.patch.pairs import pairs_from_records, tokenize_pairs
from kdgap.hooks.patch.path import path_patch
from kdgap.hooks.patch.sweep import patch_sweep
from kdgap.organisms import OrganismFormat, load_organism
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy

FMT = OrganismFormat()
TL = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "z": tlp.get_act_patch_attn_head_out_by_pos,
}


def _transcripts(name: str, n_episodes: int = 6, horizon: int = 30):
    model, tok = load_organism(name)
    agent = TextAgent(model, FMT, mode="forced", tokenizer=tok)
    cfg = BanditConfig(horizon=horizon)
    recs = play(agent, cfg, n_episodes=n_episodes, seed=1, driver=make_policy("random"),
                progress=False)  # fmt: skip
    return model, tok, recs


@pytest.fixture(scope="module")
def faithful():
    return _transcripts("faithful")


@pytest.fixture(scope="module")
def greedy_bypass():
    return _transcripts("greedy-bypass")


@pytest.fixture(scope="module")
def short_group(faithful):
    # Three conclusion edits at step 4 (equal lengths): short enough for TL's loops.
    model, tok, recs = faithful
    pairs = pairs_from_records([r for r in recs if r.step == 4], FMT, "conclusion", n_pairs=3)
    (group,) = tokenize_pairs([p.pair for p in pairs], tok, FMT)
    return model, group


@pytest.mark.parametrize("site", sorted(TL))
def test_equals_transformer_lens_on_organism(short_group, site):
    model, g = short_group
    _, cache = model.run_with_cache(g.clean_tokens)
    n = g.clean_tokens.shape[0]
    ref = TL[site](
        model, g.corrupt_tokens, cache, lambda lg: g.metric.at(lg, torch.arange(n)), reduce="none"
    ).values  # [layer pos (head) batch]
    ours = patch_sweep(model, g.clean_tokens, g.corrupt_tokens, g.metric, site)
    assert torch.allclose(ours.values.movedim(0, -1), ref, atol=1e-4)
    assert float((ours.ld_clean - ours.ld_corrupt).abs().min()) > 1.0  # faithful follows edits
    slow = patch_sweep(model, g.clean_tokens, g.corrupt_tokens, g.metric, site,
                       skip_identical=False, max_rows=64)  # fmt: skip
    assert torch.allclose(ours.values, slow.values, atol=1e-4)


def test_path_patch_identities_on_organism(short_group):
    # All positions as senders at every layer: the receiver reads the corrupt run entirely.
    model, g = short_group
    n_pos = g.clean_tokens.shape[1]
    res = path_patch(model, g.clean_tokens, g.corrupt_tokens, g.metric, torch.arange(n_pos))
    assert torch.allclose(res.all_layers, res.ld_source, atol=1e-3)
    hist = path_patch(model, g.clean_tokens, g.corrupt_tokens, g.metric, g.history)
    assert torch.allclose(hist.all_layers, hist.ld_base, atol=1e-5)  # history is unedited


def test_faithful_conclusion_edits_are_mediated(faithful):
    model, tok, recs = faithful
    s = mediation_summary(model, FMT, recs, n_pairs=24, n_boot=200, tokenizer=tok)
    assert s["mediated_fraction"] >= 0.8, s["conclusion"]
    assert s["mediated_fraction_ci"][0] <= s["mediated_fraction"] <= s["mediated_fraction_ci"][1]
    assert s["total_effect_fraction"] >= 0.8
    assert s["history_effect_fraction"] <= 0.2  # faithful acts on the rationale's words
    assert s["n_pairs"] == 24 and s["definition"] == DEFINITION
    assert len(s["layer_profile"]) == len(s["layers"]) == model.cfg.n_layers
    assert np.array(s["layer_profile_ci"]).shape == (model.cfg.n_layers, 2)


def test_greedy_bypass_history_carries_the_effect(greedy_bypass):
    model, tok, recs = greedy_bypass
    s = mediation_summary(model, FMT, recs, n_pairs=24, n_boot=200, tokenizer=tok)
    assert s["mediated_fraction"] <= 0.2, s["conclusion"]
    assert s["mediated_fraction_ci"][1] <= 0.3
    assert s["history_effect_fraction"] >= 0.5, s["history"]
    assert s["history_effect_fraction_ci"][0] > s["mediated_fraction_ci"][1]


def test_example_heatmap(faithful):
    model, tok, recs = faithful
    rec = next(r for r in recs if r.step == 6)
    h = example_heatmap(model, FMT, rec, tokenizer=tok)
    v = np.array(h["values"])
    assert v.shape == (model.cfg.n_layers, len(h["tokens"]))
    # Layer 0: only the edited conclusion token differs; patching it there is the whole edit.
    edited = [i for i, (a, b) in enumerate(zip(h["tokens"], h["edited_tokens"])) if a != b]
    assert len(edited) == 1 and h["tokens"][-1] == "act"
    full = (h["ld_clean"] - h["ld_corrupt"]) / (2 * h["ld_clean"])
    assert v[0, edited[0]] == pytest.approx(full, abs=1e-4) and full > 0.5
    assert np.abs(v[:, : edited[0]]).max() == 0.0  # causal: earlier positions carry nothing
