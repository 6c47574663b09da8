"""LoRA adapters (``peft``) inside a bridge-wrapped Hugging Face model, and merging them.

``peft.get_peft_model`` wraps a ``PreTrainedModel`` in a ``PeftModel``, which a
``TransformerBridge`` cannot hold. ``peft.inject_adapter_in_model`` instead replaces the
targeted ``nn.Linear`` modules in place. Inside a bridge every original module sits one
level down, as the ``_original_component`` of a bridge component, so the targets are
matched there (``...q_proj._original_component``): the bridge forward, its hook points,
kdgap's agent and the training loops then run the adapted model without knowing it. The
hook-free SDPA twin that generation and scoring run on (:mod:`kdgap.models.twins`) gets the
same adapters, sharing their tensors, and is accepted only if its logits match the bridge's.

:func:`add_lora` checks that the bridge really runs the adapters (a bridge component that
computes from the weights directly, without calling the module, would silently train
nothing), freezes every other parameter, and returns the adapted module names.
:func:`merge_lora` folds ``B @ A * alpha / r`` into the base weights and puts the base
modules back, so the fine-tuned model saves and loads as a plain Hugging Face folder.
Which modules to adapt defaults to peft's table for the architecture (``q_proj`` and
``v_proj`` for Llama, Qwen, Mistral and Gemma; ``c_attn`` for GPT-2).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING

import torch

from kdgap._checks import check_int
from kdgap.models.twins import LORA_ATTR, probe_ids

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

#: Modules adapted for architectures peft's table does not list (Phi-3's fused projection).
EXTRA_TARGETS = {"phi3": ("qkv_proj",)}


def default_targets(model_type: str) -> tuple[str, ...]:
    """peft's LoRA target modules for a Hugging Face ``model_type`` (e.g. ``"llama"``).

    Raises:
        ValueError: peft lists none for it; the message names ``lora_targets``.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    targets = table.get(model_type) or EXTRA_TARGETS.get(model_type)
    if not targets:
        raise ValueError(f"model_type={model_type!r} has no default LoRA targets; pass "
                         "lora_targets (e.g. 'q_proj,v_proj': module names to adapt).")  # fmt: skip
    return tuple(targets)


def add_lora(
    bridge: TransformerBridge, rank: int, *, targets: str = "", alpha: float | None = None
) -> list[str]:
    """Inject LoRA adapters of rank ``rank`` (scale ``alpha / rank``, default alpha ``2 *
    rank``) into ``bridge``'s wrapped Hugging Face model; freeze every other parameter.

    Args:
        bridge: a bridge around a Hugging Face model (not an organism).
        rank: the adapters' rank.
        targets: comma-separated module names to adapt ("" : :func:`default_targets`).
        alpha: LoRA scale numerator.

    Returns:
        The adapted modules' names.

    Raises:
        ValueError: not a Hugging Face model, no module matches, or the bridge does not
            run the adapted modules.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import PreTrainedModel

    check_int("lora_rank", rank)
    hf = getattr(bridge, "original_model", None)
    if not isinstance(hf, PreTrainedModel):
        raise ValueError("lora_rank is set but the model is not a Hugging Face model (LoRA "
                         "adapts Hugging Face models); leave lora_rank at 0 to train every "
                         "weight.")  # fmt: skip
    names = [t.strip() for t in targets.split(",") if t.strip()] or list(
        default_targets(hf.config.model_type)
    )
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=names)  # fmt: skip
    # Inside the bridge the modules sit one level down, as a component's original.
    pattern = rf".*\.({'|'.join(map(re.escape, names))})\._original_component"
    try:
        inject_adapter_in_model(dataclasses.replace(config, target_modules=pattern), bridge)
    except ValueError as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"lora_targets={','.join(names)!r} match no module of "
                         f"{type(hf).__name__} ({first}).") from None  # fmt: skip
    adapted = [n for n, m in bridge.named_modules() if _is_lora(m)]
    _check_runs_adapters(bridge, names)
    # The hook-free twin (generation, scoring) rebuilds the same adapters from this.
    setattr(hf, LORA_ATTR, config)
    for name, p in bridge.named_parameters():
        p.requires_grad_("lora_" in name)
    return adapted


def merge_lora(bridge: TransformerBridge) -> int:
    """Merge every adapter into its base weight and put the base module back; returns how
    many were merged (0 when the bridge has none)."""
    merged = 0
    for name, module in list(bridge.named_modules()):
        if not _is_lora(module):
            continue
        module.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(bridge.get_submodule(parent), leaf, module.get_base_layer())
        merged += 1
    if merged:
        for p in bridge.parameters():
            p.requires_grad_(True)
        if hasattr(bridge.original_model, LORA_ATTR):
            delattr(bridge.original_model, LORA_ATTR)
    return merged


def _is_lora(module: torch.nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing was adapted; importing peft takes a second
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


@torch.no_grad()
def _check_runs_adapters(bridge: TransformerBridge, names: list[str]) -> None:
    """Raise unless setting the adapters' B matrices changes the bridge's logits."""
    ids = probe_ids(bridge)
    base = bridge(ids, return_type="logits")
    bs = [p for n, p in bridge.named_parameters() if "lora_B" in n]
    for p in bs:
        p.fill_(0.01)
    moved = bool((bridge(ids, return_type="logits") - base).abs().max() > 0)
    for p in bs:
        p.zero_()  # back to peft's initialisation: the adapted model starts as the base
    if not moved:
        raise ValueError(f"lora_targets={','.join(names)!r}: the bridge does not run these "
                         "modules' forward (it computes from their weights); choose other "
                         "modules.")  # fmt: skip
