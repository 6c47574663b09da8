"""Hook-free twins of a bridge's wrapped model: the same parameter tensors, no hook points.

A ``TransformerBridge`` runs its wrapped model through components with a hook point at
every sub-step (and, for Hugging Face models, eager attention). When no hook is attached,
a plain copy of the wrapped model computes the same function with less work. This module
builds those copies:

- :func:`fast_model`: for a bridge around a decoder-only Hugging Face model, a *twin* of
  that model built from the same config with PyTorch SDPA attention and **the same
  parameter tensors** (nothing copied; LoRA adapters being trained included), or the
  wrapped model itself when no twin can be built. :mod:`kdgap.agent.hf_decoding` runs
  KV-cached generation and forced-choice scoring on it; :mod:`kdgap.hooks.twin_capture`
  records residual streams on it.
- :func:`native_twin`: for a ``boot_native`` bridge (e.g. the organisms), a plain
  ``NativeModel`` sharing the bridge's tensors.

A twin is accepted only after its logits match the bridge's on a probe sequence
(:func:`probe_ids`), is built once per bridge (:func:`cached_twin`) and rebuilt when any
parameter tensor is replaced; tensors of the wrapped model that a twin does not read must
stay zero, or the twin is withheld. Results equal the bridge path up to float rounding
(SDPA vs eager attention). Callers use a twin only when no hook is attached
(:func:`kdgap.models.runtime.has_hooks`): hooks must see every position.
``experiments/bench/agent.py --forced-smollm2`` and ``experiments/bench/recording_twin.py``
time the twins against the bridge.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from transformers import PreTrainedModel

if TYPE_CHECKING:  # annotations only: transformer-lens is imported where a twin is built
    from transformer_lens.model_bridge import TransformerBridge

#: ``(twin, unused)``: a twin (None when none can be built) and the tensors of its source
#: that it does not read (each must stay all zero).
Built = tuple[torch.nn.Module | None, list[torch.Tensor]]

#: Attribute of a wrapped Hugging Face model holding the ``peft.LoraConfig`` of the LoRA
#: adapters inside it (set by :func:`kdgap.training.lora.add_lora`, with plain module
#: names): its twin gets the same adapters, sharing their tensors.
LORA_ATTR = "_kdgap_lora"

_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NATIVE_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MISSING = object()


# ---------------------------------------------------------------------------------- models
def _hf_model(bridge: TransformerBridge) -> PreTrainedModel | None:
    hf = getattr(bridge, "original_model", None)
    if not isinstance(hf, PreTrainedModel):
        return None
    if getattr(hf.config, "is_encoder_decoder", False):
        return None
    return hf


def supports(bridge: TransformerBridge) -> bool:
    """True when ``bridge`` wraps a decoder-only Hugging Face model this module can run."""
    return _hf_model(bridge) is not None


def strip_bridge_name(name: str) -> str:
    """A parameter name of a bridge-wrapped module under its original name (the bridge
    inserts ``_original_component`` segments)."""
    return name.replace("._original_component", "").replace("_original_component.", "")


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _signature(hf: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in hf.parameters())


def _build_twin(hf: PreTrainedModel) -> Built:
    """``(twin, unused)``: a plain copy of ``hf``'s class with SDPA attention sharing
    ``hf``'s tensors, and the tensors of ``hf`` it does not use (each must stay all zero);
    or ``(None, [])`` when no such twin can be built."""
    cfg = copy.deepcopy(hf.config)
    lora = getattr(hf, LORA_ATTR, None)
    try:
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            twin = type(hf)(cfg)
            if lora is not None:  # the same adapters, bound to the same tensors below
                from peft import inject_adapter_in_model

                inject_adapter_in_model(lora, twin)
    except Exception:  # noqa: BLE001 - no SDPA for this class, or an exotic constructor
        return None, []
    return bind_shared(twin, hf)


def bind_shared(twin: torch.nn.Module, source: torch.nn.Module) -> Built:
    """``(twin, unused)``: ``twin`` (built on the meta device) with every parameter and
    buffer replaced by ``source``'s tensor of the same name (bridge wrapper segments such as
    ``_original_component`` stripped), and the tensors of ``source`` the twin does not use
    (each must stay all zero); ``(None, [])`` when a name is missing, ambiguous or of
    another shape, or a meta tensor is left."""
    src: dict[str, torch.Tensor] = {}
    named = list(source.named_parameters(remove_duplicate=False)) + list(
        source.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        key = strip_bridge_name(name)
        if key in src and src[key].data_ptr() != t.data_ptr():
            return None, []  # two different tensors claim one name: the mapping is ambiguous
        src.setdefault(key, t)
    used: set[int] = set()
    for kind in ("_parameters", "_buffers"):
        for mod_name, mod in twin.named_modules(remove_duplicate=False):
            for leaf, old in list(getattr(mod, kind).items()):
                if old is None:
                    continue
                key = f"{mod_name}.{leaf}" if mod_name else leaf
                t = src.get(key)
                if t is None or t.shape != old.shape:
                    return None, []
                getattr(mod, kind)[leaf] = t
                used.add(_storage(t))
    # What the twin does not use must not change the output: views of used tensors (the
    # bridge's split q/k/v) are fine, other tensors must be zero (an added lm_head bias),
    # and stay zero: fast_model re-checks them on every call (they are small).
    unused = [t for _name, t in named if _storage(t) not in used and t.numel()]
    if not _all_zero(unused):
        return None, []
    for mod in twin.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and v.is_meta:
                return None, []
    if any(t.is_meta for t in twin.parameters()) or any(t.is_meta for t in twin.buffers()):
        return None, []
    return twin.eval(), unused


def _all_zero(tensors: Sequence[torch.Tensor]) -> bool:
    return all(not bool(t.detach().abs().max() > 0) for t in tensors)


def probe_ids(bridge: TransformerBridge, n: int = 8) -> Int[torch.Tensor, "1 n"]:
    """``[1, n]`` fixed, spread-out token ids (no BOS, no pad) to compare a twin with its
    bridge on (``n`` capped at the context length)."""
    n_vocab = int(bridge.cfg.d_vocab)
    n = min(n, int(bridge.cfg.n_ctx))
    return (torch.arange(1, n + 1) * 7919 % max(2, n_vocab - 1) + 1)[None].to(bridge.cfg.device)


def cached_twin(
    cache: weakref.WeakKeyDictionary,
    bridge: TransformerBridge,
    source: torch.nn.Module,
    build: Callable[[torch.nn.Module], Built],
    agrees: Callable[[TransformerBridge, torch.nn.Module], bool],
) -> torch.nn.Module | None:
    """The twin of ``source`` (the module ``bridge`` wraps), or None; built once per bridge.

    ``build(source) -> (twin, unused)`` makes it (:func:`bind_shared`), ``agrees(bridge,
    twin)`` must accept it. The entry ``(parameter signature, twin, unused)`` in ``cache`` is
    rebuilt when a parameter tensor of ``source`` is replaced; the twin is withheld (None)
    while a tensor only ``source`` reads (``unused``) is non-zero.
    """
    sig = _signature(source)
    entry = cache.get(bridge, _MISSING)
    if entry is _MISSING or entry[0] != sig:
        tw, unused = build(source)
        if tw is not None and not agrees(bridge, tw):
            tw, unused = None, []
        entry = (sig, tw, unused)
        cache[bridge] = entry
    if entry[1] is None or not _all_zero(entry[2]):
        return None
    return entry[1]


def _agrees(bridge: TransformerBridge, twin: PreTrainedModel) -> bool:
    """Twin and bridge (no hooks) agree on a short probe: same next-token argmax everywhere
    and log-probabilities within float rounding (1e-3 in float32, 0.15 in half precision:
    SDPA and eager attention round differently)."""
    ids = probe_ids(bridge)
    with torch.no_grad():
        want = torch.log_softmax(bridge(ids, return_type="logits").float(), dim=-1)
        got = torch.log_softmax(twin(input_ids=ids).logits.float(), dim=-1)
    if got.shape != want.shape:
        return False
    tol = 1e-3 if next(twin.parameters()).dtype == torch.float32 else 0.15
    return bool((got - want).abs().max() <= tol) and bool((got.argmax(-1) == want.argmax(-1)).all())


def fast_model(bridge: TransformerBridge, *, twin: bool = True) -> PreTrainedModel | None:
    """The Hugging Face causal LM to run hook-free inference on, or None (no HF model, or
    the bridge is in training mode: only the bridge forward then behaves as training).

    Args:
        bridge: a TransformerBridge.
        twin: allow the SDPA twin (see the module docstring); False gives the wrapped model.
    """
    hf = _hf_model(bridge)
    if hf is None:
        return None
    if bridge.training or hf.training:
        return None  # dropout etc.: only the bridge forward does what training mode does
    if not twin:
        return hf
    tw = cached_twin(_TWINS, bridge, hf, _build_twin, _agrees)
    return hf if tw is None else tw  # no twin, or a tensor only hf reads was set in place


def native_twin(model: TransformerBridge) -> torch.nn.Module | None:
    """A plain ``NativeModel`` sharing the tensors of a native bridge (``boot_native``, e.g.
    the organisms), or None (no native model, training mode, the tensors cannot be mapped,
    or the twin's logits disagree with the bridge's beyond 1e-4).

    Why: the bridge wraps every sub-module of the native model in a component with hook
    points; the unwrapped model computes the same blocks without them, in less time and
    with fewer intermediate tensors. Built once per bridge and rebuilt when a parameter
    tensor is replaced.
    """
    try:  # imported here: importing transformer-lens would slow down `import kdgap.hooks`
        from transformer_lens.model_bridge.sources.native.model import NativeModel
    except ImportError:  # pragma: no cover - an older transformer-lens
        return None
    nat = getattr(model, "original_model", None)
    if not isinstance(nat, NativeModel) or model.training or nat.training:
        return None
    return cached_twin(_NATIVE_TWINS, model, nat, _build_native_twin, _native_agrees)


def _build_native_twin(nat: torch.nn.Module) -> Built:
    """``(twin, unused)``: a plain copy of ``nat``'s class sharing its tensors (see
    :func:`bind_shared`), or ``(None, [])``."""
    try:
        with torch.device("meta"):
            twin = type(nat)(copy.deepcopy(nat.cfg))
    except Exception:  # noqa: BLE001 - a config the plain class cannot build
        return None, []
    return bind_shared(twin, nat)


def _native_agrees(model: TransformerBridge, twin: torch.nn.Module) -> bool:
    """Bridge and twin logits agree (1e-4, float32; 0.15 in half precision) on a probe."""
    ids = probe_ids(model)
    with torch.no_grad():
        want = model(ids, return_type="logits").float()
        got = twin(input_ids=ids).float()
    tol = 1e-4 if next(twin.parameters()).dtype == torch.float32 else 0.15
    return got.shape == want.shape and bool((got - want).abs().max() <= tol)
