"""Hook names: short kinds, their expansion per layer, the layer a hook lives in.

Recording (:mod:`kdgap.hooks.recorder`) and patching (:mod:`kdgap.hooks.patch`) both
resolve hook specs here, so a spec means the same thing in both; they work on any
transformer-lens 4.3 ``TransformerBridge`` (``boot_native`` or ``boot_transformers``).

- **Hook specs.** A short kind (``"resid_post"``) expands to one hook per layer
  (``blocks.{l}.hook_resid_post``); a full transformer-lens name (old names such as
  ``blocks.0.hook_resid_pre`` are aliases the bridge accepts) passes through unchanged.
  Names are never compared against ``hook.name`` inside a callback: the bridge reports its
  own name there (``blocks.0.hook_in`` for ``resid_pre``).
- **Stopping early.** :func:`stop_layer_for` gives the ``stop_at_layer`` that still runs
  every block a set of hooks lives in.
- **Reading sites.** Batches are *left*-padded (the last real token of every example sits
  at position ``pos - 1``); :func:`gather_positions` reads one activation per example and
  site at the token positions :mod:`kdgap.hooks.sites` resolves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

#: Short hook kinds -> per-layer name template (transformer-lens names, which the bridge
#: accepts as aliases). ``z``, ``q``, ``k``, ``v`` are per head: ``[batch pos head d_head]``.
HOOK_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_EMBED_HOOK_HEADS = ("hook_embed", "hook_pos_embed", "embed", "pos_embed")


def n_layers_of(model: TransformerBridge) -> int:
    """Number of transformer blocks of ``model`` (from ``model.cfg.n_layers``)."""
    return int(model.cfg.n_layers)


def valid_hook_names(model: TransformerBridge) -> list[str]:
    """Every hook name ``model`` accepts (bridge names and transformer-lens aliases), sorted."""
    return sorted(model.hook_dict)


def resolve_hooks(
    model: TransformerBridge, hooks: str | Sequence[str], layers: Sequence[int] | None = None
) -> list[str]:
    """Expand hook specs into full hook names, in the given order, without duplicates.

    Args:
        model: a TransformerBridge (its ``hook_dict`` and ``cfg.n_layers`` are used).
        hooks: one spec or a list; a spec is a short kind from :data:`HOOK_KINDS`
            (``"resid_post"`` -> ``blocks.{l}.hook_resid_post`` for every layer in
            ``layers``), a comma-separated string of specs (``"resid_post,attn_out"``, as a
            CLI passes it) or a full hook name (``"blocks.3.hook_resid_post"``).
        layers: layers a short kind expands over (default: all). Full names ignore it.

    Returns:
        Full hook names, e.g. ``["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]``.

    Raises:
        ValueError: an unknown spec (the message lists the short kinds and points to
            :func:`valid_hook_names`), or a layer outside ``0..n_layers-1``.
    """
    specs = [hooks] if isinstance(hooks, str) else list(hooks)
    specs = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not specs:
        raise ValueError(f"hooks={hooks!r} is empty; pass e.g. 'resid_post' or a hook name.")
    n = n_layers_of(model)
    layer_list = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers={list(layers)!r} has {bad} outside 0..{n - 1} (n_layers={n}).")
    valid = model.hook_dict
    out: list[str] = []
    for spec in specs:
        if spec in HOOK_KINDS:
            names = [HOOK_KINDS[spec].format(layer=x) for x in layer_list]
        elif spec in valid:
            names = [spec]
        else:
            raise ValueError(
                f"hooks: {spec!r} is neither a short kind {sorted(HOOK_KINDS)} nor a hook name "
                f"of this model (e.g. 'blocks.0.hook_resid_post', 'hook_embed'; "
                f"kdgap.hooks.names.valid_hook_names(model) lists all {len(valid)})."
            )
        missing = [x for x in names if x not in valid]
        if missing:
            raise ValueError(f"hooks: {spec!r} expands to {missing}, which this model lacks.")
        out.extend(x for x in names if x not in out)
    return out


def hook_layer(name: str) -> int | None:
    """Block index of a hook name (``"blocks.3.hook_resid_post"`` -> 3), None outside blocks."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def stop_layer_for(model: TransformerBridge | None, hook_names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every block a hook in ``hook_names`` lives in.

    Returns ``max_layer + 1`` when every hook is inside a block (the forward then skips the
    later blocks, the final norm and the unembedding), None when any hook lies outside the
    blocks other than the embeddings (``ln_final``/``unembed`` need the full forward).
    """
    layers = []
    for h in hook_names:
        layer = hook_layer(h)
        if layer is None and h.split(".")[0] in _EMBED_HOOK_HEADS:
            layer = -1  # embeddings run before block 0
        if layer is None:
            return None
        layers.append(layer)
    return max(layers) + 1 if layers else None


def gather_positions(
    act: Float[torch.Tensor, "batch pos *rest"], positions: Int[torch.Tensor, "batch n_sites"]
) -> Float[torch.Tensor, "batch n_sites *rest"]:
    """``act[b, positions[b, s]]`` for every example ``b`` and site ``s`` (a new tensor)."""
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    return act[rows, positions.to(act.device)]
