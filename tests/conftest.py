"""Shared, session-scoped tiny models (seeded) for every test module.

- ``tiny_tokenizer_dir``: a byte-level BPE tokenizer (any text round-trips) trained on a
  small bandit-prompt corpus and saved as a Hugging Face fast tokenizer (bos/eos/pad set).
- ``tiny_native``: ``TransformerBridge.boot_native`` with 2 layers, d_model 32, in eval mode.
- ``tiny_hf_dir``: a random GPT-2 (2 layers, d_model 32) saved with that tokenizer to a temp
  folder, as a user's local Hugging Face folder would be.
- ``hf_models`` / ``chat_models``: ``{arch: LoadedModel}``, one random model per
  architecture in ``ARCHS`` (GPT-2, Llama, Qwen2 with tied embeddings) saved to a temp
  folder and loaded through :func:`kdgap.models.load_model`; ``chat_models`` carry a chat
  template, ``hf_models`` none. ``hf_arch`` parametrizes a test over ``ARCHS``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ARCHS = ("gpt2", "llama", "qwen2", "gemma2", "gemma3", "qwen3", "mistral", "phi3")
#: Sliding-window length of the tiny Gemma / Mistral / Phi-3 models: shorter than the
#: tests' prompts, so tokens outside the window are really masked.
SLIDING_WINDOW = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)
CORPUS = [
    "You are in a room with 5 buttons labeled red, green, blue, yellow, orange.",
    "Each button is associated with a Bernoulli distribution with a fixed but unknown mean.",
    "Step=0 Action=green Reward=0.3",
    "Step=1 Action=blue Reward=1",
    "Think briefly, then end with ACTION=X where X is one of the buttons.",
    "<ucb_values> red: 0.71, green: 0.52 </ucb_values> ACTION=red",
    "Alice has 3 brothers and she also has 6 sisters. ### Answer: 7",
    "purple pink brown black white 0 1 2 3 4 5 6 7 8 9 10 . , : = < > / #",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_native(tiny_tokenizer):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_layers=2, n_ctx=2048, n_heads=4, d_mlp=64,
        d_vocab=len(tiny_tokenizer), act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = TransformerBridge.boot_native(cfg, tokenizer=tiny_tokenizer)
    return model.eval()


@pytest.fixture
def tripled_mlp_weight(tiny_native):
    """Replace (not edit in place) a weight of ``tiny_native``'s first MLP by 3x itself, as
    ``load_state_dict`` or a new ``Parameter`` would, and put the old one back afterwards.

    Yields ``(owner, leaf)``: ``getattr(owner, leaf)`` is the replaced parameter.
    """
    mlp = tiny_native.original_model.layers[0].mlp
    name = next(n for n, p in mlp.named_parameters() if p.dim() == 2)
    old = dict(mlp.named_parameters())[name]
    owner = mlp.get_submodule(name.rsplit(".", 1)[0]) if "." in name else mlp
    leaf = name.rsplit(".", 1)[-1]
    with torch.no_grad():
        setattr(owner, leaf, torch.nn.Parameter(old.detach() * 3.0))
    yield owner, leaf
    setattr(owner, leaf, old)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=2048, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_bridge(tiny_hf_dir):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    return TransformerBridge.boot_transformers(str(tiny_hf_dir), hf_model=hf, tokenizer=tok).eval()


def _arch_config(arch: str, tok):
    """A tiny random config of ``arch`` (2 layers, width 32, 4 heads of 8; 2 KV heads where
    the architecture has grouped queries), with each architecture's own features switched
    on: Gemma-2's attention and final logit soft-capping, sliding windows (small, so the
    tests' prompts are longer than them), Gemma's scaled embeddings, Qwen-3's q/k norms."""
    import transformers as tf

    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2,
                             n_head=4, initializer_range=0.3, **ids)  # fmt: skip
    common = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.3, **ids,
    )  # fmt: skip
    if arch in ("llama", "qwen2"):
        cls = tf.LlamaConfig if arch == "llama" else tf.Qwen2Config
        return cls(tie_word_embeddings=arch == "qwen2", **common)
    window = dict(sliding_window=SLIDING_WINDOW)
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, tie_word_embeddings=True,
                 layer_types=["sliding_attention", "full_attention"], **window)  # fmt: skip
    if arch == "gemma2":
        return tf.Gemma2Config(attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               **gemma, **common)  # fmt: skip
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**gemma, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=8, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return tf.MistralConfig(head_dim=8, **window, **common)
    if arch == "phi3":
        return tf.Phi3Config(**window, **common)
    raise ValueError(f"arch={arch!r} is not one of {ARCHS}")


def _save_and_load(tmp_path_factory, tokenizer_dir, *, prefix: str, seed: int,
                   chat_template: str | None = None) -> dict:  # fmt: skip
    """``{arch: LoadedModel}``: one random model per architecture in ``ARCHS`` (torch seed
    ``seed + index``), saved to a temp folder with the tokenizer (and ``chat_template``),
    then loaded through :func:`kdgap.models.load_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdgap.models import load_model

    out = {}
    for i, arch in enumerate(ARCHS):
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if chat_template is not None:
            tok.chat_template = chat_template
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(_arch_config(arch, tok))
        path = tmp_path_factory.mktemp(f"{prefix}_{arch}")
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        out[arch] = load_model(str(path))
    return out


@pytest.fixture(scope="session")
def paper_tokenizer(chat_template):
    """A byte-level BPE chat tokenizer (``chat_template``) for random models playing the
    paper's prompt: as in real tokenizers, every spelling of an arm name (``red``, `` red``,
    ``Red``, `` Red``) is one token, so an action is scored in one pass and patched at one
    position; trained on the paper's own prompts and rationales too, which keeps them short
    (attention and the patching heatmap grow with length)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdgap.agent.prompts import PaperFormat
    from kdgap.envs import BanditConfig

    fmt, cfg = PaperFormat(knowing_doing=True), BanditConfig(horizon=10)
    histories = [([a, (a + 1) % 5, (a + 3) % 5], [1.0, 0.0, 1.0]) for a in range(5)]
    turns = [fmt.render_prompt(cfg, *h) + fmt.write_rationale(cfg, *h) for h in histories]
    arms = " ".join(f"ACTION={n} ACTION={n.capitalize()} {n} {n.capitalize()}"
                    for n in cfg.arm_names)  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS * 4 + [arms] * 50 + turns, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                     pad_token="<pad>")  # fmt: skip
    hf_tok.chat_template = chat_template
    return hf_tok


@pytest.fixture(scope="session")
def chat_template() -> str:
    """The chat template ``chat_models`` are saved with."""
    return CHAT_TEMPLATE


@pytest.fixture(params=ARCHS)
def hf_arch(request) -> str:
    """Each architecture of ``ARCHS`` in turn (a key of ``hf_models`` / ``chat_models``)."""
    return request.param


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, tiny_tokenizer_dir):
    """``{arch: LoadedModel}``: random models without a chat template."""
    return _save_and_load(tmp_path_factory, tiny_tokenizer_dir, prefix="fast", seed=20)


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory, tiny_tokenizer_dir):
    """``{arch: LoadedModel}``: random chat models saved with a template, then loaded."""
    return _save_and_load(tmp_path_factory, tiny_tokenizer_dir, prefix="chat", seed=10,
                          chat_template=CHAT_TEMPLATE)  # fmt: skip
