"""Record chosen hooks at chosen sites: one forward per batch, only the selected positions.

The recorder never builds an activation cache. Each hook callback gathers the site
positions of its activation (``act[row, position]``) and copies just those vectors to CPU
in the requested dtype, so memory per batch is ``batch x n_sites x d`` per hook instead of
``batch x pos x d`` for every hook of the model. When every hook lives in a block, the
forward stops after the last block needed (``stop_at_layer``): later blocks, the final norm
and the unembedding are never computed.

Correctness is checked against ``run_with_cache()`` sliced at the same positions, on
left-padded batches of unequal lengths (``tests/hooks/test_recorder.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from kdgap.hooks.plumbing import (
    TokenBatch,
    model_device,
    model_tokenizer,
    require_eval,
    resolve_hooks,
    stop_layer_for,
    tokenize_batch,
    tokenize_like_agent,
)
from kdgap.hooks.sites import parse_sites, resolve_sites

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


def gather_positions(
    act: Float[torch.Tensor, "batch pos *rest"], positions: Int[torch.Tensor, "batch n_sites"]
) -> Float[torch.Tensor, "batch n_sites *rest"]:
    """``act[b, positions[b, s]]`` for every example ``b`` and site ``s`` (a new tensor)."""
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    return act[rows, positions.to(act.device)]


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


class Recorder:
    """Records ``hooks`` at ``sites`` for batches of transcripts of one format.

    Args:
        model: a TransformerBridge in eval mode.
        fmt: the transcript format defining the sites (``site_spans``).
        hooks: hook specs (:func:`~kdgap.hooks.plumbing.resolve_hooks`), e.g. ``"resid_post"``.
        sites: site specs (:func:`~kdgap.hooks.sites.parse_sites`), e.g. ``"action"``.
        tokenizer: fast tokenizer (default ``model.tokenizer``).
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` for the stored copies.
        prepend_bos: None (default) tokenises exactly as the text agent does
            (:func:`~kdgap.hooks.plumbing.tokenize_like_agent`: BOS unless the model does
            not prepend one or the text already starts with it); True/False forces it.
        on_missing: ``"raise"`` or ``"skip"`` for examples lacking a site.
        stop_early: stop the forward after the last block a hook needs.
        max_batch_tokens: run a batch in micro-batches of at most this many padded tokens
            (rows x longest row), bounding the forward's memory; None runs it whole. The
            results are the same (left padding is exact, see tests) up to float rounding.
        pad_multiple: left-pad every forward to a width that is a multiple of this (capped
            at ``n_ctx``), so forwards of transcripts with similar lengths share tensor
            shapes and the allocator reuses freed blocks instead of fragmenting the heap
            (measured: without it, RSS creeps up batch after batch); 1 turns it off.
    """

    def __init__(
        self,
        model,
        fmt,
        hooks: str | Sequence[str],
        sites: str | Sequence[str],
        *,
        tokenizer=None,
        dtype: str | torch.dtype = "float32",
        prepend_bos: bool | None = None,
        on_missing: str = "raise",
        stop_early: bool = True,
        max_batch_tokens: int | None = 4096,
        pad_multiple: int = 16,
    ):
        if max_batch_tokens is not None and (
            not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
        ):
            raise ValueError(
                f"max_batch_tokens={max_batch_tokens!r} must be an integer >= 1 or None."
            )
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple={pad_multiple!r} must be an integer >= 1.")
        require_eval(model, "recording")
        self.model = model
        self.fmt = fmt
        self.hooks = resolve_hooks(model, hooks)
        self.sites = parse_sites(sites)
        self.tokenizer = model_tokenizer(model, tokenizer)
        self.dtype = resolve_dtype(dtype)
        self.prepend_bos = None if prepend_bos is None else bool(prepend_bos)
        self.on_missing = on_missing
        self.stop_at_layer = stop_layer_for(model, self.hooks) if stop_early else None
        self.max_length = getattr(model.cfg, "n_ctx", None)
        self.max_batch_tokens = max_batch_tokens
        self.pad_multiple = pad_multiple

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Left-padded tokens, mask and offsets of ``texts`` (agent's BOS rule by default)."""
        if self.prepend_bos is None:
            return tokenize_like_agent(
                self.model, texts, tokenizer=self.tokenizer, max_length=self.max_length
            )
        return tokenize_batch(
            self.tokenizer, texts, prepend_bos=self.prepend_bos, max_length=self.max_length
        )

    def _micro_batches(self, lengths: Int[torch.Tensor, " kept"]) -> list[torch.Tensor]:
        """Split rows ``0..kept-1`` into consecutive groups of <= max_batch_tokens tokens."""
        if self.max_batch_tokens is None:
            return [torch.arange(len(lengths))]
        groups, start = [], 0
        for stop in range(1, len(lengths) + 1):
            too_big = stop - start > 1 and (stop - start) * int(lengths[start:stop].max()) > (
                self.max_batch_tokens
            )
            if too_big:
                groups.append(torch.arange(start, stop - 1))
                start = stop - 1
        groups.append(torch.arange(start, len(lengths)))
        return groups

    def _forward(self, tokens, mask, positions) -> dict[str, torch.Tensor]:
        """One forward of ``[rows pos]`` tokens -> ``{hook: [rows n_sites *shape]}`` on CPU."""
        dev = model_device(self.model)
        pos = positions.to(dev)
        got: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            # Bound per requested name: inside the callback hook.name is the bridge's own
            # name (blocks.0.hook_in for resid_pre), so it is never used as a key. The
            # gathered rows stay on the device: no per-hook host sync mid-forward.
            def hook_fn(act, hook):
                got[name] = gather_positions(act, pos)

            return hook_fn

        self.model.run_with_hooks(
            tokens.to(dev),
            fwd_hooks=[(h, make_hook(h)) for h in self.hooks],
            attention_mask=mask.to(dev),
            stop_at_layer=self.stop_at_layer,
        )
        return to_host(got, self.dtype)

    def _width(self, longest: int) -> int:
        """Forward width for a micro-batch whose longest row has ``longest`` tokens."""
        m = self.pad_multiple
        w = -(-longest // m) * m
        return max(longest, min(w, self.max_length)) if self.max_length else w

    @property
    def _pad(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    @torch.inference_mode()
    def record(self, texts: Sequence[str], ids: Sequence | None = None) -> BatchActivations:
        """Run one forward over ``texts`` and return the selected activations.

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
        # Run only the kept rows, so positions of dropped examples never index anything.
        # Rows go through in micro-batches of at most max_batch_tokens padded tokens: the
        # forward's own transients (attention scores are batch x heads x pos x pos) then stay
        # bounded whatever batch size the caller picked. Each micro-batch drops the padding
        # columns it does not need; left padding keeps positions relative to the end.
        grabbed: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        width = batch.tokens.shape[1]
        for rows in self._micro_batches(batch.lengths[kept]):
            idx = kept[rows]
            w = self._width(int(batch.lengths[idx].max()))
            tokens, mask = batch.tokens[idx], batch.attention_mask[idx]
            if w > width:  # more left padding than the batch has
                tokens = F.pad(tokens, (w - width, 0), value=self._pad)
                mask = F.pad(mask, (w - width, 0), value=0)
            got = self._forward(
                tokens[:, tokens.shape[1] - w :],
                mask[:, mask.shape[1] - w :],
                sp.positions[idx] - (width - w),
            )
            for h, t in got.items():
                grabbed[h].append(t)
        for h in self.hooks:
            if len(grabbed[h]) == 0:
                raise RuntimeError(
                    f"hook {h!r} never fired during the forward (stop_at_layer="
                    f"{self.stop_at_layer}); record it with stop_early=False."
                )
            stacked = torch.cat(grabbed[h]) if len(grabbed[h]) > 1 else grabbed[h][0]
            for j, s in enumerate(self.sites):
                acts[(h, s)] = stacked[:, j].contiguous()
        return BatchActivations(acts, kept, sp.positions, sp.skipped, batch.lengths)


def record_batch(
    model,
    fmt,
    texts: Sequence[str],
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    **kwargs,
) -> BatchActivations:
    """One-shot :class:`Recorder` ``(model, fmt, hooks, sites, **kwargs).record(texts)``.

    Returns:
        :class:`BatchActivations`; ``acts[(hook, site)]`` is ``[kept, *act_shape]``.
    """
    return Recorder(model, fmt, hooks, sites, **kwargs).record(texts)
