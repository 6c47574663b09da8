"""Attribution patching: every layer x position x component from 2 forward + 1 backward.

First-order estimate of an activation patch (Nanda 2023; AtP*, Kramar et al. 2024):

    LD(patched) - LD(base)  ~=  (a_source - a_base) . dLD/da  at the base run

for every activation ``a`` at once: one forward of the source run (activations), one
forward and one backward of the base run (activations and gradients). It is a *screen*:
poor for large changes (residual stream, early MLPs), so validate the top cells exactly
with :func:`verify_top_k`, which re-runs them through the batched exact
:func:`~kdgap.hooks.patch.sweep.patch_sweep`.

Gradients are taken with respect to a zero tensor added at each hook (``a + 0``), which
leaves the forward unchanged and needs no ``retain_grad`` on bridge-internal tensors.

Cost: the source run stops after the last block (it needs no logits) and the base run's
unembedding sees the metric's position only, so neither computes ``pos x d_vocab`` logits
(forward or backward); the effects equal those from full forwards (tested). What is left
is one no-grad forward, one forward and one backward through the bridge's blocks, which is
where the time goes (the hooks and the dot products are a small part of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from kdgap.hooks.patch import suffix
from kdgap.hooks.patch.core import (
    PATCH_SITES,
    HookFn,
    LogitDiff,
    Tokens,
    capture,
    capture_hook,
    check_pair_tokens,
    hook_name,
    narrow_to,
)
from kdgap.hooks.patch.suffix import native_model
from kdgap.hooks.patch.sweep import DIRECTIONS, check_engine, patch_sweep
from kdgap.models.runtime import model_device, require_eval

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class Attribution:
    """Estimated patch effects (``LD_patched - LD_base``) per site.

    Attributes:
        effects: ``{site: [batch layer pos]}`` (``[batch layer pos head]`` for ``z``).
        ld_base: ``[batch]`` metric of the base run (clean when noising).
        direction: ``"noise"`` (base clean, source corrupt) or ``"denoise"``.
    """

    effects: dict[str, torch.Tensor]
    ld_base: Float[torch.Tensor, " batch"]
    direction: str

    def top_k(self, site: str, k: int) -> Int[torch.Tensor, "k idx"]:
        """The ``k`` cells with the largest prompt-mean ``|effect|``: ``[k 2|3]``."""
        mean = self.effects[site].mean(0)
        k = min(int(k), mean.numel())
        flat = torch.topk(mean.abs().flatten(), k).indices
        return torch.stack(torch.unravel_index(flat, mean.shape), dim=1).long()


def attribution_sweep(
    model: TransformerBridge, clean_tokens: Tokens, corrupt_tokens: Tokens, metric: LogitDiff,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"), *, direction: str = "noise",
    engine: str = "auto",
) -> Attribution:  # fmt: skip
    """Gradient x activation-difference estimate of every patch of ``sites``.

    Args:
        model: a TransformerBridge in eval mode.
        clean_tokens, corrupt_tokens: ``[batch pos]``, equal shapes.
        metric: the logit difference at the action position.
        sites: any of :data:`~kdgap.hooks.patch.core.PATCH_SITES`; ``z`` gives per-head cells.
        direction: ``"noise"`` (linearise at clean, patch in corrupt) or ``"denoise"``.
        engine: as in :func:`~kdgap.hooks.patch.sweep.patch_sweep`: ``"native"`` runs the
            native model's own modules (native bridges, no hooks, every site in
            ``SUFFIX_SITES``), ``"bridge"`` the bridge's hooks, ``"auto"`` the first that
            applies.

    Returns:
        :class:`Attribution` with ``effects[site]`` ``[batch layer pos (head)]``; it
        estimates ``patch_sweep(..., site, direction=direction).values - ld_base``.
    """
    require_eval(model, "attribution patching")
    check_pair_tokens(clean_tokens, corrupt_tokens)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use one of {DIRECTIONS}.")
    bad = [s for s in sites if s not in PATCH_SITES]
    if bad:
        raise ValueError(f"sites={list(sites)!r}: {bad} are not patch sites {PATCH_SITES}.")
    base, source = (
        (clean_tokens, corrupt_tokens) if direction == "noise" else (corrupt_tokens, clean_tokens)
    )
    dev, n_layers = model_device(model), int(model.cfg.n_layers)
    names = [hook_name(s, layer) for s in sites for layer in range(n_layers)]
    nm = None if engine == "bridge" else native_model(model, sites)
    check_engine(engine, nm, sites, model)
    if nm is not None:
        src_acts, acts, grads, ld = _native_grads(nm, base.to(dev), source.to(dev), metric, sites)
    else:
        src_acts, acts, grads, ld = _bridge_grads(model, base.to(dev), source.to(dev), metric,
                                                  names)  # fmt: skip
    effects: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for site in sites:
            per_layer = []
            for layer in range(n_layers):
                name = hook_name(site, layer)
                g, a = grads[name], acts[name]
                # Sum over the feature axis: d_model, or d_head for per-head z.
                per_layer.append(
                    a.new_zeros(a.shape[:-1])
                    if g is None
                    else torch.linalg.vecdot(src_acts[name] - a, g)
                )
            effects[site] = torch.stack(per_layer, 1).cpu()
    return Attribution(effects, ld.detach().cpu(), direction)


#: ``(source activations, base activations, gradients, base metric)``, keyed by hook name.
Grads = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor | None],
              torch.Tensor]  # fmt: skip


def _bridge_grads(
    model: TransformerBridge, base: Tokens, source: Tokens, metric: LogitDiff, names: list[str]
) -> Grads:
    """Activations of both runs and the metric's gradients, through the bridge's hooks."""
    # Source run: activations only (it stops early and skips the pos x vocab logits).
    src_acts, _ = capture(model, source, names, logits=False)
    zeros: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def tap(name: str) -> HookFn:
        keep = capture_hook(acts, name, torch.Tensor.detach)

        def fn(x, hook):
            keep(x, hook)
            zeros[name] = torch.zeros_like(x, requires_grad=True)
            return x + zeros[name]

        return fn

    # Base run with gradients; the unembedding sees the metric's position only.
    hooks = [(n, tap(n)) for n in names] + [("unembed.hook_in", narrow_to(metric.position))]
    with torch.enable_grad():
        logits = model.run_with_hooks(base, fwd_hooks=hooks)
        ld = metric.at(logits, torch.arange(base.shape[0]))
        grads = torch.autograd.grad(ld.sum(), [zeros[n] for n in names], allow_unused=True)
    return src_acts, acts, dict(zip(names, grads, strict=True)), ld


def _native_grads(
    nm: torch.nn.Module, base: Tokens, source: Tokens, metric: LogitDiff, sites: Sequence[str]
) -> Grads:
    """The same on a native bridge's own modules (:mod:`~kdgap.hooks.patch.suffix`), with
    no hook points: the bridge's per-sub-step hooks are most of a small model's time."""
    with torch.no_grad():
        src = suffix.run(nm, source, metric, sites)
    acts: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}
    layer = {s: 0 for s in sites}

    def tap(site: str, act: torch.Tensor) -> torch.Tensor:
        if site not in layer:
            return act
        name, layer[site] = hook_name(site, layer[site]), layer[site] + 1
        acts[name] = act.detach()
        zeros[name] = torch.zeros_like(act, requires_grad=True)
        return act + zeros[name]

    with torch.enable_grad():
        ld = suffix.run(nm, base, metric, tap=tap).metric
        names = list(zeros)
        grads = torch.autograd.grad(ld.sum(), [zeros[n] for n in names], allow_unused=True)
    src_acts = {hook_name(s, i): a for s in sites for i, a in enumerate(src.acts[s])}
    return src_acts, acts, dict(zip(names, grads, strict=True)), ld


@dataclass
class TopKCheck:
    """Attribution vs exact patching on the top-k cells of one site.

    Attributes:
        cells: ``[k 2|3]`` (layer, pos[, head]).
        estimated: ``[k]`` prompt-mean attribution estimate of the effect.
        exact: ``[k]`` prompt-mean exact effect (``LD_patched - LD_base``).
    """

    cells: Int[torch.Tensor, "k idx"]
    estimated: Float[torch.Tensor, " k"]
    exact: Float[torch.Tensor, " k"]

    @property
    def abs_error(self) -> Float[torch.Tensor, " k"]:
        """``[k]`` |estimated - exact|."""
        return (self.estimated - self.exact).abs()


def verify_top_k(
    model: TransformerBridge, clean_tokens: Tokens, corrupt_tokens: Tokens, metric: LogitDiff,
    attribution: Attribution, site: str, k: int = 10, **patch_kwargs: Any,
) -> TopKCheck:  # fmt: skip
    """Re-run the ``k`` strongest attributed cells of ``site`` with exact patching.

    ``patch_kwargs`` go to :func:`~kdgap.hooks.patch.sweep.patch_sweep` (e.g. ``memory_mb``).
    """
    if site not in attribution.effects:
        raise KeyError(
            f"site={site!r} was not attributed; attribution has {sorted(attribution.effects)}."
        )
    cells = attribution.top_k(site, k)
    exact = patch_sweep(
        model, clean_tokens, corrupt_tokens, metric, site,
        direction=attribution.direction, cells=cells, **patch_kwargs,
    )  # fmt: skip
    base = exact.ld_clean if attribution.direction == "noise" else exact.ld_corrupt
    est = attribution.effects[site].mean(0)[tuple(cells.T)]
    return TopKCheck(cells, est, (exact.values - base[:, None]).mean(0))
