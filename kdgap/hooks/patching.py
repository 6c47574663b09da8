"""Batched activation patching by layer x position [x head], exact against transformer-lens.

transformer-lens's ``transformer_lens.patching`` runs one full forward pass per patched
(layer, position[, head]) cell. Here many cells ride in one forward pass as *rows* of a
batch (row = one prompt with one cell patched), chunked to a memory budget, with the metric
(a logit difference at the action position) kept on device and read back once per chunk.

Exact savings (directions as in Heimersheim & Nanda 2024; science.md section 5):

- **Rows join at their layer.** A patch at layer ``l`` leaves blocks ``< l`` unchanged:
  each chunk starts as the ``batch`` base prompts and, just before block ``l``, a forward
  pre-hook appends the rows patched at ``l`` as copies of their base prompt's residual
  (``grow=True``); batch-axis tensors passed between blocks (HF's 4-D mask) are expanded.
- **Identical patches are skipped.** A row whose source activation equals the base's bit
  for bit (every position before the first edited token) is the base run: no forward.
- **Logits only at the action position**: the unembedding input is narrowed to it.

``"denoise"`` runs the corrupt prompt and patches in clean activations (sufficiency);
``"noise"`` runs the clean prompt and patches in corrupt ones (necessity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from kdgap.hooks.plumbing import HOOK_KINDS, model_device, require_eval, stop_layer_for

#: Sites patchable by :func:`patch_sweep`; ``z`` is the per-head attention output.
PATCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
DIRECTIONS = ("denoise", "noise")
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
                "pick arms whose first tokens differ (see kdgap.hooks.pairs.arm_token)."
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
            "token count (kdgap.hooks.pairs checks this) or group pairs by length."
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


@dataclass
class PatchResult:
    """Per-prompt patched metric for a sweep.

    Attributes:
        values: ``[batch *cells]``: ``[batch layer pos]``, ``[batch layer pos head]`` for
            ``z``, or ``[batch cell]`` when explicit ``cells`` were given.
        ld_clean: ``[batch]`` metric of the unpatched clean run.
        ld_corrupt: ``[batch]`` metric of the unpatched corrupt run.
        site, direction: what was patched, and how.
    """

    values: torch.Tensor
    ld_clean: Float[torch.Tensor, " batch"]
    ld_corrupt: Float[torch.Tensor, " batch"]
    site: str
    direction: str

    def mean(self) -> torch.Tensor:
        """``[*cells]`` metric averaged over prompts (what ``reduce='mean'`` gives in TL)."""
        return self.values.mean(0)

    def normalised(self) -> torch.Tensor:
        """``[*cells]`` (LD - LD_corrupt) / (LD_clean - LD_corrupt), on prompt means.

        1 = the patched run behaves like clean, 0 = like corrupt (either direction).
        """
        lc, lx = self.ld_clean.mean(), self.ld_corrupt.mean()
        if abs(float(lc - lx)) < 1e-8:
            raise ZeroDivisionError(
                f"LD_clean == LD_corrupt (= {float(lc):.4g}): the edit has no effect on the "
                "metric, so the normalised effect is undefined; use .mean() instead."
            )
        return (self.mean() - lx) / (lc - lx)


def make_cells(
    n_layers: int, n_pos: int, n_heads: int | None = None, layers=None, positions=None
) -> Int[torch.Tensor, "cell idx"]:
    """All ``(layer, pos[, head])`` cells, layer-major: ``[cell 2]`` or ``[cell 3]``."""
    ls = torch.as_tensor(list(range(n_layers)) if layers is None else list(layers))
    ps = torch.as_tensor(list(range(n_pos)) if positions is None else list(positions))
    axes = [ls, ps] + ([torch.arange(n_heads)] if n_heads else [])
    return torch.cartesian_prod(*axes).reshape(-1, len(axes)).long()


def default_max_rows(model, n_pos: int, memory_mb: float) -> int:
    """Rows per chunk so one forward stays within ``memory_mb`` (a rough activation count)."""
    c = model.cfg
    d_mlp = getattr(c, "d_mlp", None) or 4 * c.d_model
    floats = n_pos * (12 * c.d_model + 3 * d_mlp + 3 * c.n_heads * n_pos)
    return max(1, int(memory_mb * 2**20 / (4 * floats)))


def patch_sweep(
    model,
    clean_tokens: Int[torch.Tensor, "batch pos"],
    corrupt_tokens: Int[torch.Tensor, "batch pos"],
    metric: LogitDiff,
    site: str = "resid_pre",
    *,
    direction: str = "denoise",
    cells: Int[torch.Tensor, "cell idx"] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    memory_mb: float = 256.0,
    max_rows: int | None = None,
    grow: bool = True,
    skip_identical: bool = True,
) -> PatchResult:
    """Patch ``site`` at every (layer, pos[, head]) cell, many cells per forward pass.

    Equals ``transformer_lens.patching.get_act_patch_<site>`` with ``reduce='none'`` (per
    prompt) on ``direction='denoise'`` (TL patches clean into corrupt), to float precision.

    Args:
        model: a TransformerBridge in eval mode.
        clean_tokens, corrupt_tokens: ``[batch pos]``, equal shapes, unpadded.
        metric: the :class:`LogitDiff` read at the action position.
        site: one of :data:`PATCH_SITES` (``z`` adds a head axis).
        direction: ``"denoise"`` (clean into corrupt) or ``"noise"`` (corrupt into clean).
        cells: explicit ``[cell 2|3]`` (layer, pos[, head]) cells; default: the full grid
            over ``layers`` x ``positions`` [x heads].
        memory_mb, max_rows: chunk size (``max_rows`` wins when given).
        grow: rows join at their layer (exact; ``False`` recomputes early layers).
        skip_identical: rows whose patch changes nothing (bit for bit) take the base
            metric without a forward (exact; e.g. positions before the first edit).

    Returns:
        :class:`PatchResult` with ``values`` ``[batch layer pos (head)]`` or ``[batch cell]``.
    """
    require_eval(model, "activation patching")
    check_pair_tokens(clean_tokens, corrupt_tokens)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use one of {DIRECTIONS}.")
    hook_name(site, 0)  # validates site
    n_layers, (batch, n_pos) = int(model.cfg.n_layers), clean_tokens.shape
    heads = int(model.cfg.n_heads) if site == "z" else None
    grid = cells is None
    if grid:
        cells = make_cells(n_layers, n_pos, heads, layers, positions)
    cells = torch.as_tensor(cells).long()
    if cells.ndim != 2 or cells.shape[1] != (3 if heads else 2):
        want = "(layer, pos, head)" if heads else "(layer, pos)"
        raise ValueError(
            f"cells has shape {tuple(cells.shape)}; site={site!r} needs one {want} per row."
        )
    base, source = (
        (corrupt_tokens, clean_tokens) if direction == "denoise" else (clean_tokens, corrupt_tokens)
    )
    dev = model_device(model)
    names = sorted({hook_name(site, int(layer)) for layer in cells[:, 0].unique()})
    src_acts, src_logits = capture(model, source.to(dev), names)
    ld_source = metric.at(src_logits, torch.arange(batch))
    order = torch.argsort(cells[:, 0], stable=True)
    sorted_cells = cells[order]
    # Row r = (cell r // batch, prompt r % batch), sorted by layer.
    row_cell = sorted_cells.repeat_interleave(batch, 0)
    row_prompt = torch.arange(batch).repeat(len(cells))
    ld_base, all_prompt = None, row_prompt
    if skip_identical:
        base_acts, base_logits = capture(model, base.to(dev), names)
        ld_base = metric.at(base_logits, torch.arange(batch))
        differs = torch.zeros(len(row_cell), dtype=torch.bool)
        for layer in row_cell[:, 0].unique().tolist():
            sel, name = torch.nonzero(row_cell[:, 0] == layer).flatten(), hook_name(site, layer)
            ix = (row_prompt[sel], *row_cell[sel, 1:].T)
            differs[sel] = (src_acts[name][ix] != base_acts[name][ix]).flatten(1).any(1).cpu()
        row_cell, row_prompt = row_cell[differs], row_prompt[differs]

    def make_hooks(rows: torch.Tensor, offset: int) -> HookList:
        hooks = []
        rc, rp = row_cell[rows], row_prompt[rows]
        for layer in rc[:, 0].unique().tolist():
            sel = rc[:, 0] == layer
            idx = (offset + torch.nonzero(sel).flatten()).to(dev)
            pos, prm = rc[sel, 1].to(dev), rp[sel].to(dev)
            head = rc[sel, 2].to(dev) if heads else None
            src = src_acts[hook_name(site, layer)]
            hooks.append((hook_name(site, layer), _setter(idx, pos, prm, head, src)))
        return hooks

    max_rows = max_rows or default_max_rows(model, n_pos, memory_mb)
    flat, ld_run = run_rows(
        model, base, row_prompt, row_cell[:, 0], make_hooks, metric, max_rows=max_rows, grow=grow
    )
    if ld_base is None:
        ld_base = ld_run
    else:  # skipped rows keep the base metric
        flat, kept = ld_base[all_prompt.to(dev)].clone(), flat
        flat[differs.to(dev)] = kept
    per_cell = torch.empty(len(cells), batch, device=flat.device)
    per_cell[order.to(flat.device)] = flat.reshape(len(cells), batch)
    values = per_cell.T.cpu()
    if grid:
        n_l = len(layers) if layers is not None else n_layers
        n_p = len(positions) if positions is not None else n_pos
        values = values.reshape(batch, n_l, n_p, *([heads] if heads else []))
    ld_clean, ld_corrupt = (ld_source, ld_base) if direction == "denoise" else (ld_base, ld_source)
    return PatchResult(values, ld_clean.cpu(), ld_corrupt.cpu(), site, direction)


def __getattr__(name: str):
    # example_heatmap builds pairs, so it lives in kdgap.hooks.mediation (no import cycle).
    if name == "example_heatmap":
        from kdgap.hooks.mediation import example_heatmap

        return example_heatmap
    raise AttributeError(f"module 'kdgap.hooks.patching' has no attribute {name!r}")


def _setter(idx, pos, prm, head, src):
    """Hook writing ``src[prompt, pos(, head)]`` into rows ``idx`` of the activation."""

    at = (pos,) if head is None else (pos, head)

    def fn(act, hook):
        act[(idx, *at)] = src[(prm, *at)]
        return act

    return fn
