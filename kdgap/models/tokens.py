"""The one tokenisation rule: token ids as the agent feeds them, with character offsets.

- **BOS.** :func:`encode` prepends BOS when the model prepends one by default
  (``cfg.default_prepend_bos``) and the text does not already start with the BOS string
  (chat templates such as SmolLM2's ``<|im_start|>`` do); texts are tokenised with
  ``add_special_tokens=False``, never through a tokenizer's post-processor.
- **Batches** are left-padded (:func:`tokenize_batch`, :func:`left_pad`): the last real
  token of every example sits at position ``pos - 1``, where the next-token prediction
  (the action) is read. :func:`tokenize_like_agent` gives the agent's ids with offsets.
- **Arm tokens.** :func:`arm_spellings` is the one place an arm name becomes token ids
  (every spelling a format allows after its action marker); :func:`arm_token_ids` is the
  view steering, ablation and patching metrics read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.models.runtime import model_tokenizer

if TYPE_CHECKING:  # annotations only: importing these here would slow every import
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase


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

    def to(self, device: torch.device | str) -> TokenBatch:
        """Tokens and mask on ``device`` (offsets stay on CPU: they only index texts)."""
        return TokenBatch(
            self.tokens.to(device), self.attention_mask.to(device), self.offsets, self.lengths
        )


def tokenize_batch(
    tokenizer: PreTrainedTokenizerBase,
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
            :func:`kdgap.models.tokens.encode`, see :func:`tokenize_like_agent`); each must
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


def _align_ids(
    given: list[int], plain: list[int], offs: list, bos_id: int | None, i: int
) -> tuple[list[int], list]:
    """``given`` ids with offsets: ``plain``'s offsets, plus ``(-1, -1)`` for a leading BOS."""
    if given == plain:
        return given, offs
    if bos_id is not None and given[:1] == [bos_id] and given[1:] == plain:
        return given, [(-1, -1), *offs]
    raise ValueError(
        f"ids[{i}] ({len(given)} ids) is neither texts[{i}]'s tokenisation ({len(plain)} ids, "
        "add_special_tokens=False) nor BOS + it; pass ids made from the same texts and "
        "tokenizer (kdgap.models.tokens.encode), or ids=None."
    )


def tokenize_like_agent(
    model: TransformerBridge,
    texts: Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> TokenBatch:
    """Left-padded batch of ``texts`` tokenised exactly as the text agent tokenises them.

    The ids come from :func:`kdgap.models.tokens.encode` (the agent's BOS rule: BOS when
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
    tok = model_tokenizer(model, tokenizer)
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one transcript text.")
    ids = encode(model, texts, tokenizer=tok)
    return tokenize_batch(tok, texts, ids=ids, max_length=max_length)


def _tokenizer(
    model: TransformerBridge, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "model.tokenizer is None; boot the bridge with tokenizer=... or pass tokenizer=."
        )
    return tok


def encode(
    model: TransformerBridge,
    texts: Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[list[int]]:
    """Token ids of each text under kdgap's BOS rule (see module docstring).

    Args:
        model: a TransformerBridge (for ``cfg.default_prepend_bos`` and its tokenizer).
        texts: ``[batch]`` strings (chat-templated or not).
        tokenizer: overrides ``model.tokenizer``.

    Returns:
        ``[batch]`` lists of ids (no padding).
    """
    tok = _tokenizer(model, tokenizer)
    if isinstance(texts, str):
        raise TypeError(f"texts={texts[:40]!r}... is one string; pass a list of strings.")
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    bos, bos_id = tok.bos_token, tok.bos_token_id
    if bos is None or bos_id is None or not getattr(model.cfg, "default_prepend_bos", True):
        return [list(x) for x in ids]
    return [list(x) if t.startswith(bos) else [bos_id, *x] for t, x in zip(texts, ids)]


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Left-pad id lists into ``tokens [batch pos]`` and a 0/1 ``attention_mask``."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise ValueError("seqs contain an empty sequence; every prompt needs >= 1 token.")
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, n - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, n - len(s) :] = 1
    return tokens.to(device), mask.to(device)


def _pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id padding uses: pad, else EOS, else 0 (masked positions never influence others)."""
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def arm_spellings(
    tokenizer: PreTrainedTokenizerBase, fmt: TranscriptFormat, arm_names: Sequence[str]
) -> list[list[tuple[str, list[int]]]]:
    """Per arm, every spelling ``fmt.arm_continuations(name)`` with its token ids.

    Spellings are tokenised alone with ``add_special_tokens=False``: what the model would
    emit right after the action marker. A spelling may tokenise to nothing; callers
    decide what that means.

    Returns:
        ``[arm][spelling]`` ``(text, ids)`` pairs, in the format's order.
    """
    return [
        [(v, list(tokenizer(v, add_special_tokens=False)["input_ids"]))
         for v in fmt.arm_continuations(name)]
        for name in arm_names
    ]  # fmt: skip


def arm_token_ids(
    tokenizer: PreTrainedTokenizerBase, fmt: TranscriptFormat, arm_names: Sequence[str]
) -> list[list[int]]:
    """Per arm, the distinct first tokens of its spellings (sorted): the tokens whose
    next-token probabilities at the action position make up the arm's probability.

    Raises:
        ValueError: an arm has no spelling that tokenises to anything (the message names it).
    """
    out = []
    for name, spellings in zip(arm_names, arm_spellings(tokenizer, fmt, arm_names)):
        ids = sorted({t[0] for _, t in spellings if t})
        if not ids:
            raise ValueError(
                f"arm {name!r}: no spelling in {[v for v, _ in spellings]!r} "
                f"({getattr(fmt, 'name', fmt)!r}.arm_continuations) tokenises to anything; "
                "use arm names the tokenizer knows."
            )
        out.append(ids)
    return out
