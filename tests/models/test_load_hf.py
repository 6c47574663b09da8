"""load_model on local Hugging Face folders: three architectures, offline, HF-equal logits."""

from __future__ import annotations

import hashlib

import pytest
import torch

from kdgap.models import LoadedModel, load_model

TEXT = "Step=0 Action=green Reward=1 Step=1 Action=blue Reward=0.3"


@pytest.fixture(scope="module")
def folders(tiny_hf_dir, tiny_llama_dir, tiny_qwen2_dir):
    return {"gpt2": tiny_hf_dir, "llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}


@pytest.mark.parametrize(
    ("arch", "hf_class"),
    [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")],
)
def test_folder_logits_equal_hf(folders, arch, hf_class, tiny_tokenizer, hf_logits):
    folder = folders[arch]
    loaded = load_model(str(folder))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == "hf_folder"
    assert not loaded.bridge.training, "the bridge must come back in eval mode"
    tokens = tiny_tokenizer(TEXT, return_tensors="pt").input_ids  # [1, pos]
    with torch.no_grad():
        got = loaded.bridge(tokens)  # [1, pos, d_vocab]
    want = hf_logits(folder, tokens)
    assert got.shape == want.shape == (1, tokens.shape[1], len(tiny_tokenizer))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert loaded.identity["architecture"] == hf_class


def test_identity_for_manifests(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    ident = loaded.identity
    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    assert ident["hash"] == hashlib.sha256(weights).hexdigest()
    assert ident["hash_of"] == "weights"
    assert ident["source"] == "hf_folder" and ident["name"] == tiny_llama_dir.name
    assert ident["path"] == str(tiny_llama_dir.resolve())
    assert ident["n_params"] == ident["n_params_file"] > 0
    assert (ident["dtype"], ident["device"], ident["n_layers"], ident["d_model"]) == (
        "float32",
        "cpu",
        2,
        32,
    )


def test_bfloat16_option(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, dtype="bfloat16")
    assert {p.dtype for p in loaded.bridge.parameters()} == {torch.bfloat16}
    assert loaded.identity["dtype"] == "bfloat16"


def test_bridge_greedy_generation_equals_hf_with_kv_cache(tiny_llama_dir, tiny_tokenizer):
    """Token for token against HF generate (transformers 5.24 + TL 4.3 break this)."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    n_new = 12
    for text in ("Step=0 Action=green Reward=1", "ACTION=red <ucb_values> blue: 0.52"):
        tokens = tiny_tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(
                tokens, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                use_cache=True, pad_token_id=tiny_tokenizer.pad_token_id,
            )[0, tokens.shape[1] :]  # fmt: skip
            got = loaded.bridge.generate(
                tokens, max_new_tokens=n_new, do_sample=False, use_past_kv_cache=True,
                stop_at_eos=False, verbose=False,
            )[0, tokens.shape[1] :]  # fmt: skip
        # the test only bites if the model's output depends on more than the last token
        assert len(set(want.tolist())) >= 3, "degenerate random model: generation is constant"
        assert got.tolist() == want.tolist()


def test_device_auto_goes_through_accelerates_device_map(tiny_llama_dir, monkeypatch):
    # No GPU here: with CUDA reported available, accelerate's device_map="auto" finds no
    # GPU and places every layer on the host; the bridge wraps the placed model as it is
    # (device=None) and must compute the same logits as a plain load.
    want = load_model(tiny_llama_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    got = load_model(tiny_llama_dir, device="auto", check_memory_first=False)
    assert got.identity["device"] == "auto"
    tokens = torch.tensor([[1, 5, 9, 4, 2]])
    torch.testing.assert_close(got.bridge(tokens), want.bridge(tokens), atol=1e-5, rtol=0)
