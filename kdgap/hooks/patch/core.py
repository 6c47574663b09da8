"""The patch core: capture activations, write them back with setters, run patched rows in batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from kdgap.hooks.names import HOOK_KINDS, stop_layer_for
from kdgap.models.runtime import model_device

#: Sites patchable by :func:`patch_sweep`; ``z`` is the per-head attention output.
PATCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")


HookList = list[tuple[str, Callable]]


@dataclass(frozen=True)
class LogitDiff:
    """Metric: ``logit[token_a] - logit[token_b]`` at ``position`` of each prompt.

    Attributes:
        token_a: ``[batch]`` token id of arm A (e.g. the clean rationale's arm).
        token_b: ``[batch]`` token id of arm B (the corrupt arm).
        position: ``[batch]`` position whose next-token logits are read (-1: the last).
    """

    token_a: Int[torch.Tensor, " batch"]
    token_b: Int[torch.Tensor, " batch"]
    position: Int[torch.Tensor, " batch"]

    @classmethod
    def of(cls, token_a, token_b, position=-1, batch: int | None = None) -> LogitDiff:
        """Build from ints or sequences; scalars are broadcast to ``batch`` prompts.

        Raises:
            ValueError: an arm pair uses the same token (the difference would be 0 always).
        """
        n = batch or max(
            (len(x) for x in (token_a, token_b, position) if not isinstance(x, int)), default=1
        )

        def vec(x):
            t = torch.as_tensor(x, dtype=torch.long).flatten()
            return t.expand(n).clone() if t.numel() == 1 else t

        a, b, p = vec(token_a), vec(token_b), vec(position)
        same = torch.nonzero(a == b).flatten().tolist()
        if same:
            raise ValueError(
                f"token_a == token_b (= {a[same[0]].item()}) for prompts {same[:10]}: the two "
                "arms tokenise to the same token, so their logit difference is always 0; "
                "pick arms whose first tokens differ (see kdgap.hooks.patch.pairs.arm_token)."
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
        return at_pos.gather(1, ta[:, None])[:, 0] - at_pos.gather(1, tb[:, None])[:, 0]


def check_pair_tokens(clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor) -> None:
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


def capture(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    names: Sequence[str],
    *,
    logits: bool = True,
) -> tuple[dict[str, torch.Tensor], Float[torch.Tensor, "batch pos vocab"] | None]:
    """One forward pass returning ``{hook name: activation}`` (detached) and the logits.

    Args:
        logits: False: stop after the last block a hook lives in, unembed one position
            at most, and return None for the logits.
    """
    acts: dict[str, torch.Tensor] = {}

    def save(name):
        def fn(x, hook):
            acts[name] = x.detach().clone()
            return x

        return fn

    hooks = [(n, save(n)) for n in names]
    kwargs = {}
    if not logits:
        kwargs["stop_at_layer"] = stop_layer_for(model, names)
        # stop_at_layer == n_layers still runs the unembedding: give it one position only.
        hooks.append(("unembed.hook_in", lambda x, hook: x[:, :1]))
    with torch.no_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
    return acts, (out if logits else None)


def narrow_to(positions: torch.Tensor):
    """Hook keeping position ``positions[r]`` of row ``r`` only: ``[row pos d] -> [row 1 d]``."""

    def fn(x, hook):
        pos = positions.to(x.device)[: x.shape[0]]
        return x[torch.arange(x.shape[0], device=x.device), pos][:, None]

    return fn


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
    model,
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


def _setter(idx, pos, prm, head, src):
    """Hook writing ``src[prompt, pos(, head)]`` into rows ``idx`` of the activation."""

    at = (pos,) if head is None else (pos, head)

    def fn(act, hook):
        act[(idx, *at)] = src[(prm, *at)]
        return act

    return fn
