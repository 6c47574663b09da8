"""Training (loss falls, exact resume), saving and loading organism folders."""

import json

import numpy as np
import pytest
import torch

import kdgap.organisms.train as train_mod
from kdgap.agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.organisms.data import DataConfig
from kdgap.organisms.mechanisms import MECHANISMS
from kdgap.organisms.registry import load_organism, resolve_organism
from kdgap.organisms.train import TrainConfig, lr_at, train_organism
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.play import play

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_mlp=64, batch_size=32, chunk=256,
            eval_samples=64, data=DataConfig(horizon=6))  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = TrainConfig(samples=32 * 60, eval_every=20, ckpt_every=20, lr=3e-3, **TINY)
    out = tmp_path_factory.mktemp("org") / "faithful-tiny"
    train_organism(MECHANISMS["faithful"], out, seed=0, config=cfg, progress=False)
    return out, cfg


def test_short_training_run_reduces_the_loss(trained):
    out, _ = trained
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve] == [20, 40, 60]
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"]
    assert not (out / "train_state.pt").exists()  # removed once finished


def test_organism_folder_loads_in_eval_mode_without_network(trained):
    out, _ = trained
    model, tok = load_organism(out)
    assert not model.training
    assert resolve_organism(f"organism:{out}") == out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mechanism"] == "faithful" and cfg["language"]["horizon"] == 6
    toks = model.to_tokens("red1 green0 think")
    assert toks[0, 0].item() == tok.bos_token_id and toks.shape == (1, 4)
    assert model(toks).shape == (1, 4, len(tok))


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = TrainConfig(samples=32 * 12, eval_every=4, ckpt_every=4, **TINY)
    straight = train_organism(MECHANISMS["greedy-bypass"], tmp_path / "a", seed=1, config=cfg,
                              progress=False)  # fmt: skip
    real_loss, calls = train_mod.sequence_loss, {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint, before the step-8 one
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_mod, "sequence_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_organism(MECHANISMS["greedy-bypass"], tmp_path / "b", seed=1, config=cfg,
                       progress=False)  # fmt: skip
    assert (tmp_path / "b" / "train_state.pt").exists()
    monkeypatch.setattr(train_mod, "sequence_loss", real_loss)
    resumed = train_organism(MECHANISMS["greedy-bypass"], tmp_path / "b", seed=1, config=cfg,
                             progress=False)  # fmt: skip
    a, _ = load_organism(straight)
    b, _ = load_organism(resumed)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ca = json.loads((straight / "curve.json").read_text())
    cb = json.loads((resumed / "curve.json").read_text())
    assert [p["loss"] for p in ca] == pytest.approx([p["loss"] for p in cb], abs=1e-6)


def test_a_different_recipe_in_a_used_folder_is_refused(tmp_path):
    cfg = TrainConfig(samples=32 * 8, eval_every=4, ckpt_every=4, **TINY)
    (tmp_path / "c").mkdir()
    torch.save({"config": {"samples": 1}, "seed": 0}, tmp_path / "c" / "train_state.pt")
    with pytest.raises(ValueError, match="another recipe"):
        train_organism(MECHANISMS["faithful"], tmp_path / "c", seed=0, config=cfg, progress=False)


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(samples=64 * 100, warmup_frac=0.1)
    lrs = np.array([lr_at(s, cfg) for s in range(100)])
    assert lrs[0] < lrs[9] == pytest.approx(1e-3) and lrs[-1] < 1e-5
    assert np.all(np.diff(lrs[10:]) <= 0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="chunk"):
        TrainConfig(chunk=100)
    with pytest.raises(ValueError, match="samples"):
        TrainConfig(samples=10)
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        resolve_organism("no-such-organism")


def test_text_agent_plays_a_trained_organism_with_counterfactual_edits(trained):
    out, _ = trained
    model, _ = load_organism(out)
    # 18 new tokens: the rationale (3 per arm + "ucb <arm>") and "act".
    agent = TextAgent(model, OrganismFormat(), mode="forced", counterfactual=True,
                      max_new_tokens=18)  # fmt: skip
    recs = play(agent, BanditConfig(horizon=6), n_episodes=3, seed=0, progress=False)
    assert all(r.cf_rationale_arm is not None and r.cf_rationale_arm != r.rationale_arm
               for r in recs if r.rationale_arm is not None)  # fmt: skip
