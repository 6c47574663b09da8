"""Batched activation patching by layer x position [x head], exact against transformer-lens.

transformer-lens's ``transformer_lens.patching`` runs one full forward pass per patched
(layer, position[, head]) cell. Here many cells ride in one forward pass as *rows* of a
batch (row = one prompt with one cell patched), chunked to a memory budget, with the metric
(a logit difference at the action position) kept on device and read back once per chunk.

Exact savings (directions as in Heimersheim & Nanda 2024; docs/science.md section 5):

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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from kdgap.hooks.patch import suffix
from kdgap.hooks.patch.core import (
    HookList,
    LogitDiff,
    Tokens,
    capture,
    check_pair_tokens,
    hook_name,
    run_rows,
    set_at,
)
from kdgap.hooks.patch.suffix import SUFFIX_SITES, native_model
from kdgap.models.runtime import model_device, require_eval

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

DIRECTIONS = ("denoise", "noise")
#: Row engines of :func:`patch_sweep` (see its ``engine`` argument).
ENGINES = ("auto", "native", "bridge")


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


def check_engine(
    engine: str, nm: torch.nn.Module | None, sites: Sequence[str], model: TransformerBridge
) -> None:
    """Raise unless ``engine`` is known, and ``"native"`` only where it applies (``nm``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is unknown; use one of {ENGINES}.")
    if engine == "native" and nm is None:
        raise ValueError(
            f"engine='native' needs a causal native bridge (boot_native) with no hooks "
            f"attached and sites in {SUFFIX_SITES}, got sites={list(sites)!r} on "
            f"{type(getattr(model, 'original_model', model)).__name__}; use engine='auto'."
        )


def make_cells(
    n_layers: int,
    n_pos: int,
    n_heads: int | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Int[torch.Tensor, "cell idx"]:
    """All ``(layer, pos[, head])`` cells, layer-major: ``[cell 2]`` or ``[cell 3]``."""
    ls = torch.as_tensor(list(range(n_layers)) if layers is None else list(layers))
    ps = torch.as_tensor(list(range(n_pos)) if positions is None else list(positions))
    axes = [ls, ps] + ([torch.arange(n_heads)] if n_heads else [])
    return torch.cartesian_prod(*axes).reshape(-1, len(axes)).long()


def default_max_rows(model: TransformerBridge, n_pos: int, memory_mb: float) -> int:
    """Rows per chunk so one forward stays within ``memory_mb`` (a rough activation count)."""
    c = model.cfg
    d_mlp = getattr(c, "d_mlp", None) or 4 * c.d_model
    floats = n_pos * (12 * c.d_model + 3 * d_mlp + 3 * c.n_heads * n_pos)
    return max(1, int(memory_mb * 2**20 / (4 * floats)))


def patch_sweep(
    model: TransformerBridge, clean_tokens: Tokens, corrupt_tokens: Tokens, metric: LogitDiff,
    site: str = "resid_pre", *, direction: str = "denoise",
    cells: Int[torch.Tensor, "cell idx"] | None = None, layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None, memory_mb: float = 256.0,
    max_rows: int | None = None, grow: bool = True, skip_identical: bool = True,
    engine: str = "auto",
) -> PatchResult:  # fmt: skip
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
        engine: ``"native"`` runs each row from its layer and position only, on the
            native model's own modules (:mod:`~kdgap.hooks.patch.suffix`; native bridges,
            no hooks attached, sites in ``SUFFIX_SITES``); ``"bridge"`` runs rows through
            the bridge's hooks (:func:`~kdgap.hooks.patch.core.run_rows`, any model and
            site); ``"auto"`` (default) takes ``"native"`` where it applies.

    Returns:
        :class:`PatchResult` with ``values`` ``[batch layer pos (head)]`` or ``[batch cell]``.
    """
    require_eval(model, "activation patching")
    check_pair_tokens(clean_tokens, corrupt_tokens)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use one of {DIRECTIONS}.")
    hook_name(site, 0)  # validates site
    nm = None if engine == "bridge" else native_model(model, site)
    check_engine(engine, nm, [site], model)
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
    if nm is not None:  # the suffix engine's own full runs give both sides' activations
        with torch.no_grad():
            pair = (("src", source), ("base", base))
            runs = {k: suffix.run(nm, t.to(dev), metric, [site]) for k, t in pair}
        src_acts = {hook_name(site, i): a for i, a in enumerate(runs["src"].acts[site])}
        ld_source = runs["src"].metric
    else:
        src_acts, src_logits = capture(model, source.to(dev), names)
        ld_source = metric.at(src_logits, torch.arange(batch))
    order = torch.argsort(cells[:, 0], stable=True)
    sorted_cells = cells[order]
    # Row r = (cell r // batch, prompt r % batch), sorted by layer.
    row_cell = sorted_cells.repeat_interleave(batch, 0)
    row_prompt = torch.arange(batch).repeat(len(cells))
    ld_base, all_prompt = None, row_prompt
    if skip_identical:
        if nm is not None:
            base_acts = {hook_name(site, i): a for i, a in enumerate(runs["base"].acts[site])}
            ld_base = runs["base"].metric
        else:
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
            at = tuple(rc[sel, 1:].T.to(dev))  # (pos,) or (pos, head) of each row
            name = hook_name(site, layer)
            setter = partial(set_at, index=(idx, *at), src=src_acts[name],
                             src_index=(rp[sel].to(dev), *at))  # fmt: skip
            hooks.append((name, setter))
        return hooks

    max_rows = max_rows or default_max_rows(model, n_pos, memory_mb)
    if nm is not None:
        with torch.no_grad():
            flat = suffix.suffix_rows(
                nm, runs["base"], runs["src"], site, row_prompt, row_cell[:, 0],
                row_cell[:, 1], metric, max_rows=max_rows,
            )  # fmt: skip
        ld_run = runs["base"].metric
    else:
        flat, ld_run = run_rows(model, base, row_prompt, row_cell[:, 0], make_hooks, metric,
                                max_rows=max_rows, grow=grow)  # fmt: skip
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
