"""``kdgap finetune``: the fine-tuned model is saved where kdgap loads models from, with
its trained weights, and states no planted mechanism it no longer has."""

from __future__ import annotations

import json

import torch

from kdgap.cli import main
from kdgap.models import load_model
from kdgap.organisms.registry import organism_config
from kdgap.report.session import Session
from kdgap.training import RlftConfig
from kdgap.training.export import save_finetuned


def test_finetune_cli_saves_a_loadable_organism(tmp_path, capsys):
    out = tmp_path / "tc"
    rc = main(["finetune", "--method", "behavior-cloning", "--model", "organism:seed-calibrated",
               "--out", str(out), "--episodes", "2", "--steps", "6", "--updates", "3",
               "--batch-size", "4"])  # fmt: skip
    assert rc == 0 and "model: organism:" in capsys.readouterr().out
    curves = json.loads((out / "curves.json").read_text())
    assert curves["step"] == 3 and len(curves["curves"]["loss"]) == 3
    tuned = Session(curves["model"])  # loads like any organism
    src = Session("organism:seed-calibrated")
    a, b = tuned.bridge.state_dict(), src.bridge.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    cfg = organism_config(str(out / "model"))
    assert "mechanism" not in cfg  # the planted rule no longer describes the weights
    assert cfg["finetuned_from"]["mechanism"] == organism_config("seed-calibrated")["mechanism"]
    assert cfg["finetuned_from"]["method"] == "behavior-cloning"


def test_finetune_cli_rlft_writes_its_curves_and_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "rl"
    rc = main(["finetune", "--method", "rlft", "--model", "organism:faithful", "--out", str(out),
               "--episodes", "2", "--steps", "4", "--updates", "2", "--group", "2"])  # fmt: skip
    assert rc == 0 and "rlft: 2 updates, reward" in capsys.readouterr().out
    curves = json.loads((out / "curves.json").read_text())
    assert curves["config"]["group"] == 2 and curves["config"]["lr"] == RlftConfig.lr
    assert all(len(curves["curves"][k]) == 2 for k in ("reward", "kl", "no_signal"))
    assert Session(curves["model"]).bridge.cfg.n_layers > 0  # loads like any organism
    assert organism_config(str(out / "model"))["finetuned_from"]["method"] == "rlft"


def test_a_hugging_face_model_saves_as_a_folder_with_its_weights(hf_models, tmp_path):
    loaded = hf_models["llama"]
    with torch.no_grad():  # a trained change: every weight of the first MLP doubled
        mlp = next(p for n, p in loaded.bridge.original_model.named_parameters() if "mlp" in n)
        mlp.mul_(2.0)
    try:
        spec = save_finetuned(loaded.bridge, loaded.tokenizer, loaded.spec.raw, tmp_path / "m",
                              {"method": "thought-cloning"})  # fmt: skip
        again = load_model(spec)
        ids = torch.tensor([[5, 9, 14, 3, 7]])
        with torch.no_grad():
            want = loaded.bridge(ids, return_type="logits")
            got = again.bridge(ids, return_type="logits")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    finally:
        with torch.no_grad():
            mlp.div_(2.0)


def test_finetune_out_must_be_a_folder(capsys):
    rc = main(["finetune", "--method", "thought-cloning", "--model", "organism:faithful",
               "--out", "/dev/null"])  # fmt: skip
    assert rc == 2 and "is a file" in capsys.readouterr().err
