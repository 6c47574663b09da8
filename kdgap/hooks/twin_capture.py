"""Residual-stream capture on a hook-free twin: :func:`twin_plan` and :func:`twin_forward`.

A recording of ``blocks.{i}.hook_resid_pre`` / ``hook_resid_post`` needs only what enters
and leaves each decoder layer, and the bridge's forward (eager attention, a hook point per
sub-component) is the slow way to get it. The twins of :mod:`kdgap.models.twins` (the
SDPA twin of a Hugging Face model, a plain ``NativeModel`` of a native bridge) share the
bridge's tensors; here torch hooks on a twin's decoder layers gather the site positions
of their inputs (``resid_pre``) and outputs (``resid_post``), and the forward is abandoned
once the last one fired (the final norm and the unembedding never run).
``experiments/bench/recording_twin.py`` times this against the bridge.

The bridge's ``hook_resid_pre`` / ``hook_resid_post`` of block ``i`` are exactly the input
and output of the wrapped model's decoder layer ``i``, so the values are equal up to float
rounding (SDPA vs eager attention); ``tests/hooks/test_twin_capture.py`` checks them
against the bridge path and ``run_with_cache()`` on left-padded batches of three
architectures. Any other hook, any hook attached to the bridge, or a bridge without a twin
takes the bridge path (:func:`twin_plan` returns None).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int

from kdgap.hooks.names import gather_positions
from kdgap.models import twins
from kdgap.models.runtime import has_hooks

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class _Done(Exception):
    """Raised from the last recording hook to end the twin's forward (never escapes)."""


class TwinPlan(NamedTuple):
    """What :func:`twin_forward` runs: the twin, its decoder layers, and per layer the
    ``(kind, hook name)`` pairs to record (kind ``"pre"`` or ``"post"``)."""

    lm: torch.nn.Module
    layers: torch.nn.ModuleList
    need: dict[int, list[tuple[str, str]]]


def _decoder_layers(lm: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList | None:
    """The twin's ``ModuleList`` of ``n_layers`` decoder layers of one class, or None."""
    for mod in lm.modules():
        if (
            isinstance(mod, torch.nn.ModuleList)
            and len(mod) == n_layers
            and all(type(m) is type(mod[0]) for m in mod)
        ):
            return mod
    return None


def twin_plan(model: TransformerBridge, hooks: Sequence[str]) -> TwinPlan | None:
    """A :class:`TwinPlan` when ``hooks`` can be recorded on the twin of ``model`` (all of
    them ``blocks.{i}.hook_resid_pre|post``, no hook attached to the bridge, a twin
    exists), else None."""
    need: dict[int, list[tuple[str, str]]] = {}
    for h in hooks:
        m = _RESID.match(h)
        if m is None:
            return None
        need.setdefault(int(m.group(1)), []).append((m.group(2), h))
    if not need or has_hooks(model):
        return None
    lm = twins.fast_model(model) or twins.native_twin(model)
    if lm is None or lm is getattr(model, "original_model", None):
        return None  # no twin: the wrapped model's modules belong to the bridge
    layers = _decoder_layers(lm, int(model.cfg.n_layers))
    if layers is None or max(need) >= len(layers):
        return None
    return TwinPlan(lm, layers, need)


@torch.inference_mode()
def twin_forward(
    plan: TwinPlan,
    tokens: Int[torch.Tensor, "rows pos"],
    mask: Int[torch.Tensor, "rows pos"],
    positions: Int[torch.Tensor, "rows n_sites"],
) -> dict[str, Float[torch.Tensor, "rows n_sites d_model"]]:
    """One forward of the twin -> ``{hook: [rows n_sites d_model]}`` (on the model's device).

    Args:
        plan: :func:`twin_plan`'s result.
        tokens, mask: left-padded ids and 0/1 attention mask, on the model's device.
        positions: ``[rows n_sites]`` token index of every site, on the model's device.
    """
    lm, layers, need = plan
    n_hooks = sum(len(v) for v in need.values())
    got: dict[str, torch.Tensor] = {}

    def keep(kind: str, i: int, x: Float[torch.Tensor, "rows pos d_model"]) -> None:
        for k, name in need[i]:
            if k == kind:
                got[name] = gather_positions(x, positions)
        if len(got) == n_hooks:
            raise _Done

    def pre(i: int) -> Callable[..., None]:
        def fn(mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            keep("pre", i, args[0] if args else kwargs["hidden_states"])

        return fn

    def post(i: int) -> Callable[..., None]:
        def fn(mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
            keep("post", i, out[0] if isinstance(out, tuple) else out)

        return fn

    handles = []
    try:
        for i, kinds in need.items():
            if any(k == "pre" for k, _ in kinds):
                handles.append(layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
            if any(k == "post" for k, _ in kinds):
                handles.append(layers[i].register_forward_hook(post(i), with_kwargs=True))
        # Positions count real tokens only, as the bridge's forward counts them with left
        # padding (absolute position embeddings, e.g. GPT-2, depend on it).
        pos_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        lm(input_ids=tokens, attention_mask=mask, position_ids=pos_ids, use_cache=False)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return got
