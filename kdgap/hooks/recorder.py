"""Record chosen hooks at chosen sites: forwards that keep only the selected positions.

The recorder never builds an activation cache. Each hook callback gathers the site
positions of its activation (``act[row, position]``) and copies just those vectors to CPU
in the requested dtype, so memory per batch is ``batch x n_sites x d`` per hook instead of
``batch x pos x d`` for every hook of the model. Nothing the recording does not need is
computed:

- the forward stops after the last block a hook needs (``stop_at_layer``) and is abandoned
  as soon as every requested hook has fired, so later blocks, the final norm and the
  unembedding never run (the hooks are the patch core's capture hooks,
  :func:`kdgap.hooks.patch.core.capture_hook`, keeping the site positions only);
- in a causal model each transcript runs only up to its last site (later tokens cannot
  change earlier positions), and rows are grouped by that length into forwards of at most
  ``max_batch_tokens`` padded tokens, so little compute goes to padding and the forward's
  transient memory is bounded whatever batch size the caller picks.

Correctness is checked against ``run_with_cache()`` sliced at the same positions, on
left-padded batches of unequal lengths (``tests/hooks/test_recorder.py``), with and without
truncation, micro-batching and early stopping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from kdgap._checks import check_int
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.names import gather_positions, resolve_hooks, stop_layer_for
from kdgap.hooks.patch.core import capture_hook
from kdgap.hooks.sites import parse_sites, resolve_sites
from kdgap.hooks.twin_capture import TwinPlan, twin_forward, twin_plan
from kdgap.models.runtime import (
    has_hooks,
    model_device,
    model_tokenizer,
    release_free_memory,
    require_eval,
)
from kdgap.models.tokens import TokenBatch, _pad_id, tokenize_batch, tokenize_like_agent

if TYPE_CHECKING:  # annotations only: importing these here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or the torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`resolve_dtype`."""
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass
class BatchActivations:
    """What one batch recorded.

    Attributes:
        acts: ``{(hook, site): Tensor[kept, *act_shape]}``, e.g. ``[kept, d_model]`` for
            ``resid_post`` or ``[kept, n_heads, d_head]`` for ``z``; CPU, chosen dtype.
        kept: ``[kept]`` indices (into the batch) of the examples recorded.
        positions: ``[batch n_sites]`` site token positions in the padded batch.
        skipped: ids of examples dropped for missing sites (``on_missing="skip"``).
        n_tokens: ``[batch]`` real token count of each example.
    """

    acts: dict[tuple[str, str], torch.Tensor]
    kept: Int[torch.Tensor, " kept"]
    positions: Int[torch.Tensor, "batch n_sites"]
    skipped: list
    n_tokens: Int[torch.Tensor, " batch"]


def to_host(acts: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{name: [rows *shape]}`` as CPU tensors of ``dtype``, in one device-to-host copy.

    On an accelerator the tensors are flattened and concatenated on the device first, so
    the host waits once per forward instead of once per hook; on CPU each is just cast.
    """
    if not acts:
        return {}
    first = next(iter(acts.values()))
    if first.device.type == "cpu":
        return {k: v.to(dtype) for k, v in acts.items()}
    rows = first.shape[0]
    flat = torch.cat([v.reshape(rows, -1) for v in acts.values()], dim=1).to("cpu", dtype)
    out, col = {}, 0
    for k, v in acts.items():
        width = v[0].numel() if rows else 0
        out[k] = flat[:, col : col + width].reshape(v.shape)
        col += width
    return out


class _AllHooksFired(Exception):
    """Raised from the last recording hook to end a forward early (never escapes)."""


class Recorder:
    """Records ``hooks`` at ``sites`` for batches of transcripts of one format.

    Args:
        model: a TransformerBridge in eval mode.
        fmt: the transcript format defining the sites (``site_spans``).
        hooks: hook specs (:func:`~kdgap.hooks.names.resolve_hooks`), e.g. ``"resid_post"``.
        sites: site specs (:func:`~kdgap.hooks.sites.parse_sites`), e.g. ``"action"``.
        tokenizer: fast tokenizer (default ``model.tokenizer``).
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` for the stored copies.
        prepend_bos: None (default) tokenises exactly as the text agent does
            (:func:`~kdgap.models.tokens.tokenize_like_agent`: BOS unless the model does
            not prepend one or the text already starts with it); True/False forces it.
        on_missing: ``"raise"`` or ``"skip"`` for examples lacking a site.
        stop_early: stop the forward after the last block a hook needs, and abandon it
            once every requested hook has fired (later layers, the final norm and the
            unembedding never run) unless another hook is attached to the model (it must
            still run); False runs the whole model.
        truncate: run each example only up to its last site (exact for causal models:
            later tokens cannot change earlier positions); ignored, i.e. whole texts run,
            when ``model.cfg.attention_dir`` is not ``"causal"``.
        max_batch_tokens: run a batch in forwards of at most this many padded tokens
            (rows x width), rows grouped by length, bounding the forward's transient memory
            (it grows with the padded token count); None runs the batch in one forward.
            The results are the same (left padding is exact, see tests) up to float rounding.
        pad_multiple: left-pad every forward to a width that is a multiple of this (capped
            at ``n_ctx``), so forwards share a few tensor shapes and the allocator reuses
            freed blocks instead of fragmenting the heap (without it resident memory can
            creep up batch after batch); 1 turns it off.
        fast: record ``hook_resid_pre`` / ``hook_resid_post`` of a Hugging Face-backed
            bridge on its SDPA twin, and of a native bridge on a plain ``NativeModel``
            (:mod:`kdgap.hooks.twin_capture`: the same tensors, no bridge forward; equal up
            to float rounding) when no hook is attached and no other hook is requested;
            False always runs the bridge.
        release_memory: after each forward, return freed heap pages to the OS
            (:func:`release_free_memory`, glibc only), so resident memory tracks what is
            live instead of creeping up as forwards of different shapes land on different
            free pages; costs a few percent of speed (pages are faulted in again).
    """

    def __init__(
        self,
        model: TransformerBridge,
        fmt: TranscriptFormat,
        hooks: str | Sequence[str],
        sites: str | Sequence[str],
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str | torch.dtype = "float32",
        prepend_bos: bool | None = None,
        on_missing: str = "raise",
        stop_early: bool = True,
        truncate: bool = True,
        max_batch_tokens: int | None = 2048,
        pad_multiple: int = 16,
        release_memory: bool = True,
        fast: bool = True,
    ):
        check_int("max_batch_tokens", max_batch_tokens, optional=True)
        check_int("pad_multiple", pad_multiple)
        require_eval(model, "recording")
        self.model = model
        self.fmt = fmt
        self.hooks = resolve_hooks(model, hooks)
        self.sites = parse_sites(sites)
        self.tokenizer = model_tokenizer(model, tokenizer)
        self.dtype = resolve_dtype(dtype)
        self.prepend_bos = None if prepend_bos is None else bool(prepend_bos)
        self.on_missing = on_missing
        self.stop_early = bool(stop_early)
        self.stop_at_layer = stop_layer_for(model, self.hooks) if stop_early else None
        causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
        self.truncate = bool(truncate) and causal
        self.max_length = getattr(model.cfg, "n_ctx", None)
        self.max_batch_tokens = max_batch_tokens
        self.pad_multiple = pad_multiple
        self.release_memory = bool(release_memory)
        self.fast = bool(fast)

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Left-padded tokens, mask and offsets of ``texts`` (agent's BOS rule by default)."""
        if self.prepend_bos is None:
            return tokenize_like_agent(
                self.model, texts, tokenizer=self.tokenizer, max_length=self.max_length
            )
        return tokenize_batch(
            self.tokenizer, texts, prepend_bos=self.prepend_bos, max_length=self.max_length
        )

    def needed_lengths(
        self, batch: TokenBatch, positions: Int[torch.Tensor, "batch n_sites"]
    ) -> Int[torch.Tensor, " batch"]:
        """``[batch]`` tokens each example's forward needs: up to its last site when causal.

        In a causal model no position sees a later one, so the tokens after an example's
        last site cannot change any activation at its sites: the forward stops at the last
        site (``truncate``). A bidirectional model (``cfg.attention_dir``) runs whole texts.
        """
        if not self.truncate:
            return batch.lengths.clone()
        return positions.max(dim=1).values - batch.pad_left + 1

    def _micro_batches(self, need: Int[torch.Tensor, " kept"]) -> list[torch.Tensor]:
        """Group rows ``0..kept-1`` into forwards of at most ``max_batch_tokens`` tokens.

        Rows are taken in order of ``need`` (stable), so each forward holds rows of similar
        length and pads little; a forward costs ``rows x width`` tokens, ``width`` being its
        longest row rounded up to ``pad_multiple``. A single row over budget runs alone.
        """
        order = torch.sort(need, stable=True).indices
        if self.max_batch_tokens is None:
            return [order]
        groups, start = [], 0
        for stop in range(1, len(order) + 1):
            rows = stop - start
            if rows > 1 and rows * self._width(int(need[order[stop - 1]])) > self.max_batch_tokens:
                groups.append(order[start : stop - 1])
                start = stop - 1
        groups.append(order[start:])
        return groups

    def _forward(
        self,
        tokens: Int[torch.Tensor, "rows pos"],
        mask: Int[torch.Tensor, "rows pos"],
        positions: Int[torch.Tensor, "rows n_sites"],
        plan: TwinPlan | None = None,
    ) -> dict[str, torch.Tensor]:
        """One forward of ``[rows pos]`` tokens -> ``{hook: [rows n_sites *shape]}`` on CPU.

        The forward is abandoned (a private exception raised from the hook) as soon as every
        requested hook has fired, so nothing after the last recorded activation is computed
        (on top of ``stop_at_layer``, which skips whole blocks). ``plan`` is
        :func:`~kdgap.hooks.twin_capture.twin_plan`'s result (None: the bridge path).
        """
        dev = model_device(self.model)
        pos = positions.to(dev)
        if plan is not None:
            return to_host(twin_forward(plan, tokens.to(dev), mask.to(dev), pos), self.dtype)
        got: dict[str, torch.Tensor] = {}
        # Abandon the forward early only when no other hook is attached: a caller's
        # permanent or steering hook later in the forward must still run.
        n_hooks, stop = len(self.hooks), self.stop_early and not has_hooks(self.model)

        def all_fired() -> None:
            if stop and len(got) == n_hooks:
                raise _AllHooksFired

        # The gathered rows stay on the device: no per-hook host sync mid-forward.
        at_sites = partial(gather_positions, positions=pos)
        try:
            self.model.run_with_hooks(
                tokens.to(dev),
                fwd_hooks=[(h, capture_hook(got, h, at_sites, then=all_fired)) for h in self.hooks],
                attention_mask=mask.to(dev),
                stop_at_layer=self.stop_at_layer,
            )
        except _AllHooksFired:
            pass
        return to_host(got, self.dtype)

    def _width(self, longest: int) -> int:
        """Forward width for a micro-batch whose longest row has ``longest`` tokens."""
        m = self.pad_multiple
        w = -(-longest // m) * m
        return max(longest, min(w, self.max_length)) if self.max_length else w

    @torch.inference_mode()
    def record(self, texts: Sequence[str], ids: Sequence | None = None) -> BatchActivations:
        """Run ``texts`` forward and return the selected activations.

        Args:
            texts: ``batch`` full transcripts (prompt + completion, as the model saw them).
            ids: example ids for missing-site reports (default 0..batch-1).

        Returns:
            :class:`BatchActivations` with one ``[kept, ...]`` tensor per (hook, site).
        """
        require_eval(self.model, "recording")
        texts = list(texts)
        batch = self.tokenize(texts)
        sp = resolve_sites(self.fmt, texts, batch, self.sites, ids=ids, on_missing=self.on_missing)
        kept = torch.nonzero(sp.keep).flatten()
        acts: dict[tuple[str, str], torch.Tensor] = {}
        if len(kept) == 0:  # nothing to record: skip the forward entirely
            return BatchActivations(acts, kept, sp.positions, sp.skipped, batch.lengths)
        # Only the kept rows run, so positions of dropped examples never index anything.
        # Each row runs up to its last site (causal models); rows go through in forwards of
        # at most max_batch_tokens padded tokens, grouped by that length: the forward's own
        # transients (attention scores are rows x heads x pos x pos) stay bounded whatever
        # batch size the caller picked, and little compute goes to padding. Every forward
        # re-pads its rows on the left, so positions are relative to each row's own start.
        pad_left = batch.pad_left[kept]
        need = self.needed_lengths(batch, sp.positions)[kept]
        out: dict[str, torch.Tensor] = {}
        # Once per batch: twin_plan walks the model's modules looking for attached hooks.
        plan = twin_plan(self.model, self.hooks) if self.fast else None
        pad = _pad_id(self.tokenizer)
        for rows in self._micro_batches(need):
            w = self._width(int(need[rows].max()))
            lead = w - need[rows]  # left padding of each row in this forward
            first = pad_left[rows]  # column of each row's first token in the batch
            cols = torch.arange(w)[None, :] - lead[:, None]  # token index within the row
            real = cols >= 0
            src = (first[:, None] + cols).clamp(min=0)
            tokens = torch.where(real, batch.tokens[kept[rows]].gather(1, src), pad)
            mask = real.to(batch.attention_mask.dtype)
            positions = sp.positions[kept[rows]] - first[:, None] + lead[:, None]
            got = self._forward(tokens, mask, positions, plan)
            if self.release_memory:
                release_free_memory()
            for h, t in got.items():
                if h not in out:
                    out[h] = torch.empty((len(kept), *t.shape[1:]), dtype=t.dtype)
                out[h][rows] = t
        for h in self.hooks:
            if h not in out:
                raise RuntimeError(
                    f"hook {h!r} never fired during the forward (stop_at_layer="
                    f"{self.stop_at_layer}); record it with stop_early=False."
                )
            for j, s in enumerate(self.sites):
                acts[(h, s)] = out[h][:, j].contiguous()
        return BatchActivations(acts, kept, sp.positions, sp.skipped, batch.lengths)


def record_batch(
    model: TransformerBridge,
    fmt: TranscriptFormat,
    texts: Sequence[str],
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    **kwargs: Any,
) -> BatchActivations:
    """One-shot :class:`Recorder` ``(model, fmt, hooks, sites, **kwargs).record(texts)``.

    Returns:
        :class:`BatchActivations`; ``acts[(hook, site)]`` is ``[kept, *act_shape]``.
    """
    return Recorder(model, fmt, hooks, sites, **kwargs).record(texts)
