"""GGUF files through transformers: architecture checks, dequantised load, config fix-ups.

transformers 5.23 reads GGUF two ways: a fast reader for a few architectures (qwen35,
qwen35moe, lfm2) and the legacy reader (needs the ``gguf`` package) for the rest (llama,
qwen2, gemma2/3, ...). Both are driven by ``from_pretrained(folder, gguf_file=name)``. We
always ask for ``GgufConfig(dequantize=True)``: TransformerBridge wraps plain ``nn.Linear``
layers, not the packed ``GgufLinear`` the fast path would otherwise keep.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kdgap.models.spec import LOCAL_FORMS, ModelLoadError

# transformers is imported inside the functions that read a file, so `import kdgap.models`
# stays light for commands that never read one.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

GGUF_PIP = "gguf==0.19.0"


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` a GGUF file states (reads metadata only)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, OSError, IndexError) as exc:  # bad magic, truncated file, ...
        raise ModelLoadError(
            f"model={str(path)!r}: cannot read it as a GGUF file ({exc}). Check that the file "
            f"is complete, or {LOCAL_FORMS}."
        ) from exc
    return str(metadata["general.architecture"])


def supported_gguf_architectures() -> tuple[set[str], set[str]]:
    """``(fast_reader_archs, legacy_reader_archs)`` this transformers version can read."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_ARCHS), set(GGUF_SUPPORTED_ARCHITECTURES)


def check_gguf_readable(path: str | Path) -> str:
    """Return the file's architecture, or raise naming it when transformers cannot read it."""
    import transformers

    arch = gguf_architecture(path)
    fast, legacy = supported_gguf_architectures()
    if arch not in fast | legacy:
        raise ModelLoadError(
            f"model={str(path)!r}: GGUF architecture {arch!r} cannot be read by transformers "
            f"{transformers.__version__} (it reads: {', '.join(sorted(fast | legacy))}). "
            "Convert the model to a Hugging Face folder (config.json + safetensors) and pass "
            "that folder, or use a GGUF of a supported architecture."
        )
    if arch not in fast and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"model={str(path)!r}: reading a {arch!r} GGUF file needs the `gguf` package; "
            f"install it with `pip install {GGUF_PIP}`."
        )
    return arch


def infer_architectures(
    config: PretrainedConfig, model: PreTrainedModel | None = None
) -> list[str]:
    """``config.architectures``, or one inferred from ``model_type`` when the file had none.

    GGUF configs carry no ``architectures`` field (e.g. Gemma 3: ``gemma3_text`` ->
    ``Gemma3ForCausalLM``), and TransformerBridge picks its adapter from that field.
    """
    if getattr(config, "architectures", None):
        return list(config.architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None and model is not None:
        name = type(model).__name__
    if name is None:
        raise ModelLoadError(
            f"model_type={config.model_type!r} has no causal-LM class in transformers, so "
            "the model cannot be wrapped; use a decoder-only language model."
        )
    return [name]


def load_gguf(
    path: str | Path, torch_dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a GGUF file as a dense Hugging Face model plus its tokenizer.

    Args:
        path: the ``.gguf`` file.
        torch_dtype: dtype of the dequantised weights.
        device: where to move the model after loading (dequantisation runs on the host).

    Returns:
        ``(hf_model in eval mode, tokenizer, architecture)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path)
    arch = check_gguf_readable(path)
    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
            attn_implementation="eager",  # the bridge forces eager; load it that way up front
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"model={str(path)!r}: transformers could not load this {arch!r} GGUF file: {exc}"
        ) from exc
    model.config.architectures = infer_architectures(model.config, model)
    return model.to(device).eval(), tokenizer, arch
