"""Checkpoint weights of a model whose tensors are shared (tied embeddings) round-trip."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from kdgap.training.checkpoint import save_weights


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 3)
        self.unembed = torch.nn.Linear(3, 7, bias=False)
        self.unembed.weight = self.embed.weight  # one tensor under two names


def test_tied_weights_save_and_load_back_into_both_names(tmp_path):
    torch.manual_seed(0)
    src, dst = Tied(), Tied()
    save_weights(tmp_path / "w.safetensors", src)
    dst.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(dst.embed.weight, src.embed.weight)
    assert dst.unembed.weight.data_ptr() == dst.embed.weight.data_ptr()  # still tied
