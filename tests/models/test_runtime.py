"""The model runtime (kdgap.models.runtime): eval checks, the tokenizer, the BOS default."""

from __future__ import annotations

import pytest
import torch

from kdgap.models.runtime import model_tokenizer, prepend_bos_for, require_eval
from kdgap.models.tokens import tokenize_batch


def test_require_eval_refuses_training_mode(tiny_native):
    require_eval(tiny_native)  # eval: fine
    tiny_native.train()
    try:
        with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
            require_eval(tiny_native, "patching")
    finally:
        tiny_native.eval()


def test_model_tokenizer_and_bos_default(tiny_native, tiny_tokenizer):
    assert model_tokenizer(tiny_native, tiny_tokenizer) is tiny_tokenizer
    assert model_tokenizer(tiny_native).is_fast
    assert prepend_bos_for(tiny_native) is True and prepend_bos_for(tiny_native, False) is False

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        model_tokenizer(tiny_native, Slow())
    assert isinstance(tokenize_batch(tiny_tokenizer, ["red"]).tokens, torch.Tensor)
