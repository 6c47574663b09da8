"""Shared hook plumbing for recording and patching: hook names, eval mode, tokenising.

Everything here is model-agnostic and works on a transformer-lens 4.3
:class:`~transformer_lens.model_bridge.TransformerBridge` (``boot_native`` or
``boot_transformers``). Recorder (:mod:`kdgap.hooks.recorder`) and patching both import it,
so a hook spec, a padding convention or a tokenisation means the same thing in both.

Conventions (stable; functions are only ever added here, never renamed):

- **Hook specs.** A short kind (``"resid_post"``) expands to one hook per layer
  (``blocks.{l}.hook_resid_post``); a full transformer-lens name (old names such as
  ``blocks.0.hook_resid_pre`` are aliases the bridge accepts) passes through unchanged.
  Names are never compared against ``hook.name`` inside a callback: the bridge reports its
  own name there (``blocks.0.hook_in`` for ``resid_pre``).
- **Padding.** Batches are *left*-padded: the last real token of every example sits at
  position ``pos - 1``, which is where next-token predictions (the action) are read. The
  bridge's forward takes ``attention_mask`` and handles left padding (positions and
  attention), checked in ``tests/hooks/test_recorder.py``.
- **BOS.** One rule, the text agent's: :func:`tokenize_like_agent` takes the token ids from
  :func:`kdgap.agent.generation.encode` (BOS prepended when the model prepends BOS by
  default and the text does not already start with the BOS string, as chat templates such
  as SmolLM2's ``<|im_start|>`` do), so a recorded transcript is the exact token sequence
  the agent's model saw. :func:`tokenize_batch` with ``prepend_bos=`` forces a choice:
  texts are tokenised with ``add_special_tokens=False`` and BOS is prepended explicitly,
  never by a tokenizer's post-processor.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

#: Short hook kinds -> per-layer name template (transformer-lens names, which the bridge
#: accepts as aliases). ``z``, ``q``, ``k``, ``v`` are per head: ``[batch pos head d_head]``.
HOOK_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_EMBED_HOOK_HEADS = ("hook_embed", "hook_pos_embed", "embed", "pos_embed")


def n_layers_of(model) -> int:
    """Number of transformer blocks of ``model`` (from ``model.cfg.n_layers``)."""
    return int(model.cfg.n_layers)


def valid_hook_names(model) -> list[str]:
    """Every hook name ``model`` accepts (bridge names and transformer-lens aliases), sorted."""
    return sorted(model.hook_dict)


def resolve_hooks(
    model, hooks: str | Sequence[str], layers: Sequence[int] | None = None
) -> list[str]:
    """Expand hook specs into full hook names, in the given order, without duplicates.

    Args:
        model: a TransformerBridge (its ``hook_dict`` and ``cfg.n_layers`` are used).
        hooks: one spec or a list; a spec is a short kind from :data:`HOOK_KINDS`
            (``"resid_post"`` -> ``blocks.{l}.hook_resid_post`` for every layer in
            ``layers``), a comma-separated string of specs (``"resid_post,attn_out"``, as a
            CLI passes it) or a full hook name (``"blocks.3.hook_resid_post"``).
        layers: layers a short kind expands over (default: all). Full names ignore it.

    Returns:
        Full hook names, e.g. ``["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]``.

    Raises:
        ValueError: an unknown spec (the message lists the short kinds and points to
            :func:`valid_hook_names`), or a layer outside ``0..n_layers-1``.
    """
    specs = [hooks] if isinstance(hooks, str) else list(hooks)
    specs = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not specs:
        raise ValueError(f"hooks={hooks!r} is empty; pass e.g. 'resid_post' or a hook name.")
    n = n_layers_of(model)
    layer_list = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers={list(layers)!r} has {bad} outside 0..{n - 1} (n_layers={n}).")
    valid = model.hook_dict
    out: list[str] = []
    for spec in specs:
        if spec in HOOK_KINDS:
            names = [HOOK_KINDS[spec].format(layer=x) for x in layer_list]
        elif spec in valid:
            names = [spec]
        else:
            raise ValueError(
                f"hooks: {spec!r} is neither a short kind {sorted(HOOK_KINDS)} nor a hook name "
                f"of this model (e.g. 'blocks.0.hook_resid_post', 'hook_embed'; "
                f"kdgap.hooks.plumbing.valid_hook_names(model) lists all {len(valid)})."
            )
        missing = [x for x in names if x not in valid]
        if missing:
            raise ValueError(f"hooks: {spec!r} expands to {missing}, which this model lacks.")
        out.extend(x for x in names if x not in out)
    return out


def hook_layer(name: str) -> int | None:
    """Block index of a hook name (``"blocks.3.hook_resid_post"`` -> 3), None outside blocks."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def stop_layer_for(model, hook_names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every block a hook in ``hook_names`` lives in.

    Returns ``max_layer + 1`` when every hook is inside a block (the forward then skips the
    later blocks, the final norm and the unembedding), None when any hook lies outside the
    blocks other than the embeddings (``ln_final``/``unembed`` need the full forward).
    """
    layers = []
    for h in hook_names:
        layer = hook_layer(h)
        if layer is None and h.split(".")[0] in _EMBED_HOOK_HEADS:
            layer = -1  # embeddings run before block 0
        if layer is None:
            return None
        layers.append(layer)
    return max(layers) + 1 if layers else None


def require_eval(model, what: str = "recording") -> None:
    """Raise when ``model`` is in training mode (dropout would make activations random).

    ``TransformerBridge.boot_native`` returns models in train mode; call ``model.eval()``.
    """
    if getattr(model, "training", False):
        raise RuntimeError(
            f"{what} needs the model in eval mode, but model.training is True "
            f"(dropout would change every activation); call model.eval() first."
        )


def model_tokenizer(model, tokenizer=None):
    """The tokenizer to use: ``tokenizer`` if given, else ``model.tokenizer``.

    Raises:
        ValueError: neither exists, or the tokenizer is not a fast tokenizer (character
            offsets, which site resolution needs, exist only for fast tokenizers).
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "tokenizer=None and the model has no tokenizer; pass tokenizer= (a Hugging Face "
            "fast tokenizer) or boot the model with one."
        )
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer={type(tok).__name__} is not a fast tokenizer; site resolution needs "
            "character offsets (return_offsets_mapping). Load it with use_fast=True."
        )
    return tok


@dataclass
class TokenBatch:
    """A left-padded batch of tokenised texts.

    Attributes:
        tokens: ``[batch pos]`` token ids, left-padded with the pad id.
        attention_mask: ``[batch pos]`` 1 for real tokens (BOS included), 0 for padding.
        offsets: ``[batch pos 2]`` character span ``[start, end)`` in the *text* of every
            token; ``(-1, -1)`` for padding and for a prepended BOS (they cover no character).
        lengths: ``[batch]`` number of real tokens of each example.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    offsets: Int[torch.Tensor, "batch pos 2"]
    lengths: Int[torch.Tensor, " batch"]

    @property
    def pad_left(self) -> Int[torch.Tensor, " batch"]:
        """``[batch]`` number of padding positions in front of each example."""
        return self.tokens.shape[1] - self.lengths

    def to(self, device) -> TokenBatch:
        """Tokens and mask on ``device`` (offsets stay on CPU: they only index texts)."""
        return TokenBatch(
            self.tokens.to(device), self.attention_mask.to(device), self.offsets, self.lengths
        )


def _default_prepend_bos(model) -> bool:
    cfg = getattr(model, "cfg", None)
    return bool(getattr(cfg, "default_prepend_bos", True))


def tokenize_batch(
    tokenizer,
    texts: Sequence[str],
    *,
    prepend_bos: bool = True,
    max_length: int | None = None,
    ids: Sequence[Sequence[int]] | None = None,
) -> TokenBatch:
    """Tokenise ``texts`` into one left-padded batch with per-token character offsets.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (see :func:`model_tokenizer`).
        texts: the full texts (prompt + completion), ``batch`` of them.
        prepend_bos: put ``tokenizer.bos_token_id`` in front of every example (ignored
            when the tokenizer has none, and when ``ids`` is given).
        max_length: refuse texts longer than this many tokens (e.g. ``model.cfg.n_ctx``);
            they are never truncated, since a cut text would lose its late sites.
        ids: ``[batch]`` token id lists to use instead (e.g. from
            :func:`kdgap.agent.generation.encode`, see :func:`tokenize_like_agent`); each must
            equal the text's own tokenisation, optionally preceded by one BOS id (which then
            gets no offset). The offsets come from the text.

    Returns:
        A :class:`TokenBatch`; ``pos`` is the longest example's token count.

    Raises:
        ValueError: empty ``texts``, an empty text, a text over ``max_length`` tokens, or
            ``ids`` that do not match the texts.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one transcript text.")
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"ids has {len(ids)} lists for {len(texts)} texts; pass one per text.")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id if prepend_bos else None
    pad = tokenizer.pad_token_id
    if pad is None:  # any id works: masked positions never influence real ones
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids_list, off_list = [], []
    for i, (tids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        offs = [tuple(o) for o in offs]
        if ids is not None:
            tids, offs = _align_ids(list(ids[i]), list(tids), offs, tokenizer.bos_token_id, i)
        elif bos is not None:
            tids, offs = [bos, *tids], [(-1, -1), *offs]
        if not tids:
            raise ValueError(f"texts[{i}] tokenises to nothing; every transcript needs text.")
        if max_length is not None and len(tids) > max_length:
            raise ValueError(
                f"texts[{i}] has {len(tids)} tokens > max_length={max_length} (the model's "
                "context); shorten the transcript or use a model with a longer n_ctx."
            )
        ids_list.append(tids)
        off_list.append(offs)
    width = max(len(x) for x in ids_list)
    b = len(texts)
    tokens = torch.full((b, width), int(pad), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    offsets = torch.full((b, width, 2), -1, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids_list], dtype=torch.long)
    for i, (ids, offs) in enumerate(zip(ids_list, off_list)):
        start = width - len(ids)
        tokens[i, start:] = torch.tensor(ids, dtype=torch.long)
        mask[i, start:] = 1
        offsets[i, start:] = torch.tensor(offs, dtype=torch.long)
    return TokenBatch(tokens=tokens, attention_mask=mask, offsets=offsets, lengths=lengths)


def _align_ids(given: list[int], plain: list[int], offs: list, bos_id, i: int):
    """``given`` ids with offsets: ``plain``'s offsets, plus ``(-1, -1)`` for a leading BOS."""
    if given == plain:
        return given, offs
    if bos_id is not None and given[:1] == [bos_id] and given[1:] == plain:
        return given, [(-1, -1), *offs]
    raise ValueError(
        f"ids[{i}] ({len(given)} ids) is neither texts[{i}]'s tokenisation ({len(plain)} ids, "
        "add_special_tokens=False) nor BOS + it; pass ids made from the same texts and "
        "tokenizer (kdgap.agent.generation.encode), or ids=None."
    )


def tokenize_like_agent(
    model, texts: Sequence[str], *, tokenizer=None, max_length: int | None = None
) -> TokenBatch:
    """Left-padded batch of ``texts`` tokenised exactly as the text agent tokenises them.

    The ids come from :func:`kdgap.agent.generation.encode` (the agent's BOS rule: BOS when
    ``model.cfg.default_prepend_bos`` and the text does not start with the BOS string), the
    character offsets from the tokenizer; BOS, when prepended, covers no character.

    Args:
        model: the TransformerBridge the transcripts were played with.
        texts: ``[batch]`` full texts (chat-templated prompt + completion).
        tokenizer: fast tokenizer (default ``model.tokenizer``).
        max_length: refuse texts longer than this many tokens.

    Returns:
        A :class:`TokenBatch` (``[batch pos]`` tokens, mask; ``[batch pos 2]`` offsets).
    """
    from kdgap.agent.generation import encode  # lazy: keeps this module light

    tok = model_tokenizer(model, tokenizer)
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one transcript text.")
    ids = encode(model, texts, tokenizer=tok)
    return tokenize_batch(tok, texts, ids=ids, max_length=max_length)


def prepend_bos_for(model, prepend_bos: bool | None = None) -> bool:
    """``prepend_bos`` if given, else the model's default (``cfg.default_prepend_bos``)."""
    return _default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def gather_positions(
    act: Float[torch.Tensor, "batch pos *rest"], positions: Int[torch.Tensor, "batch n_sites"]
) -> Float[torch.Tensor, "batch n_sites *rest"]:
    """``act[b, positions[b, s]]`` for every example ``b`` and site ``s`` (a new tensor)."""
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    return act[rows, positions.to(act.device)]


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim(0)``; else no-op).

    Forwards of different shapes leave freed blocks scattered through the C heap; later
    forwards land on other, untouched free pages, so without this the process's resident
    memory creeps up forward after forward although the live data stays the same size.
    """
    if _TRIM is not None:
        _TRIM(0)
