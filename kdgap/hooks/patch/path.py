"""Path patching: what the receiver's attention reads from sender positions (Wang et al. 2022).

The path is *sender positions -> receiver position through attention*, layer by layer
(Goldowsky-Dill et al. 2023 call such a patch a path patch). Precisely, for a layer ``l``:

1. The **keys and values** of every head at the sender positions (``attn.hook_k`` and
   ``attn.hook_v``; both are per-position, so rotary embeddings and q/k norms, which act
   per position, are unaffected) are replaced by the *source* run's.
2. Only the **receiver's** query sees them: after attention, the per-head output ``z``
   (``attn.hook_z``) at every position other than the receiver is put back to the base
   run's value. So the receiver's attention output at layer ``l`` is
   ``softmax(q_r^base . [K^src_S ; K^base_rest]) [V^src_S ; V^base_rest]``, everything else
   in layer ``l`` is untouched, and later layers recompute normally from there.

Putting ``z`` back is exact because, in a row patched only from layer ``l`` on, every
non-receiver position still carries its base residual (a patch at the receiver reaches
other positions only through later positions' attention to it, which the metric at the
receiver never reads). Rows with ``layer="all"`` apply the patch at every layer at once:
the total effect that flows from the senders to the receiver through attention.

Rows ride in one batch per chunk like :func:`kdgap.hooks.patch.sweep.patch_sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float

from kdgap.hooks.names import HOOK_KINDS
from kdgap.hooks.patch.core import (
    HookList,
    LogitDiff,
    Tokens,
    capture,
    check_pair_tokens,
    entries,
    run_rows,
    set_at,
)
from kdgap.hooks.patch.sweep import DIRECTIONS, default_max_rows
from kdgap.models.runtime import model_device, require_eval

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

#: Senders: a ``[batch pos]`` or ``[pos]`` bool mask, or sender positions.
Senders = Bool[torch.Tensor, "batch pos"] | Bool[torch.Tensor, " pos"] | Sequence[int]


@dataclass
class PathResult:
    """Path-patching metric per prompt.

    Attributes:
        per_layer: ``[batch layer]`` metric with the path patched at that layer only.
        all_layers: ``[batch]`` metric with the path patched at every layer.
        ld_base: ``[batch]`` unpatched base run (clean when noising).
        ld_source: ``[batch]`` unpatched source run (corrupt when noising).
        direction: ``"noise"`` or ``"denoise"``.
    """

    per_layer: Float[torch.Tensor, "batch layer"]
    all_layers: Float[torch.Tensor, " batch"]
    ld_base: Float[torch.Tensor, " batch"]
    ld_source: Float[torch.Tensor, " batch"]
    direction: str

    @property
    def total_effect(self) -> Float[torch.Tensor, " batch"]:
        """``[batch]`` LD_source - LD_base: the whole effect of the edit."""
        return self.ld_source - self.ld_base

    @property
    def path_effect(self) -> Float[torch.Tensor, " batch"]:
        """``[batch]`` effect carried by the path at all layers together."""
        return self.all_layers - self.ld_base

    @property
    def layer_effect(self) -> Float[torch.Tensor, "batch layer"]:
        """``[batch layer]`` effect carried by the path at each single layer."""
        return self.per_layer - self.ld_base[:, None]


def _as_mask(senders: Senders, batch: int, n_pos: int) -> Bool[torch.Tensor, "batch pos"]:
    """Sender positions as a ``[batch pos]`` bool mask (accepts a mask or a position list)."""
    s = torch.as_tensor(senders)
    if s.dtype == torch.bool:
        if s.ndim == 1:
            s = s.expand(batch, n_pos)
        if s.shape != (batch, n_pos):
            raise ValueError(
                f"senders mask has shape {tuple(s.shape)}; pass [batch pos] = {(batch, n_pos)}."
            )
        return s.clone()
    mask = torch.zeros(batch, n_pos, dtype=torch.bool)
    mask[:, s.long().flatten()] = True
    return mask


def path_patch(
    model: TransformerBridge, clean_tokens: Tokens, corrupt_tokens: Tokens, metric: LogitDiff,
    senders: Senders, *, direction: str = "noise", memory_mb: float = 256.0,
    max_rows: int | None = None,
) -> PathResult:  # fmt: skip
    """Patch the sender -> receiver attention path at each layer and at all layers.

    The receiver is ``metric.position`` (the action position). The base run is clean for
    ``"noise"`` (the receiver reads the corrupt rationale: is the route necessary?) and
    corrupt for ``"denoise"``.

    Args:
        model: a TransformerBridge in eval mode.
        clean_tokens, corrupt_tokens: ``[batch pos]``, equal shapes.
        metric: logit difference at the receiver.
        senders: ``[batch pos]`` bool mask, a ``[pos]`` mask, or a list of positions
            (e.g. the rationale span from :func:`kdgap.hooks.patch.pairs.span_mask`).
        direction: ``"noise"`` or ``"denoise"``.
        memory_mb, max_rows: chunk size, as in :func:`~kdgap.hooks.patch.sweep.patch_sweep`.

    Returns:
        :class:`PathResult`; ``per_layer`` is ``[batch layer]``.

    Raises:
        ValueError: unequal token shapes, an empty sender set, senders at or after the
            receiver only, or an unknown direction.
    """
    require_eval(model, "path patching")
    check_pair_tokens(clean_tokens, corrupt_tokens)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use one of {DIRECTIONS}.")
    batch, n_pos = clean_tokens.shape
    n_layers, dev = int(model.cfg.n_layers), model_device(model)
    mask = _as_mask(senders, batch, n_pos)
    receiver = metric.position.clone()
    receiver[receiver < 0] += n_pos
    before = mask & (torch.arange(n_pos)[None] <= receiver[:, None])
    empty = torch.nonzero(~before.any(1)).flatten().tolist()
    if empty:
        raise ValueError(
            f"senders select no position at or before the receiver for prompts {empty[:10]}; "
            "the receiver's attention can read only earlier positions (pass the rationale "
            "span, e.g. kdgap.hooks.patch.pairs.span_mask(...))."
        )
    base, source = (
        (clean_tokens, corrupt_tokens) if direction == "noise" else (corrupt_tokens, clean_tokens)
    )
    k, v, z = ([HOOK_KINDS[kind].format(layer=lay) for lay in range(n_layers)] for kind in "kvz")
    src_acts, src_logits = capture(model, source.to(dev), k + v)
    base_acts, _ = capture(model, base.to(dev), z)
    ld_source = metric.at(src_logits, torch.arange(batch))

    # Rows: (prompt, "all") first (they join at layer 0), then (prompt, layer l).
    row_prompt = torch.arange(batch).repeat(n_layers + 1)
    row_layer = torch.arange(n_layers + 1).repeat_interleave(batch) - 1  # -1 = all layers
    start = row_layer.clamp(min=0)
    mask_d = mask.to(dev)
    # Every position but the receiver: where the per-head outputs go back to the base's.
    others = torch.arange(n_pos, device=dev)[None] != receiver.to(dev)[:, None]

    def make_hooks(rows: torch.Tensor, offset: int) -> HookList:
        hooks = []
        rl, rp = row_layer[rows], row_prompt[rows]
        for layer in range(n_layers):
            sel = (rl == layer) | (rl == -1)
            if not bool(sel.any()):
                continue
            idx = (offset + torch.nonzero(sel).flatten()).to(dev)
            prm = rp[sel].to(dev)
            # Keys and values at the senders come from the source run ...
            index, src_index = entries(idx, prm, mask_d[prm])
            for kind in ("k", "v"):
                name = HOOK_KINDS[kind].format(layer=layer)
                setter = partial(set_at, index=index, src=src_acts[name], src_index=src_index)
                hooks.append((name, setter))
            # ... and only the receiver's output keeps what it read from them.
            name = HOOK_KINDS["z"].format(layer=layer)
            index, src_index = entries(idx, prm, others[prm])
            hooks.append((name, partial(set_at, index=index, src=base_acts[name],
                                        src_index=src_index)))  # fmt: skip
        return hooks

    max_rows = max_rows or default_max_rows(model, n_pos, memory_mb)
    flat, ld_base = run_rows(model, base, row_prompt, start, make_hooks, metric, max_rows=max_rows)
    flat = flat.cpu().reshape(n_layers + 1, batch)
    return PathResult(flat[1:].T, flat[0], ld_base.cpu(), ld_source.cpu(), direction)
