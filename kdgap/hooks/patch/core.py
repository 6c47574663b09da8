"""The patch core: capture activations, edit them at chosen entries, run patched rows in batches.

Built like ``transformer_lens.patching``: one generic engine, :func:`run_rows`, specialised
by small *setters* bound with :func:`functools.partial`. Everything in kdgap that reads or
writes activations through hooks stands on the three pieces here:

- **Capture.** :func:`capture_hook` is the one hook factory that stores an activation
  (whole, or the part a ``select`` function keeps); :func:`capture` runs one forward with
  it. Recording's bridge path, every patch's source run and the probes' activation capture
  use it.
- **Edit at entries.** A setter ``setter(act, hook, **params) -> act`` writes into the
  entries ``act[index]`` of an activation, ``index = (rows, positions[, heads])``:
  :func:`set_at` copies them from a captured activation (activation and path patching),
  :func:`edit_at` maps them through a function (steering adds a direction, ablation
  projects one out). :func:`entries` turns a ``[row pos]`` mask into such an index.
  ``functools.partial(set_at, index=..., src=..., src_index=...)`` is a hook.
- **Run rows.** :func:`run_rows` runs many patched copies ("rows") of a batch of prompts
  in chunked forward passes and reads a :class:`LogitDiff` at each row's action position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from kdgap.hooks.names import HOOK_KINDS, stop_layer_for
from kdgap.models.runtime import model_device

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

#: Sites patchable by :func:`~kdgap.hooks.patch.sweep.patch_sweep`; ``z`` is the per-head
#: attention output.
PATCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")

#: A transformer-lens forward hook ``(activation, hook) -> activation or None``.
HookFn = Callable[..., torch.Tensor | None]
#: ``(hook name, hook)`` pairs, as ``run_with_hooks(fwd_hooks=...)`` takes them.
HookList = list[tuple[str, HookFn]]
#: Entries of an activation: ``(rows, positions[, heads])``, equal-length index tensors.
Index = tuple[Int[torch.Tensor, " n"], ...]
#: ``[batch pos]`` token ids of unpadded prompts (clean and corrupt have equal shapes).
Tokens = Int[torch.Tensor, "batch pos"]


@dataclass(frozen=True)
class LogitDiff:
    """Metric: arm A's logit minus arm B's at ``position`` of each prompt.

    An arm may be given as several token ids (the first tokens of its spellings,
    :func:`kdgap.models.tokens.arm_token_ids`): it then reads as the log-sum-exp of their
    logits, the log of the arm's next-token probability mass up to the normaliser both arms
    share, as forced choice sums an arm's spellings. With one id per arm this is exactly
    the plain logit difference (``transformer_lens``'s patching metric).

    Attributes:
        token_a: ``[batch k]`` token ids of arm A (e.g. the clean rationale's arm), padded
            with -1.
        token_b: ``[batch k]`` token ids of arm B (the corrupt arm), padded with -1.
        position: ``[batch]`` position whose next-token logits are read (-1: the last).
    """

    token_a: Int[torch.Tensor, "batch k"]
    token_b: Int[torch.Tensor, "batch k"]
    position: Int[torch.Tensor, " batch"]

    @classmethod
    def of(
        cls,
        token_a: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        token_b: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        position: int | Sequence[int] | torch.Tensor = -1,
        batch: int | None = None,
    ) -> LogitDiff:
        """Build from an id, one id per prompt, or a list of ids per prompt; scalars are
        broadcast to ``batch`` prompts.

        Raises:
            ValueError: the two arms of a prompt share a token (their difference would
                not separate them).
        """
        n = batch or max(
            (len(x) for x in (token_a, token_b, position) if not isinstance(x, int)), default=1
        )
        a, b = _id_matrix(token_a, n), _id_matrix(token_b, n)
        p = torch.as_tensor(position, dtype=torch.long).flatten()
        p = p.expand(n).clone() if p.numel() == 1 else p
        shared = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
        same = torch.nonzero(shared.flatten(1).any(1)).flatten().tolist()
        if same:
            i = same[0]
            raise ValueError(
                f"token_a and token_b share a token for prompts {same[:10]} (ids "
                f"{a[i][a[i] >= 0].tolist()} and {b[i][b[i] >= 0].tolist()}): the two arms "
                "tokenise alike, so their difference cannot separate them; pick arms whose "
                "tokens differ (see kdgap.models.tokens.arm_token_ids)."
            )
        return cls(a, b, p)

    def at(
        self, logits: Float[torch.Tensor, "row pos vocab"], prompt: Int[torch.Tensor, " row"]
    ) -> Float[torch.Tensor, " row"]:
        """Metric of each row of ``logits``, row ``r`` belonging to prompt ``prompt[r]``.

        ``logits`` may have ``pos == 1`` (already narrowed to the metric's position).
        """
        dev = logits.device
        prompt = prompt.to(dev)
        pos = self.position.to(dev)[prompt] if logits.shape[1] > 1 else torch.zeros_like(prompt)
        rows = torch.arange(logits.shape[0], device=dev)
        at_pos = logits[rows, pos]  # [row vocab]
        ta, tb = self.token_a.to(dev)[prompt], self.token_b.to(dev)[prompt]
        return _read(at_pos, ta) - _read(at_pos, tb)


def _id_matrix(ids: int | Sequence | torch.Tensor, n: int) -> Int[torch.Tensor, "n k"]:
    """``[n k]`` ids padded with -1 from an id, one id per prompt or id lists per prompt."""
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return ids.long()
    if not isinstance(ids, int | torch.Tensor) and any(isinstance(x, Sequence) for x in ids):
        k = max(len(x) for x in ids)
        out = torch.full((len(ids), k), -1, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        return out
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    return (t.expand(n).clone() if t.numel() == 1 else t)[:, None]


def _read(at_pos: Float[torch.Tensor, "row vocab"], ids: Int[torch.Tensor, "row k"]):
    """Log-sum-exp of the logits of each row's ids (-1 pads weigh nothing); one id: its
    logit, exactly."""
    if ids.shape[1] == 1:
        return at_pos.gather(1, ids)[:, 0]
    vals = at_pos.gather(1, ids.clamp_min(0))
    return torch.logsumexp(vals.masked_fill(ids < 0, float("-inf")), dim=1)


def check_pair_tokens(clean_tokens: Tokens, corrupt_tokens: Tokens) -> None:
    """Raise unless clean and corrupt tokens are ``[batch pos]`` tensors of equal shape."""
    if clean_tokens.ndim != 2 or clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(
            f"clean_tokens {tuple(clean_tokens.shape)} and corrupt_tokens "
            f"{tuple(corrupt_tokens.shape)} must be [batch pos] with equal shapes: position p "
            "of one is patched into position p of the other. Build pairs whose edit keeps the "
            "token count (kdgap.hooks.patch.pairs checks this) or group pairs by length."
        )


def hook_name(site: str, layer: int) -> str:
    """Transformer-lens hook name of a patch site at ``layer`` (``resid_pre`` -> ...)."""
    if site not in PATCH_SITES:
        raise ValueError(f"site={site!r} is not patchable; use one of {PATCH_SITES}.")
    return HOOK_KINDS[site].format(layer=layer)


# ----------------------------------------------------------------------------- capture


def _detached_copy(act: torch.Tensor) -> torch.Tensor:
    return act.detach().clone()


def capture_hook(
    into: dict[str, torch.Tensor],
    key: str,
    select: Callable[[torch.Tensor], torch.Tensor] = _detached_copy,
    *,
    then: Callable[[], None] | None = None,
) -> HookFn:
    """Hook storing ``select(activation)`` as ``into[key]``; the activation is unchanged.

    Args:
        into: where captured tensors go.
        key: their key; bind the requested hook name here, since inside a callback
            ``hook.name`` is the bridge's own name (``blocks.0.hook_in`` for ``resid_pre``).
        select: what to keep (default: a detached copy of the whole activation), e.g. the
            site positions only, so nothing else outlives the forward.
        then: called after each capture (the recorder ends the forward from here once
            every hook it needs has fired).
    """

    def hook_fn(act: torch.Tensor, hook: HookPoint) -> None:
        into[key] = select(act)
        if then is not None:
            then()

    return hook_fn


def capture(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    *,
    select: Callable[[torch.Tensor], torch.Tensor] = _detached_copy,
    logits: bool = True,
    **forward_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], Float[torch.Tensor, "batch pos vocab"] | None]:
    """One forward pass returning ``{hook name: select(activation)}`` and the logits.

    Args:
        model: a TransformerBridge.
        tokens: ``[batch pos]`` input ids.
        names: hook names to capture.
        select: as in :func:`capture_hook` (default: detached copies).
        logits: False: stop after the last block a hook lives in, unembed one position
            at most, and return None for the logits.
        forward_kwargs: passed to the model (e.g. ``attention_mask``).
    """
    acts: dict[str, torch.Tensor] = {}
    hooks = [(n, capture_hook(acts, n, select)) for n in names]
    if not logits:
        forward_kwargs["stop_at_layer"] = stop_layer_for(model, names)
        # stop_at_layer == n_layers still runs the unembedding: give it one position only.
        hooks.append(("unembed.hook_in", lambda x, hook: x[:, :1]))
    with torch.no_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=hooks, **forward_kwargs)
    return acts, (out if logits else None)


# ------------------------------------------------------------------------------ setters


def set_at(
    act: torch.Tensor, hook: HookPoint | None, *, index: Index, src: torch.Tensor, src_index: Index
) -> torch.Tensor:
    """Setter: ``act[index] = src[src_index]`` (entries copied from a captured run)."""
    act[index] = src[src_index]
    return act


def edit_at(
    act: torch.Tensor,
    hook: HookPoint | None,
    *,
    index: Index,
    fn: Callable[[torch.Tensor], torch.Tensor],
    copy: bool = False,
) -> torch.Tensor:
    """Setter: ``act[index] = fn(act[index])``; ``fn`` maps ``[n *rest]`` to the same shape.

    Like :func:`set_at` it writes in place, so every reader of the activation sees the
    edit. ``copy=True`` edits a copy instead: only what reads the hook's *output* sees it
    (the same for most hooks; on a native bridge's ``hook_resid_mid`` the copy reaches the
    second layer norm's input but not the residual stream).
    """
    if copy:
        act = act.clone()
    act[index] = fn(act[index])
    return act


def entries(
    rows: Int[torch.Tensor, " row"],
    src_rows: Int[torch.Tensor, " row"],
    mask: Bool[torch.Tensor, "row pos"],
) -> tuple[Index, Index]:
    """``(index, src_index)`` of the ``True`` positions of ``mask``, row ``r`` of the mask
    being activation row ``rows[r]`` and source row ``src_rows[r]``."""
    r, p = torch.nonzero(mask, as_tuple=True)
    return (rows[r], p), (src_rows[r], p)


def narrow_to(positions: Int[torch.Tensor, " row"]) -> HookFn:
    """Hook keeping position ``positions[r]`` of row ``r`` only: ``[row pos d] -> [row 1 d]``."""

    def fn(x, hook):
        pos = positions.to(x.device)[: x.shape[0]]
        return x[torch.arange(x.shape[0], device=x.device), pos][:, None]

    return fn


# ------------------------------------------------------------------------------- engine


def _expand_batch(obj, n_base: int, index: torch.Tensor):
    """Index-select every tensor whose leading axis is the base batch (recursing tuples)."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 2 and obj.shape[0] == n_base and index.numel() != n_base:
            return obj.index_select(0, index.to(obj.device))
        return obj
    if isinstance(obj, tuple | list):
        return type(obj)(_expand_batch(o, n_base, index) for o in obj)
    return obj


def run_rows(
    model: TransformerBridge,
    base_tokens: Int[torch.Tensor, "batch pos"],
    row_prompt: Int[torch.Tensor, " row"],
    row_layer: Int[torch.Tensor, " row"],
    make_hooks: Callable[[torch.Tensor, int], HookList],
    metric: LogitDiff,
    *,
    max_rows: int,
    grow: bool = True,
) -> tuple[Float[torch.Tensor, " row"], Float[torch.Tensor, " batch"]]:
    """The batched-forward engine: the metric of every patched row, plus the base metric.

    Rows must be sorted by ``row_layer`` (the first block their patch touches). A chunk of
    ``<= max_rows`` rows is one forward of batch ``[base prompts; rows]`` (chunk row ``j`` at
    ``batch + j``); ``make_hooks(rows, offset=batch)`` gives the hooks for global rows ``rows``.
    With ``grow`` a row joins the batch just before block ``row_layer`` as a copy of its base
    prompt's residual (exact: the blocks before its patch compute the same thing).

    Returns:
        ``[row]`` metric per row and ``[batch]`` metric of the unpatched base prompts.
    """
    if bool((row_layer[1:] < row_layer[:-1]).any()):
        raise ValueError("row_layer must be sorted ascending (rows join at their layer).")
    dev = model_device(model)
    base_tokens = base_tokens.to(dev)
    n_base, n_rows = base_tokens.shape[0], row_prompt.numel()
    out = torch.empty(n_rows, device=dev)
    base_metric = None
    all_prompts = torch.arange(n_base)
    for start in range(0, max(n_rows, 1), max_rows):
        rows = torch.arange(start, min(start + max_rows, n_rows))
        prompts, layers = row_prompt[rows], row_layer[rows]
        batch_prompt = torch.cat([all_prompts, prompts])
        # Keep the metric's position only, so the unembedding works on one position per row.
        pos_of = metric.position.to(dev)[batch_prompt.to(dev)]
        hooks = [*make_hooks(rows, n_base), ("unembed.hook_in", narrow_to(pos_of))]
        handles = []
        tokens = base_tokens
        if grow and n_rows:
            # Every block from the first growth on needs the hook: HF passes the base-batch
            # attention mask to each block, which must be expanded to the grown batch.
            for layer in range(int(layers.min()), int(model.cfg.n_layers)):
                grow_to = batch_prompt[: n_base + int((layers <= layer).sum())].to(dev)
                block = model.blocks[layer]
                handles.append(
                    block.register_forward_pre_hook(_grower(n_base, grow_to), with_kwargs=True)
                )
        else:
            tokens = base_tokens[batch_prompt.to(dev)]
        try:
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        finally:
            for h in handles:
                h.remove()
        values = metric.at(logits, batch_prompt)
        out[rows.to(dev)] = values[n_base:]
        if base_metric is None:
            base_metric = values[:n_base]
    return out, base_metric


def _grower(n_base: int, index: torch.Tensor):
    """Forward pre-hook for a block: grow the batch to ``index`` (row -> base prompt).

    The residual entering the block holds the rows already present; new rows are copies of
    their base prompt's row (identical so far, since their patch starts in this block).
    """

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], ()
        have = hidden.shape[0]
        hidden = torch.cat([hidden, hidden.index_select(0, index[have:])])
        rest = _expand_batch(rest, n_base, index)
        kwargs = {k: _expand_batch(v, n_base, index) for k, v in kwargs.items()}
        if args:
            return (hidden, *rest), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    return hook
