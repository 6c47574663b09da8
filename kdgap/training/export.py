"""Saving a fine-tuned model where kdgap loads models from: an organism folder for an
organism, a Hugging Face folder (safetensors) for a Hugging Face model.

A fine-tuned organism keeps its language and sizes but not its planted mechanism: training
changed what the weights compute, so the folder records where it came from
(``finetuned_from``: the source spec and its mechanism) and kdgap states no planted answer
for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from kdgap.io import atomic_write_json
from kdgap.models.spec import parse_model_spec
from kdgap.models.twins import strip_bridge_name
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.registry import organism_config, save_organism

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

#: Provenance file written beside a fine-tuned Hugging Face model.
PROVENANCE = "kdgap_finetune.json"


def save_finetuned(
    model: TransformerBridge,
    tokenizer: PreTrainedTokenizerBase,
    spec: str,
    folder: str | os.PathLike,
    provenance: dict[str, Any],
) -> str:
    """Write the fine-tuned ``model`` (loaded from ``spec``) to ``folder``; returns the spec
    that loads it (``organism:FOLDER`` or ``FOLDER``).

    Raises:
        ValueError: ``spec`` is neither an organism nor a Hugging Face model.
    """
    folder = Path(folder)
    parsed = parse_model_spec(spec)
    if parsed.kind == "organism":
        config = organism_config(parsed.target)
        extra = {k: v for k, v in config.items()
                 if k not in ("format", "name", "language", "model", "mechanism")}  # fmt: skip
        extra["finetuned_from"] = {"spec": spec, "mechanism": config.get("mechanism"),
                                   **provenance}  # fmt: skip
        save_organism(model, OrganismLanguage(**config["language"]),
                      SimpleNamespace(**config["model"]), folder, extra=extra,
                      tokenizer=tokenizer)  # fmt: skip
        return f"organism:{folder}"
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "save_pretrained"):
        raise ValueError(
            f"spec={spec!r} is neither an organism nor a Hugging Face model; kdgap can save "
            "fine-tuned organisms and Hugging Face models only."
        )
    from transformers import AutoModelForCausalLM

    # The bridge replaced the wrapped model's modules with its components; a plain copy of
    # the architecture, given the trained tensors under their original names, saves as
    # any Hugging Face checkpoint does.
    state = {strip_bridge_name(k): v for k, v in hf.state_dict().items()}
    plain = AutoModelForCausalLM.from_config(hf.config)
    result = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:  # never save a model with tensors left at their random initialisation
        raise ValueError(
            f"the trained model has no tensor for {missing[:3]} of {type(plain).__name__}; "
            "it cannot be saved as a Hugging Face folder."
        )
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    atomic_write_json(folder / PROVENANCE, {"finetuned_from": {"spec": spec, **provenance}})
    return str(folder)
