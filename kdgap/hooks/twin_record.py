"""Record residual-stream hooks without running the bridge (Hugging Face and native models).

Why: a recording of ``blocks.{i}.hook_resid_pre`` / ``hook_resid_post`` needs only what
enters and leaves each decoder layer, and the bridge's forward (eager attention, a
HookPoint per sub-component) is the slow way to get it. On a bridge that wraps a Hugging
Face model, :func:`kdgap.agent.hf_cache.fast_model` gives an SDPA *twin* of that model
sharing the same parameter tensors; here torch hooks on the twin's decoder layers gather
the site positions of their inputs (``resid_pre``) and outputs (``resid_post``), and the
forward is abandoned once the last one fired (the final norm and the unembedding never
run). Measured on SmolLM2-135M (2 threads): 1.7x faster per transcript than the bridge.
A native bridge (``boot_native``, e.g. the organisms) gets the same treatment on a plain
``NativeModel`` sharing its tensors (:func:`native_twin`).

The bridge's ``hook_resid_pre`` / ``hook_resid_post`` of block ``i`` are exactly the
input and output of the wrapped model's decoder layer ``i``, so the values are equal up to
float rounding (SDPA vs eager attention); ``tests/hooks/test_twin_record.py`` checks them
against the bridge path and ``run_with_cache()`` on left-padded batches of three
architectures. Any other hook, any hook attached to the bridge, or a bridge without a twin
takes the bridge path (:func:`twin_plan` returns None).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Sequence

import torch
from jaxtyping import Int

from kdgap.agent import hf_cache
from kdgap.agent.generation import has_hooks
from kdgap.hooks.plumbing import gather_positions

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class _Done(Exception):
    """Raised from the last recording hook to end the twin's forward (never escapes)."""


def _decoder_layers(lm, n_layers: int):
    """The twin's ``ModuleList`` of ``n_layers`` decoder layers of one class, or None."""
    for mod in lm.modules():
        if (
            isinstance(mod, torch.nn.ModuleList)
            and len(mod) == n_layers
            and all(type(m) is type(mod[0]) for m in mod)
        ):
            return mod
    return None


_NATIVE_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def native_twin(model):
    """A plain ``NativeModel`` sharing the tensors of a native bridge (``boot_native``, e.g.
    the organisms), or None (no native model, training mode, the tensors cannot be mapped,
    or the twin's logits disagree with the bridge's beyond 1e-4).

    Why: the bridge wraps every sub-module of the native model in a component with hook
    points; the unwrapped model computes the same blocks without them (measured on the
    organism: 14-21% less time per forward, and fewer intermediate tensors). Built once per
    bridge and rebuilt when a parameter tensor is replaced.
    """
    try:
        from transformer_lens.model_bridge.sources.native.model import NativeModel
    except ImportError:  # pragma: no cover - an older transformer-lens
        return None
    nat = getattr(model, "original_model", None)
    if not isinstance(nat, NativeModel) or model.training or nat.training:
        return None
    return hf_cache.cached_twin(_NATIVE_TWINS, model, nat, _build_native_twin, _native_agrees)


def _build_native_twin(nat):
    """``(twin, unused)``: a plain copy of ``nat``'s class sharing its tensors (see
    :func:`kdgap.agent.hf_cache.bind_shared`), or ``(None, [])``."""
    try:
        with torch.device("meta"):
            twin = type(nat)(copy.deepcopy(nat.cfg))
    except Exception:  # noqa: BLE001 - a config the plain class cannot build
        return None, []
    return hf_cache.bind_shared(twin, nat)


def _native_agrees(model, twin) -> bool:
    """Bridge and twin logits agree (1e-4, float32; 0.15 in half precision) on a probe."""
    ids = hf_cache.probe_ids(model)
    with torch.no_grad():
        want = model(ids, return_type="logits").float()
        got = twin(input_ids=ids).float()
    tol = 1e-4 if next(twin.parameters()).dtype == torch.float32 else 0.15
    return got.shape == want.shape and bool((got - want).abs().max() <= tol)


def twin_plan(model, hooks: Sequence[str]):
    """``(twin, layers, {layer: [(kind, hook name)]})`` when ``hooks`` can be recorded on the
    twin of ``model`` (all of them ``blocks.{i}.hook_resid_pre|post``, no hook attached to
    the bridge, a twin exists), else None."""
    need: dict[int, list[tuple[str, str]]] = {}
    for h in hooks:
        m = _RESID.match(h)
        if m is None:
            return None
        need.setdefault(int(m.group(1)), []).append((m.group(2), h))
    if not need or has_hooks(model):
        return None
    lm = hf_cache.fast_model(model) or native_twin(model)
    if lm is None or lm is getattr(model, "original_model", None):
        return None  # no twin: the wrapped model's modules belong to the bridge
    layers = _decoder_layers(lm, int(model.cfg.n_layers))
    if layers is None or max(need) >= len(layers):
        return None
    return lm, layers, need


@torch.inference_mode()
def twin_forward(
    plan,
    tokens: Int[torch.Tensor, "rows pos"],
    mask: Int[torch.Tensor, "rows pos"],
    positions: Int[torch.Tensor, "rows n_sites"],
) -> dict[str, torch.Tensor]:
    """One forward of the twin -> ``{hook: [rows n_sites d_model]}`` (on the model's device).

    Args:
        plan: :func:`twin_plan`'s result.
        tokens, mask: left-padded ids and 0/1 attention mask, on the model's device.
        positions: ``[rows n_sites]`` token index of every site, on the model's device.
    """
    lm, layers, need = plan
    n_hooks = sum(len(v) for v in need.values())
    got: dict[str, torch.Tensor] = {}

    def keep(kind: str, i: int, x: torch.Tensor) -> None:
        for k, name in need[i]:
            if k == kind:
                got[name] = gather_positions(x, positions)
        if len(got) == n_hooks:
            raise _Done

    def pre(i: int):
        def fn(mod, args, kwargs):
            keep("pre", i, args[0] if args else kwargs["hidden_states"])

        return fn

    def post(i: int):
        def fn(mod, args, kwargs, out):
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
