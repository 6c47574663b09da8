"""load_model on a tiny GGUF file the test writes: same logits as the HF folder it came from."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kdgap.models import ModelLoadError, load_model, parse_model_spec
from kdgap.models.gguf import gguf_architecture, infer_architectures

pytest.importorskip("gguf", reason="needs the gguf package: pip install gguf==0.19.0")

TEXT = "Step=0 Action=green Reward=1 Step=1 Action=blue Reward=0.3"


@pytest.fixture(scope="module")
def loaded_gguf(tiny_llama_gguf):
    return load_model(tiny_llama_gguf)


def test_gguf_logits_equal_hf_folder(loaded_gguf, tiny_llama_dir, tiny_tokenizer, hf_logits):
    tokens = tiny_tokenizer(TEXT, return_tensors="pt").input_ids  # [1, pos]
    with torch.no_grad():
        got = loaded_gguf.bridge(tokens)  # [1, pos, d_vocab]
    # F32 tensors in, F32 out: only the q/k permutation round trip, which is exact
    torch.testing.assert_close(got, hf_logits(tiny_llama_dir, tokens), rtol=0, atol=1e-5)


def test_gguf_tokenizer_and_template_come_from_metadata(loaded_gguf, tiny_tokenizer):
    tok = loaded_gguf.tokenizer
    for text in (TEXT, "<ucb_values> red: 0.71 </ucb_values> ACTION=red", "purple 10"):
        assert tok(text).input_ids == tiny_tokenizer(text).input_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<bos>user: hi<eos>"


def test_gguf_identity(loaded_gguf, tiny_llama_gguf):
    ident = loaded_gguf.identity
    assert ident["source"] == "gguf" and ident["gguf_architecture"] == "llama"
    assert ident["architecture"] == "LlamaForCausalLM"  # GGUF configs carry none: inferred
    assert ident["hash"] == hashlib.sha256(tiny_llama_gguf.read_bytes()).hexdigest()
    assert ident["n_params"] == ident["n_params_file"]


def test_folder_with_one_gguf_is_a_gguf_spec(tiny_llama_gguf):
    spec = parse_model_spec(str(tiny_llama_gguf.parent))
    assert (spec.kind, spec.target) == ("gguf", str(tiny_llama_gguf))


def test_unreadable_gguf_architecture_names_it(
    tmp_path, tiny_llama_dir, tiny_tokenizer, gguf_writer
):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "odd.gguf"
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    gguf_writer(path, hf, tiny_tokenizer, arch="mamba3000")
    assert gguf_architecture(path) == "mamba3000"
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'mamba3000' cannot be read"):
        load_model(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not gguf at all, just bytes" * 10)
    with pytest.raises(ModelLoadError, match=r"cannot read it as a GGUF file"):
        load_model(path)


def test_architectures_inferred_from_model_type():
    from transformers import Gemma3TextConfig, LlamaConfig

    cfg = Gemma3TextConfig()
    cfg.architectures = None
    assert infer_architectures(cfg) == ["Gemma3ForCausalLM"]
    assert infer_architectures(LlamaConfig(architectures=["X"])) == ["X"]
