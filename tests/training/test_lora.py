"""LoRA (peft) inside a bridge: starts as the base, trains only the adapters, merges into a
plain Hugging Face model, and fine-tuning with it changes the targeted weights only."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from kdgap.cli import main
from kdgap.models import load_model
from kdgap.models.twins import fast_model, probe_ids, strip_bridge_name
from kdgap.report.session import Session
from kdgap.training import RlftConfig, rlft
from kdgap.training.lora import add_lora, merge_lora

rlft_mod = importlib.import_module("kdgap.training.rlft")


def _logits(bridge, ids):
    with torch.no_grad():
        return bridge(ids, return_type="logits")


def _weights(bridge) -> dict[str, torch.Tensor]:
    """Parameters under their Hugging Face names (each tensor once: the bridge aliases some)."""
    params = bridge.original_model.named_parameters()
    return {strip_bridge_name(k): v.detach().clone() for k, v in params}


def _folder_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(path).state_dict())


def test_adapters_start_at_zero_train_alone_and_merge_exactly(hf_models):
    bridge = load_model(hf_models["llama"].spec.raw).bridge  # a copy: the fixture is shared
    ids = probe_ids(bridge)
    base, keys = _logits(bridge, ids), set(bridge.state_dict())
    adapted = add_lora(bridge, 4)
    assert len(adapted) == 4  # q_proj and v_proj of 2 layers (peft's Llama default)
    torch.testing.assert_close(_logits(bridge, ids), base, rtol=0, atol=0)
    trainable = sum(p.numel() for p in bridge.parameters() if p.requires_grad)
    # rank 4 x (in + out) per adapted Linear: q_proj 32 -> 32, v_proj 32 -> 16 (2 KV heads).
    assert trainable == 2 * 4 * ((32 + 32) + (32 + 16))
    with torch.no_grad():
        for name, p in bridge.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tuned = _logits(bridge, ids)
    assert (tuned - base).abs().max() > 1e-3
    # Generation's hook-free twin carries the same adapters (not the slow wrapped model).
    twin = fast_model(bridge)
    assert twin is not bridge.original_model
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, tuned, rtol=0, atol=1e-4)
    assert merge_lora(bridge) == 4
    torch.testing.assert_close(_logits(bridge, ids), tuned, rtol=0, atol=1e-5)
    assert set(bridge.state_dict()) == keys  # the plain modules are back
    with torch.no_grad():
        torch.testing.assert_close(fast_model(bridge)(input_ids=ids).logits, tuned, rtol=0,
                                   atol=1e-4)  # fmt: skip


def test_lora_cloning_changes_only_the_adapted_weights(hf_models, tmp_path, capsys):
    src = hf_models["llama"].spec.raw
    rc = main(["finetune", "--method", "behavior-cloning", "--model", src, "--out",
               str(tmp_path / "bc"), "--episodes", "2", "--steps", "4", "--updates", "3",
               "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    curves = json.loads((tmp_path / "bc" / "curves.json").read_text())
    assert curves["config"]["lora_rank"] == 4
    start, tuned = _folder_weights(src), _folder_weights(curves["model"])
    assert start.keys() == tuned.keys()
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_lora_rlft_changes_only_the_adapted_weights(hf_models, tmp_path, monkeypatch):
    import numpy as np

    # A random model's rollouts all earn the invalid penalty (advantage 0, no gradient);
    # which weights an update touches is the point here, so every step gets +-1.
    monkeypatch.setattr(rlft_mod, "grpo_advantages",
                        lambda r, *a, **k: np.resize([1.0, -1.0], len(r)))  # fmt: skip
    session = Session(hf_models["qwen2"].spec.raw)
    start = _weights(session.bridge)
    cfg = RlftConfig(n_arms=2, horizon=2, episodes=1, group=2, updates=1, minibatch=4,
                     max_new_tokens=6, lr=1e-2, lora_rank=2)  # fmt: skip
    rlft(session.agent(), cfg, tmp_path, progress=False)
    tuned = _weights(session.bridge)
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert not any("lora" in k for k in tuned)  # merged at the end


def test_lora_on_an_organism_is_a_one_line_error_before_loading(capsys, tmp_path):
    rc = main(["finetune", "--method", "thought-cloning", "--model", "organism:faithful",
               "--out", str(tmp_path / "x"), "--lora-rank", "4"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "lora_rank=4" in err and "Hugging Face" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="lora_rank=-1"):
        RlftConfig(lora_rank=-1)
