"""The causal check of the knowing probe, end to end: does its direction move the action?

:func:`steering_summary` takes a model, its transcript format and step records (the
forward passes need the texts; an activation store holds none), and:

1. builds each step's *action prefix*, ``prompt + rationale + action_marker`` (exactly
   what the forced-choice agent scores), whose last token is the position that predicts
   the action;
2. fits the knowing probe (``rationale_arm`` by default) on every ``resid_post`` layer at
   that position, on training episodes, from the given activation store's ``site`` or,
   without a store, from activations captured on the action prefixes; the layer with
   the best held-out accuracy is the *best layer*;
3. on held-out episodes, for every arm ``k`` of the probe, steers along the probe's
   class-``k`` weight direction at the best layer (steps whose label is not ``k``, so
   there is room to move towards ``k``) with :func:`kdgap.probes.interventions.causal_check`,
   and ablates the probe's whole weight subspace (all arms' directions, projected out);
4. reports the arm distribution before and after, total-variation distance, argmax
   flips, the target arm's probability change and a verdict.

Alphas are given relative to the mean residual norm at the best layer and site, so they
mean the same across models; the absolute values are reported too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from kdgap.envs import arm_names
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.names import resolve_hooks
from kdgap.hooks.patch.core import capture
from kdgap.models.runtime import model_tokenizer
from kdgap.models.tokens import TokenBatch, arm_token_ids, tokenize_like_agent
from kdgap.probes.batched import fit_logistic_batched
from kdgap.probes.dataset import ActivationSource, label_array, layer_of, residual_order
from kdgap.probes.interventions import arm_distribution, steer
from kdgap.probes.splits import grouped_train_test_split
from kdgap.probes.stats import accuracy_ci, chance_level
from kdgap.probes.sweep import load_site
from kdgap.records import StepRecord, read_records

if TYPE_CHECKING:  # annotations only: importing these here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase


def action_prefixes(
    fmt: TranscriptFormat, records: Sequence[StepRecord]
) -> tuple[list[str], list[StepRecord]]:
    """``prompt + strip_action(completion) + action_marker`` of every record with a text.

    Returns ``(prefixes, kept_records)``; records without a prompt or completion are
    left out. The last token of each prefix predicts the action.
    """
    out, kept = [], []
    for r in records:
        if r.prompt is None or r.completion is None:
            continue
        out.append(r.prompt + fmt.strip_action(r.completion) + fmt.action_marker)
        kept.append(r)
    if not out:
        raise ValueError("records=...: none carries a prompt and completion; pass text-agent "
                         "or organism records (play(TextAgent(...), ...)).")  # fmt: skip
    return out, kept


def _batch(
    model: TransformerBridge, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> TokenBatch:
    """Left-padded batch tokenised exactly as the text agent tokenises (its BOS rule)."""
    return tokenize_like_agent(model, texts, tokenizer=tokenizer,
                               max_length=getattr(model.cfg, "n_ctx", None))  # fmt: skip


def _last(act: torch.Tensor) -> torch.Tensor:
    return act[:, -1].float().cpu()


def capture_last(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "n pos"],
    mask: Int[torch.Tensor, "n pos"],
    hooks: Sequence[str],
    batch_size: int = 64,
) -> Float[torch.Tensor, "n_hooks n d"]:
    """Activations of ``hooks`` at the last position, in forwards of ``batch_size`` rows.

    ``tokens``/``mask``: ``[n, pos]`` left-padded, so the last position is every row's
    last real token. Each forward stops after the last block a hook lives in
    (:func:`kdgap.hooks.patch.core.capture`).
    """
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for s in range(0, len(tokens), batch_size):
        got, _ = capture(model, tokens[s : s + batch_size], hooks, select=_last, logits=False,
                         attention_mask=mask[s : s + batch_size])  # fmt: skip
        for h in hooks:
            out[h].append(got[h])
    return torch.stack([torch.cat(out[h]) for h in hooks])


def _frame(records: Sequence[StepRecord]) -> pd.DataFrame:
    return pd.DataFrame([{"episode": r.episode, "step": r.step, "action": r.action,
                          "rationale_arm": r.rationale_arm} for r in records])  # fmt: skip


def steering_summary(
    model: TransformerBridge,
    fmt: TranscriptFormat,
    records: Sequence[StepRecord] | str | os.PathLike,
    *,
    store: ActivationSource | None = None,
    site: str = "action",
    label: str = "rationale_arm",
    alphas: Sequence[float] = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0),
    hook: str | None = None,
    n_examples: int = 256,
    min_tv: float = 0.05,
    test_size: float = 0.25,
    seed: int = 0,
    batch_size: int = 64,
    arm_names: Sequence[str] | None = None,
) -> dict:
    """Steer along and ablate the knowing probe's direction at the action position.

    Args:
        model: TransformerBridge in eval mode (``model.tokenizer`` a fast tokenizer).
        fmt: its transcript format (``strip_action``, ``action_marker``,
            ``arm_continuations``), e.g. :class:`kdgap.organisms.OrganismFormat`.
        records: step records with transcripts (a list or a records JSONL path), e.g.
            off-policy organism play.
        store: optional activation store of the same records to fit the probe from (at
            ``site``, which must be the action-predicting position); None captures the
            ``resid_post`` activations on the action prefixes directly.
        label: the probe's label (``"rationale_arm"``: the knowing probe).
        alphas: steering strengths in units of the mean residual norm at the best layer.
        hook: steer at this ``resid_post`` hook instead of the best layer's.
        n_examples: held-out steps intervened on (a seeded subsample).
        min_tv: mean total-variation distance that counts as moving the action.
        test_size, seed: episode split for the probe; the interventions use test steps.
        batch_size: sequences per forward.
        arm_names: arm names in index order (default: the colour buttons of
            ``records[0].n_arms`` arms, the organisms' arms).

    Returns:
        JSON-ready dict: ``hook``, ``layer`` (best layer), ``probe_acc``, ``probe_ci``,
        ``chance``, ``decodes``, ``residual_norm``, ``n_examples``, ``baseline`` (mean
        arm distribution), ``steer`` (one entry per alpha: ``alpha_rel``, ``alpha``, ``tv``,
        ``flips``, ``target_shift``, ``to_target``: share of steps whose argmax becomes the
        target arm), ``ablate`` (``tv``, ``flips``, ``distribution``), ``moves_action``,
        ``steers_toward_target`` (target probability rises at every positive alpha),
        ``verdict``.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_records(records)
    texts, records = action_prefixes(fmt, list(records))
    tok = model_tokenizer(model)
    arm_names = list(arm_names) if arm_names is not None else _arm_names(records)
    arm_ids = arm_token_ids(tok, fmt, arm_names)
    batch = _batch(model, tok, texts)
    hooks = residual_order(resolve_hooks(model, "resid_post"))
    if store is None:
        X = capture_last(model, batch.tokens, batch.attention_mask, hooks, batch_size)
        table = _frame(records)
    else:
        X, table = load_site(store, [h for h in hooks if h in store.hooks], site)
        hooks = [h for h in hooks if h in store.hooks]
    index = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(table["episode"], table["step"]))}
    rows = np.array([index.get((r.episode, r.step), -1) for r in records])
    if (rows < 0).any():
        raise ValueError(f"store=...: {(rows < 0).sum()} records have no row in the store at "
                         f"site={site!r}; pass the store recorded from these records.")  # fmt: skip
    X, table = X[:, rows], table.iloc[rows].reset_index(drop=True)
    y = label_array(table, label)
    groups = table["episode"].to_numpy()
    ok = y >= 0
    tr, te = grouped_train_test_split(groups, test_size=test_size, seed=seed)
    tr, te = tr[ok[tr]], te[ok[te]]
    fit = fit_logistic_batched(X[:, tr], y[None, tr], groups[tr], seed=seed)
    pred = fit.predict(X[:, te])[:, 0]
    accs = [accuracy_ci(y[te], p, groups[te], seed=seed) for p in pred]
    best = int(np.argmax([a.value for a in accs]))  # ties: the earliest layer
    if hook is not None:
        if hook not in hooks:
            raise ValueError(f"hook={hook!r}: not a recorded resid_post hook; use one of "
                             f"{hooks!r} or None for the best layer.")  # fmt: skip
        best = hooks.index(hook)
    chance = chance_level(y[tr], y[te])
    decodes = bool(accs[best].low > chance)
    dirs = fit.directions()[best, 0].numpy()  # [K, d]
    classes = fit.classes[0]
    norm = float(X[best, te].norm(dim=-1).mean())
    abs_alphas = [float(a) * norm for a in alphas]
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(te, size=min(n_examples, len(te)), replace=False))
    tokens, mask = batch.tokens[sub], batch.attention_mask[sub]
    last = torch.full((len(sub),), tokens.shape[1] - 1, dtype=torch.long)
    kw = {"attention_mask": mask}
    base = arm_distribution(model, tokens, last, arm_ids, **kw)
    per_alpha = {k: [] for k in ("tv", "flips", "shift", "to_target", "n")}
    for k, arm in enumerate(classes):
        r = np.flatnonzero(y[sub] != arm)  # steps with room to move towards `arm`
        if len(r) == 0:
            continue
        st = steer(
            model,
            tokens[r],
            last[r],
            hooks[best],
            dirs[k],
            abs_alphas,
            arm_ids,
            attention_mask=mask[r],
        )  # [n_alphas, n_r, n_arms]
        b = base[r]
        per_alpha["tv"].append((0.5 * (st - b).abs().sum(-1).mean(-1)).numpy())
        per_alpha["flips"].append((st.argmax(-1) != b.argmax(-1)).float().mean(-1).numpy())
        per_alpha["shift"].append((st[..., int(arm)] - b[:, int(arm)]).mean(-1).numpy())
        per_alpha["to_target"].append((st.argmax(-1) == int(arm)).float().mean(-1).numpy())
        per_alpha["n"].append(len(r))
    w = np.asarray(per_alpha["n"], float)[:, None]
    mean = {k: (np.asarray(v) * w).sum(0) / w.sum() for k, v in per_alpha.items() if k != "n"}
    ab = _ablate_subspace(model, tokens, last, hooks[best], dirs, arm_ids, mask)
    ab_tv = float(0.5 * (ab - base).abs().sum(-1).mean())
    ab_flips = float((ab.argmax(-1) != base.argmax(-1)).float().mean())
    moves = bool(max(float(np.max(mean["tv"])), ab_tv) >= min_tv)
    toward = bool(all(s > 0 for a, s in zip(alphas, mean["shift"]) if a > 0))
    verdict = (
        ("decodes" if decodes else "does not decode")
        + " and "
        + ("moves the action" if moves else "does not move the action")
    )
    if moves:
        verdict += " (towards the steered arm)" if toward else " (not towards the steered arm)"
    return {
        "hook": hooks[best], "layer": layer_of(hooks[best]), "label": label,
        "probe_acc": accs[best].value, "probe_ci": [accs[best].low, accs[best].high],
        "probe_acc_per_layer": [a.value for a in accs], "chance": chance,
        "decodes": decodes, "residual_norm": norm, "n_examples": len(sub),
        "arms": list(arm_names), "baseline": base.mean(0).tolist(),
        "steer": [{"alpha_rel": float(a), "alpha": aa, "tv": float(t), "flips": float(f),
                   "target_shift": float(s), "to_target": float(g)}
                  for a, aa, t, f, s, g in zip(alphas, abs_alphas, mean["tv"], mean["flips"],
                                               mean["shift"], mean["to_target"])],
        "ablate": {"tv": ab_tv, "flips": ab_flips, "distribution": ab.mean(0).tolist(),
                   "subspace_rank": int(np.linalg.matrix_rank(dirs))},
        "moves_action": moves, "steers_toward_target": toward, "min_tv": min_tv,
        "verdict": verdict,
    }  # fmt: skip


def _arm_names(records: Sequence[StepRecord]) -> list[str]:
    n_arms = int(records[0].n_arms)
    return list(arm_names(n_arms, "buttons"))


def _ablate_subspace(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "n pos"],
    pos: Int[torch.Tensor, " n"],
    hook: str,
    directions: Float[np.ndarray, "k d"],
    arm_ids: list[list[int]],
    mask: Int[torch.Tensor, "n pos"],
) -> Float[torch.Tensor, "n n_arms"]:
    """Arm distribution with the span of ``directions`` ``[k, d]`` projected out."""
    q, _ = torch.linalg.qr(torch.as_tensor(np.asarray(directions), dtype=torch.float32).T)

    def project_out(x: torch.Tensor) -> torch.Tensor:
        qq = q.to(x.dtype)
        return x - (x @ qq) @ qq.T

    return arm_distribution(model, tokens, pos, arm_ids, hook_name=hook, edit=project_out,
                            attention_mask=mask)  # fmt: skip
