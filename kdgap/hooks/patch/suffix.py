"""Exact activation patching on native bridges that recomputes only what a patch can change.

A patch at (layer ``l``, position ``p``) changes nothing before block ``l`` and nothing at
positions before ``p`` (attention is causal), so every row of a sweep needs only the
*suffix* ``p..pos-1`` of blocks ``l..n_layers-1``: its queries attend to the base run's
cached keys and values for positions ``< p`` (the prefix is shared by every row of a
prompt, across layers) and to freshly computed ones from ``p`` on. The bridge engine
(:func:`~kdgap.hooks.patch.core.run_rows`) already starts rows at their layer; this engine
also drops the prefix and the hook points, running the wrapped ``NativeModel``'s own
submodules on the shared parameter tensors (as :mod:`kdgap.agent.native_decoding` does for
generation). For an edit near the start of the prompt (a history edit) nearly every cell
differs from the base, so these savings are what remains; for an edit near the end (a
conclusion edit) most cells are skipped as identical before any engine runs.

Rows are grouped by patched position (one suffix length per forward), joined at their layer
as copies of their base prompt's residual, chunked to ``max_rows``. Exact up to float
rounding (a suffix attends over the same keys in another matrix shape): tested against
``transformer_lens.patching`` and the bridge engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from kdgap.hooks.patch.core import LogitDiff
from kdgap.models.runtime import causal_native as _causal_native
from kdgap.models.runtime import has_hooks
from kdgap.models.twins import native_twin

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

#: Sites this engine patches: the residual stream and the two block outputs (``z``, a
#: per-head site, stays on the bridge engine).
SUFFIX_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


#: ``tap(site, activation) -> activation``: reads or edits an activation as it is computed
#: (the suffix engine's counterpart of a hook).
Tap = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class Run:
    """One full forward of the native model, with what the suffix rows reuse.

    Attributes:
        acts: ``{site: [layer] -> [batch pos d_model]}`` activations of the tapped sites.
        resid: ``[layer] -> [batch pos d_model]`` residual entering each block.
        keys, values: ``[layer] -> [batch kv_heads pos d_head]`` (rotary applied).
        metric: ``[batch]`` the metric of the run.
    """

    acts: dict[str, list[torch.Tensor]]
    resid: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    metric: Float[torch.Tensor, " batch"]


def native_model(model: TransformerBridge, sites: str | Sequence[str]) -> torch.nn.Module | None:
    """The hook-free ``NativeModel`` this engine runs for ``model`` and ``sites``, or None
    (not a causal native bridge, a hook is attached, a per-head site, or no twin)."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    if any(s not in SUFFIX_SITES for s in sites) or not _causal_native(model):
        return None
    return None if has_hooks(model) else native_twin(model)


def block(
    blk: torch.nn.Module,
    h: Float[torch.Tensor, "row q d"],
    start: int,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    tap: Tap | None = None,
    narrow: Int[torch.Tensor, " row"] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``NativeBlock`` on positions ``start..start+q-1``: ``(h, keys, values)``.

    Reproduces ``NativeBlock.forward`` (pre-norm, scale, soft cap, GQA ``repeat_interleave``,
    rotary at absolute positions). ``prefix``: ``(keys, values)`` ``[row kv_heads start
    d_head]`` of the earlier positions. ``tap`` sees every site of :data:`SUFFIX_SITES` as
    it is computed. ``narrow``: ``[row]`` the one (local) position each row needs after
    this block, the metric's in the last block: keys and values are computed everywhere
    (that query reads them), the query, attention output and MLP at that position only, so
    the sites after ``resid_pre`` (and ``h``) are ``[row 1 d]``.
    """
    at = tap or (lambda site, act: act)
    attn = blk.attn
    h = at("resid_pre", h)
    b, q, _ = h.shape
    x = blk.ln1(h)
    kh = attn.k(x).view(b, q, attn.n_kv_heads, attn.d_head).transpose(1, 2)
    vh = attn.v(x).view(b, q, attn.n_kv_heads, attn.d_head).transpose(1, 2)
    local = torch.arange(q, device=h.device).expand(b, q)
    if narrow is not None:
        rows = torch.arange(b, device=h.device)
        x, h, local = x[rows, narrow][:, None], h[rows, narrow][:, None], narrow[:, None]
    qh = attn.q(x).view(b, local.shape[1], attn.n_heads, attn.d_head).transpose(1, 2)
    if attn.rotary is not None:
        qh = attn.rotary.apply_rope(qh, qh, position_ids=start + local)[0]
        kpos = torch.arange(start, start + q, device=h.device).expand(b, q)
        kh = attn.rotary.apply_rope(kh, kh, position_ids=kpos)[1]
    k_all, v_all = kh, vh
    if prefix is not None and start:
        k_all, v_all = torch.cat([prefix[0], kh], 2), torch.cat([prefix[1], vh], 2)
    if attn.kv_repeats > 1:
        k_all = k_all.repeat_interleave(attn.kv_repeats, dim=1)
        v_all = v_all.repeat_interleave(attn.kv_repeats, dim=1)
    scores = torch.matmul(qh, k_all.transpose(-2, -1)) / attn.scale
    scores = apply_softcap(scores, attn.attn_scores_soft_cap)
    # Key j is hidden from the query at absolute position start + local when j > it.
    masked = torch.arange(start + q, device=h.device) > (start + local)[..., None]
    pattern = F.softmax(scores.masked_fill(masked[:, None], float("-inf")), dim=-1)
    out = attn.o(torch.matmul(pattern, v_all).transpose(1, 2).reshape(b, local.shape[1], -1))
    h = at("resid_mid", h + at("attn_out", out))
    if not blk.cfg.attn_only:
        h = h + at("mlp_out", blk.mlp(blk.ln2(h)))
    return at("resid_post", h), kh, vh


def apply_softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """transformer-lens's native soft cap (imported on first use: importing transformer-lens
    would slow down ``import kdgap.hooks``)."""
    from transformer_lens.model_bridge.sources.native.model import apply_softcap as softcap

    return softcap(x, cap)


def logits_at(nm: torch.nn.Module, h: Float[torch.Tensor, "row 1 d"]) -> torch.Tensor:
    """``[row 1 vocab]`` logits of final residuals (final norm, unembedding, soft cap)."""
    return apply_softcap(nm.head(nm.ln_out(h)), nm.output_logits_soft_cap)


def positions(metric: LogitDiff, batch: int, n_pos: int) -> Int[torch.Tensor, " batch"]:
    """``[batch]`` absolute metric position of each prompt (``-1`` resolved), on the CPU."""
    pos = metric.position.cpu()
    pos = pos.expand(batch) if pos.numel() == 1 else pos[:batch]
    return torch.where(pos < 0, pos + n_pos, pos)


def run(
    nm: torch.nn.Module,
    tokens: Int[torch.Tensor, "batch pos"],
    metric: LogitDiff,
    sites: Sequence[str] = (),
    tap: Tap | None = None,
) -> Run:
    """A full forward of ``tokens``: the activations of ``sites``, the residuals, keys and
    values of every block, and the metric; ``tap`` (after the recording) may edit any site.
    """
    batch, n_pos = tokens.shape
    h = nm.tok_embed(tokens)
    if nm.pos is not None:
        h = h + nm.pos(torch.arange(n_pos, device=tokens.device))
    acts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}

    def record(site: str, act: torch.Tensor) -> torch.Tensor:
        if site in acts:
            acts[site].append(act)
        return act if tap is None else tap(site, act)

    resid, keys, values = [], [], []
    for blk in nm.layers:
        resid.append(h)
        h, k, v = block(blk, h, 0, tap=record)
        keys.append(k)
        values.append(v)
    pos = positions(metric, batch, n_pos).to(h.device)
    last = h[torch.arange(batch, device=h.device), pos][:, None]
    return Run(acts, resid, keys, values, metric.at(logits_at(nm, last), torch.arange(batch)))


def suffix_rows(
    nm: torch.nn.Module,
    base: Run,
    source: Run,
    site: str,
    row_prompt: Int[torch.Tensor, " row"],
    row_layer: Int[torch.Tensor, " row"],
    row_pos: Int[torch.Tensor, " row"],
    metric: LogitDiff,
    *,
    max_rows: int,
) -> Float[torch.Tensor, " row"]:
    """``[row]`` metric of each row: prompt ``row_prompt[r]`` of the base run with ``site``
    at ``(row_layer[r], row_pos[r])`` set to the source run's activation there.

    ``source.acts[site]`` must hold that site; rows are grouped by position, sorted by
    layer within a group and chunked to ``max_rows``.
    """
    n_layers, (batch, n_pos) = len(nm.layers), base.resid[0].shape[:2]
    dev = base.resid[0].device
    mpos = positions(metric, batch, n_pos)
    out = base.metric[row_prompt.to(dev)].clone()  # rows patched after the metric: unchanged
    order = torch.nonzero(row_pos <= mpos[row_prompt]).flatten()
    order = order[torch.argsort(row_pos[order] * n_layers + row_layer[order], stable=True)]
    for p in row_pos[order].unique().tolist():
        group = order[row_pos[order] == p]  # sorted by layer
        for s in range(0, len(group), max_rows):
            rows = group[s : s + max_rows]
            out[rows.to(dev)] = _chunk(
                nm, base, source.acts[site], site, row_prompt[rows], row_layer[rows], p, mpos,
                metric,
            )  # fmt: skip
    return out


def _chunk(
    nm: torch.nn.Module, base: Run, src: list[torch.Tensor], site: str,
    prompts: Int[torch.Tensor, " row"], layers: Int[torch.Tensor, " row"], p: int,
    mpos: Int[torch.Tensor, " batch"], metric: LogitDiff,
) -> Float[torch.Tensor, " row"]:  # fmt: skip
    """Rows patched at position ``p`` (sorted by layer): the suffix ``p..`` only."""
    dev, last = base.resid[0].device, len(nm.layers) - 1
    prompts_d = prompts.to(dev)
    h = base.resid[0].new_empty(0, base.resid[0].shape[1] - p, base.resid[0].shape[2])
    for layer in range(int(layers.min()), last + 1):
        new = torch.nonzero(layers == layer).flatten().to(dev)
        if len(new):  # rows join as copies of their prompt's residual entering this block
            h = torch.cat([h, base.resid[layer][prompts_d[new], p:]])
        n = h.shape[0]
        prefix = (base.keys[layer][prompts_d[:n], :, :p], base.values[layer][prompts_d[:n], :, :p])
        # The last block needs the metric position's output only.
        narrow = (mpos[prompts] - p).to(dev) if layer == last else None
        tap = None
        if len(new):
            tap = partial(_set_first, site=site, rows=new, src=src[layer][prompts_d[new], p],
                          narrow=narrow)  # fmt: skip
        h, _, _ = block(nm.layers[layer], h, p, prefix, tap, narrow)
    return metric.at(logits_at(nm, h), prompts)


def _set_first(
    name: str, act: torch.Tensor, *, site: str, rows: Int[torch.Tensor, " n"],
    src: Float[torch.Tensor, "n d"], narrow: Int[torch.Tensor, " row"] | None,
) -> torch.Tensor:  # fmt: skip
    """Tap: ``act[rows, 0] = src`` at ``site`` (the suffix's first position is the patched
    one). Narrowed to the metric's position, a patch elsewhere after attention reaches
    nothing that is read, so only rows whose kept position is the patched one are set."""
    if name == site:
        if narrow is not None and name != "resid_pre":
            keep = narrow[rows] == 0
            rows, src = rows[keep], src[keep]
        act[rows, 0] = src
    return act
