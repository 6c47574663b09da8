"""Does a probe direction *move* the action? Steering and ablation at the action site.

Decoding is not use (Belinkov 2022; docs/science.md section 4): a direction from which a
probe reads the rationale's arm may be one the model never consults. Here the direction is
intervened on at one hook, only at each example's action position (the position whose
next-token prediction is the action), with the patch core's edit-at-entries setter
(:func:`kdgap.hooks.patch.core.edit_at`), and the change in the model's distribution over
arms is measured:

- **steer**: add ``alpha * u`` (``u`` the unit direction) for each alpha;
- **ablate**: project ``u`` out, ``x - (x . u) u``.

The arm distribution is the softmax of the arm tokens' logits at the action position,
renormalised over arms (an arm with several token variants, e.g. ``" red"`` and ``"red"``,
takes the log-sum-exp of them). Inputs are the model, token batch, positions, hook name
and arm token ids (:func:`kdgap.models.tokens.arm_token_ids` gives them for a format), so
this is independent of transcript formats and store layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from kdgap.hooks.patch.core import edit_at

if TYPE_CHECKING:  # annotations only: importing transformer-lens here would slow every import
    from transformer_lens.model_bridge import TransformerBridge

#: Per arm, a token id or a list of variant ids (e.g. ``arm_token_ids(...)``).
ArmIds = Sequence[int | Sequence[int]]
#: ``[batch seq]`` token ids and ``[batch]`` action positions (each row's next token is
#: the action).
Tokens = Int[torch.Tensor, "batch seq"]
Positions = Int[torch.Tensor, " batch"]
#: A steering direction ``[d_model]`` (normalised where it is used).
Direction = Float[torch.Tensor, " d_model"] | Float[np.ndarray, " d_model"]


def _id_lists(arm_token_ids: ArmIds) -> list[list[int]]:
    """``arm_token_ids`` as one list of variant ids per arm, checked."""
    ids = [[int(a)] if np.ndim(a) == 0 else [int(t) for t in a] for a in arm_token_ids]
    if len(ids) < 2 or any(not v for v in ids):
        raise ValueError(
            f"arm_token_ids={arm_token_ids!r}: give one token id (or a list of variants) "
            "per arm, for at least 2 arms."
        )
    return ids


def _positions(tokens: Tokens, action_positions: Positions) -> Positions:
    pos = torch.as_tensor(action_positions, dtype=torch.long)
    if tokens.ndim != 2 or pos.shape != (tokens.shape[0],):
        raise ValueError(
            f"tokens must be [batch, seq] and action_positions [batch]; got "
            f"{tuple(tokens.shape)} and {tuple(pos.shape)}."
        )
    if (pos < 0).any() or (pos >= tokens.shape[1]).any():
        raise ValueError(f"action_positions={pos.tolist()} out of range for seq length "
                         f"{tokens.shape[1]}.")  # fmt: skip
    return pos


@torch.no_grad()
def arm_distribution(
    model: TransformerBridge, tokens: Tokens, action_positions: Positions, arm_token_ids: ArmIds,
    *, hook_name: str | None = None, edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **forward_kwargs: Any,
) -> Float[torch.Tensor, "batch n_arms"]:  # fmt: skip
    """Distribution over arms at the action position, optionally with an edit at a hook.

    Args:
        model: a TransformerBridge (anything with ``run_with_hooks``).
        tokens: ``[batch seq]`` token ids.
        action_positions: ``[batch]`` position whose next token is the action.
        arm_token_ids: per arm, a token id or a list of variant ids.
        hook_name, edit: if given, ``edit(x: Float[Tensor, "batch d_model"]) -> same`` is
            applied to the activation at ``hook_name`` at the action positions only.
        forward_kwargs: passed to the model (e.g. ``attention_mask``).

    Returns:
        ``[batch n_arms]`` arm probabilities.
    """
    pos = _positions(tokens, action_positions)
    ids = _id_lists(arm_token_ids)
    rows = torch.arange(tokens.shape[0])
    hooks = []
    if edit is not None:
        # On a copy: the edit reaches what reads the hook's output (see edit_at).
        hooks = [(hook_name, partial(edit_at, index=(rows, pos), fn=edit, copy=True))]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **forward_kwargs)
    logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)
    arm_logp = torch.stack([torch.logsumexp(logp[:, v], dim=-1) for v in ids], dim=-1)
    return torch.softmax(arm_logp, dim=-1)


def _unit(direction: Direction) -> Float[torch.Tensor, " d_model"]:
    u = torch.as_tensor(np.asarray(direction), dtype=torch.float32).flatten()
    norm = u.norm()
    if not torch.isfinite(norm) or norm < 1e-12:
        raise ValueError("direction has zero (or non-finite) norm; pass a probe direction.")
    return u / norm


def steer(
    model: TransformerBridge, tokens: Tokens, action_positions: Positions, hook_name: str,
    direction: Direction, alphas: Sequence[float], arm_token_ids: ArmIds, **forward_kwargs: Any,
) -> Float[torch.Tensor, "n_alphas batch n_arms"]:  # fmt: skip
    """Arm distributions with ``alpha * u`` added at the action positions, per alpha.

    ``direction`` is normalised here to ``u``; the rest is as in :func:`arm_distribution`.
    """
    u = _unit(direction)
    return torch.stack([
        arm_distribution(model, tokens, action_positions, arm_token_ids, hook_name=hook_name,
                         edit=lambda x, a=float(a): x + a * u.to(x.dtype), **forward_kwargs)
        for a in alphas
    ])  # fmt: skip


def ablate(
    model: TransformerBridge, tokens: Tokens, action_positions: Positions, hook_name: str,
    direction: Direction, arm_token_ids: ArmIds, **forward_kwargs: Any,
) -> Float[torch.Tensor, "batch n_arms"]:  # fmt: skip
    """Arm distribution with ``u`` (``direction`` normalised) projected out at the action
    positions; the rest is as in :func:`arm_distribution`."""
    u = _unit(direction)

    def project_out(x: torch.Tensor) -> torch.Tensor:
        uu = u.to(x.dtype)
        return x - (x @ uu)[:, None] * uu

    return arm_distribution(model, tokens, action_positions, arm_token_ids,
                            hook_name=hook_name, edit=project_out, **forward_kwargs)  # fmt: skip


@dataclass
class CausalReport:
    """Result of :func:`causal_check`.

    Attributes:
        alphas: steering strengths. baseline: ``[n_arms]`` mean arm distribution.
        steered: ``[n_alphas, n_arms]`` mean distributions. ablated: ``[n_arms]``.
        tv: ``[n_alphas]`` mean per-example total-variation distance from the baseline.
        flips: ``[n_alphas]`` share of examples whose most likely arm changes.
        ablation_tv, ablation_flips: the same for the ablation.
        target_shift: ``[n_alphas]`` mean change of the target arm's probability (None
            without a target arm).
        moves_action: max TV (steering or ablation) >= ``min_tv``.
        decodes: whether the probe decodes (passed in; None if unknown).
        verdict: one sentence.
    """

    alphas: list[float]
    baseline: np.ndarray
    steered: np.ndarray
    ablated: np.ndarray
    tv: np.ndarray
    flips: np.ndarray
    ablation_tv: float
    ablation_flips: float
    moves_action: bool
    decodes: bool | None
    verdict: str
    target_shift: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per intervention (each alpha, then the ablation)."""
        rows = [{"intervention": "steer", "alpha": a, "tv": t, "flips": f}
                for a, t, f in zip(self.alphas, self.tv, self.flips)]  # fmt: skip
        rows.append({"intervention": "ablate", "alpha": np.nan, "tv": self.ablation_tv,
                     "flips": self.ablation_flips})  # fmt: skip
        return pd.DataFrame(rows)


def causal_check(
    model: TransformerBridge, tokens: Tokens, action_positions: Positions, hook_name: str,
    direction: Direction, arm_token_ids: ArmIds, *,
    alphas: Sequence[float] = (-8.0, -4.0, 4.0, 8.0), target_arm: int | None = None,
    decodes: bool | None = None, min_tv: float = 0.05, **forward_kwargs: Any,
) -> CausalReport:  # fmt: skip
    """Steer along and ablate ``direction`` at ``hook_name``; say whether the action moves.

    Args:
        model, tokens, action_positions, arm_token_ids: as :func:`arm_distribution`.
        hook_name: e.g. ``"blocks.2.hook_resid_post"``.
        direction: ``Float[Tensor | ndarray, "d_model"]``, e.g. a probe's
            ``directions_[arm]`` (normalised here; alphas are in activation-norm units,
            so compare them with the residual norm at the site).
        alphas: steering strengths.
        target_arm: arm the direction should promote (reports its probability change).
        decodes: whether the probe from which the direction comes decodes its label
            (e.g. accuracy CI above chance); used only in the verdict.
        min_tv: mean total-variation distance that counts as moving the action.

    Returns:
        :class:`CausalReport`.
    """
    base = arm_distribution(model, tokens, action_positions, arm_token_ids, **forward_kwargs)
    st = steer(model, tokens, action_positions, hook_name, direction, alphas, arm_token_ids,
               **forward_kwargs)  # fmt: skip
    ab = ablate(model, tokens, action_positions, hook_name, direction, arm_token_ids,
                **forward_kwargs)  # fmt: skip
    tv = 0.5 * (st - base).abs().sum(-1).mean(-1)
    flips = (st.argmax(-1) != base.argmax(-1)).float().mean(-1)
    ab_tv = float(0.5 * (ab - base).abs().sum(-1).mean())
    ab_flips = float((ab.argmax(-1) != base.argmax(-1)).float().mean())
    moves = bool(max(float(tv.max()), ab_tv) >= min_tv)
    if decodes is None:
        verdict = "moves the action" if moves else "does not move the action"
    elif decodes:
        verdict = ("decodes and moves the action" if moves
                   else "decodes but does not move the action")  # fmt: skip
    else:
        verdict = "does not decode but moves the action" if moves else "neither decodes nor moves"
    shift = None
    if target_arm is not None:
        shift = (st[..., target_arm] - base[:, target_arm]).mean(-1).numpy()
    return CausalReport(
        alphas=[float(a) for a in alphas], baseline=base.mean(0).numpy(),
        steered=st.mean(1).numpy(), ablated=ab.mean(0).numpy(), tv=tv.numpy(),
        flips=flips.numpy(), ablation_tv=ab_tv, ablation_flips=ab_flips,
        moves_action=moves, decodes=decodes, verdict=verdict, target_shift=shift,
    )  # fmt: skip
