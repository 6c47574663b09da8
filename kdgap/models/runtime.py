"""The model runtime: eval checks, device, tokenizer, BOS default, hook detection, the causal
native model check, heap release."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn.modules import module as torch_module

if TYPE_CHECKING:  # annotations only: importing transformers here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase


def require_eval(model: torch.nn.Module, what: str = "recording") -> None:
    """Raise when ``model`` is in training mode (dropout would make activations random).

    ``TransformerBridge.boot_native`` returns models in train mode; call ``model.eval()``.
    """
    if getattr(model, "training", False):
        raise RuntimeError(
            f"{what} needs the model in eval mode, but model.training is True "
            f"(dropout would change every activation); call model.eval() first."
        )


def causal_native(model: TransformerBridge) -> bool:
    """True when ``model`` wraps a ``boot_native`` ``NativeModel`` whose every block attends
    causally (what kdgap's hook-free native loops can run)."""
    try:  # imported here: importing transformer-lens would slow down `import kdgap.models`
        from transformer_lens.model_bridge.sources.native.model import NativeModel
    except ImportError:  # pragma: no cover - an older transformer-lens
        return False
    nm = getattr(model, "original_model", None)
    return isinstance(nm, NativeModel) and all(
        getattr(block.attn, "causal", True) for block in nm.layers
    )


def model_tokenizer(
    model: TransformerBridge, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer to use: ``tokenizer`` if given, else ``model.tokenizer``.

    Raises:
        ValueError: neither exists, or the tokenizer is not a fast tokenizer (character
            offsets, which site resolution needs, exist only for fast tokenizers).
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "tokenizer=None and the model has no tokenizer; pass tokenizer= (a Hugging Face "
            "fast tokenizer) or boot the model with one."
        )
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer={type(tok).__name__} is not a fast tokenizer; site resolution needs "
            "character offsets (return_offsets_mapping). Load it with use_fast=True."
        )
    return tok


def _default_prepend_bos(model: TransformerBridge) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "default_prepend_bos", True))


def prepend_bos_for(model: TransformerBridge, prepend_bos: bool | None = None) -> bool:
    """``prepend_bos`` if given, else the model's default (``cfg.default_prepend_bos``)."""
    return _default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim(0)``; else no-op).

    Forwards of different shapes leave freed blocks scattered through the C heap; later
    forwards land on other, untouched free pages, so without this the process's resident
    memory creeps up forward after forward although the live data stays the same size.
    """
    if _TRIM is not None:
        _TRIM(0)


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any hook could act on ``model``'s forward, so the hook-free fast paths (which
    run other modules on the same tensors) must not be used: a transformer-lens HookPoint
    hook, a torch forward / pre-forward / backward hook on any submodule (patching registers
    those directly), or a global torch module hook.

    Library wiring does not count: transformer-lens's pre-hooks on the wrapped model's norms
    that feed its HookPoints, and transformers' output-capturing hooks (installed once
    ``run_with_cache`` has asked for hidden states), change nothing by themselves.
    """
    hook_dict = getattr(model, "hook_dict", {}) or {}
    if any(len(getattr(hp, "_forward_hooks", {})) for hp in hook_dict.values()):
        return True
    if any(
        getattr(torch_module, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                     "_global_backward_hooks", "_global_backward_pre_hooks")
    ):  # fmt: skip
        return True
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(
        not _is_bridge_wiring(fn)
        for m in model.modules()
        for k in kinds
        for fn in (getattr(m, k, None) or {}).values()
    )


_WIRING = ("transformer_lens", "transformers.utils.output_capturing")


def _is_bridge_wiring(fn: Callable) -> bool:
    """A hook function from transformer-lens's HookPoint plumbing or transformers' output
    capturing (see :func:`has_hooks`)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__module__", "") or "").startswith(_WIRING)
