"""Tiny random Hugging Face models (Llama, Qwen2) in temp folders, and a tiny Llama GGUF.

Weights use a large init (std 0.5) so that the next token depends strongly on the context:
with the default 0.02 init a random model predicts nearly the same token everywhere, which
hides generation bugs such as a KV cache that is silently ignored.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


def _save(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A random 2-layer Llama (d_model 32, 4 heads, 2 KV heads) saved with the tiny tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(_llama_config(tiny_tokenizer))
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer):
    """A random 2-layer Qwen2 (q/k/v biases, tied embeddings) saved with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_qwen2"))


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotary halves -> pairs).

    transformers' GGUF reader applies the inverse, so writing without it would scramble
    the rotary dimensions.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(path, hf_model, tokenizer, *, arch: str = "llama") -> None:
    """Write ``hf_model`` (a LlamaForCausalLM) and ``tokenizer`` (byte-level BPE) as F32 GGUF.

    Key names follow transformers' GGUF_CONFIG_MAPPING["llama"] and GGUF_TOKENIZER_MAPPING;
    tensor names follow gguf-py's llama tensor map (token_embd, blk.N.attn_q, ...).
    """
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    # The tokenizer as llama.cpp stores a byte-level BPE one: tokens, merges, token types.
    model_json = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = model_json["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = CONTROL, 1 = NORMAL
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", _permute_qk(sd[p + "self_attn.q_proj.weight"], nh))
        w.add_tensor(b + "attn_k.weight", _permute_qk(sd[p + "self_attn.k_proj.weight"], nkv))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def gguf_writer():
    """:func:`write_llama_gguf`, as a fixture (conftest modules are not importable)."""
    return write_llama_gguf


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama_dir, tiny_tokenizer):
    """The tiny Llama's exact weights written as an F32 GGUF (with tokenizer and template)."""
    pytest.importorskip("gguf", reason="needs the gguf package: pip install gguf==0.19.0")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-f32.gguf"
    write_llama_gguf(path, hf, tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def hf_logits():
    """``fn(folder, tokens [batch, pos]) -> logits [batch, pos, d_vocab]`` from plain HF."""
    from transformers import AutoModelForCausalLM

    def run(folder, tokens: torch.Tensor) -> torch.Tensor:
        # eager attention, as the bridge uses: sdpa differs by ~1e-6 from op ordering
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            return hf(tokens).logits

    return run
