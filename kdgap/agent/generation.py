"""Batched generation and continuation scoring for any TransformerBridge.

Prompts are tokenised by the one rule of :func:`kdgap.models.tokens.encode` (BOS when the
model prepends one by default and the text does not already start with it), so recorders
re-tokenise a stored transcript exactly as the agent did. :func:`generate` has three
paths, with the same interface and post-processing:

- ``boot_native`` models with no hook attached: transformer-lens 4.3's native model has
  no KV cache, so ``bridge.generate`` recomputes the whole sequence every token;
  :mod:`kdgap.agent.native_decoding` runs a KV-cached loop on the native model's own
  submodules, tested token for token against ``bridge.generate``.
- Hugging Face models with no hook attached: :mod:`kdgap.agent.hf_decoding` runs a
  KV-cached loop on the SDPA twin of the wrapped model (:mod:`kdgap.models.twins`, same
  tensors), computing only the last prompt position's logits, and can keep the cache so
  forced-choice scoring (:func:`score_continuations` with ``reuse=``) runs only the tokens
  after the prompt.
- any model with a hook attached (or ``fast=False``): ``bridge.generate`` on left-padded
  tokens with an explicit attention mask (Hugging Face KV cache), so the hooks act.

Both Hugging Face paths sample from torch's global RNG with transformer-lens's
``sample_logits`` inside ``torch.random.fork_rng`` seeded with ``seed``: reproducible, and
the caller's RNG state is untouched. Both are tested token-for-token against
``AutoModelForCausalLM.generate`` (transformers 5.24 breaks the bridge path; see
pyproject.toml).

Completions are cut at the first EOS token and just after the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from kdgap._checks import check_int
from kdgap.agent import hf_decoding, native_decoding
from kdgap.agent.decoding import Decoding
from kdgap.models import twins
from kdgap.models.runtime import has_hooks
from kdgap.models.tokens import _pad_id, _tokenizer, encode, left_pad

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase


@dataclass
class Generation:
    """Completions of a batch of prompts.

    Attributes:
        texts: ``[batch]`` completions (cut at EOS, and just after a stop string).
        token_ids: ``[batch]`` generated token ids, up to (excluding) EOS.
        n_tokens: ``[batch]`` tokens the model produced for each row before it stopped
            (EOS included): the unit of the throughput benchmark.
        cache: with ``generate(..., keep_cache=True)`` on the hook-free Hugging Face path,
            a :class:`~kdgap.agent.hf_decoding.PromptCache` for :func:`score_continuations`
            ``reuse=``; otherwise None.
    """

    texts: list[str]
    token_ids: list[list[int]]
    n_tokens: Int[np.ndarray, " batch"]
    cache: hf_decoding.PromptCache | None = None


def _eos_ids(model: TransformerBridge, tok: PreTrainedTokenizerBase) -> list[int]:
    ids = getattr(model.cfg, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(int(tok.eos_token_id))
    return ids


class TextStop:
    """Stopping criterion: a row stops once its generated text contains a stop string.

    Only tokens after ``prompt_len`` are decoded (a prompt that mentions the stop string
    never stops generation), and only the last ``max(len(s))`` of them: every token
    decodes to at least one character, so a new occurrence lies in that tail.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str], prompt_len: int
    ) -> None:
        self.tok, self.stops, self.prompt_len = tokenizer, list(stop_strings), prompt_len
        self.tail = max(len(s) for s in self.stops) + 1

    def __call__(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        scores: torch.Tensor | None = None,
        **kw: object,
    ) -> Bool[torch.Tensor, " batch"]:
        """``[batch]`` whether each row's generated tail contains a stop string (the
        ``scores`` and keywords of a Hugging Face stopping criterion are not needed)."""
        gen = input_ids[:, self.prompt_len :][:, -self.tail :]
        texts = self.tok.batch_decode(gen.tolist(), skip_special_tokens=False)
        hit = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def check_generation_args(max_new_tokens: int, temperature: float, batch_size: int | None) -> None:
    """Raise ``ValueError`` naming the bad generation setting (shared by the agent)."""
    check_int("max_new_tokens", max_new_tokens)
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 means greedy).")
    check_int("batch_size", batch_size, optional=True, hint="(None: all at once)")


def _room(model: TransformerBridge, prompt_len: int, max_new_tokens: int) -> int:
    """``max_new_tokens``, cut so that no position passes the model's context ``n_ctx``
    (a sampled completion that never stops would otherwise fail inside a forward)."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if not n_ctx:
        return max_new_tokens
    if prompt_len >= n_ctx:
        raise ValueError(
            f"a prompt of {prompt_len} tokens fills the model's context n_ctx={n_ctx}; "
            "play fewer steps (--steps) or use a model with a longer context."
        )
    return min(max_new_tokens, n_ctx - prompt_len)


def generate(
    model: TransformerBridge,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    batch_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    fast: bool = True,
    keep_cache: bool = False,
) -> Generation:
    """Generate completions for ``prompts`` in left-padded batches.

    Args:
        model: any TransformerBridge (eval mode).
        prompts: ``[batch]`` texts, already chat-templated where wanted (BOS rule of
            :func:`encode`).
        max_new_tokens: most tokens per completion (>= 1).
        temperature: 0 for greedy, > 0 to sample from ``softmax(logits / temperature)``.
        seed: seeds sampling (each sub-batch ``b`` uses ``seed + b``).
        stop_strings: a row stops once its completion contains one of these.
        batch_size: prompts per forward batch (default: all). Prompts are sorted by
            length first so a batch holds similar lengths (less padding).
        tokenizer: overrides ``model.tokenizer``.
        fast: use the hook-free KV-cached loops when no hook is attached (``boot_native``
            models: :mod:`~kdgap.agent.native_decoding`; Hugging Face models:
            :mod:`~kdgap.agent.hf_decoding` on the twin). False: always ``bridge.generate``.
        keep_cache: on the hook-free Hugging Face path, return the KV caches in
            ``Generation.cache`` (for :func:`score_continuations` ``reuse=``).

    Returns:
        A :class:`Generation` in the order of ``prompts``.
    """
    check_generation_args(max_new_tokens, temperature, batch_size)
    tok = _tokenizer(model, tokenizer)
    ids = encode(model, prompts, tokenizer=tok)
    order = np.argsort([len(x) for x in ids], kind="stable")
    bs = len(ids) if batch_size is None else batch_size
    out: list[tuple[str, list[int], int]] = [("", [], 0)] * len(ids)
    eos = _eos_ids(model, tok)
    base = Decoding(max_new_tokens, temperature, seed, tuple(eos), _fill_id(tok, eos))
    hooked = has_hooks(model)
    native = fast and native_decoding.supports(model) and not hooked
    lm = twins.fast_model(model) if fast and not hooked else None
    kept = hf_decoding.PromptCache(model=lm) if keep_cache and lm is not None else None
    if kept is not None:
        kept.rows, kept.fed = [(0, 0, 0)] * len(ids), [[] for _ in ids]
    for b, start in enumerate(range(0, len(ids), bs)):
        rows = order[start : start + bs]
        tokens, mask = left_pad([ids[i] for i in rows], _pad_id(tok), model.cfg.device)
        stop = TextStop(tok, stop_strings, tokens.shape[1]) if stop_strings else None
        how = replace(base, seed=seed + b, stop=stop,
                      max_new_tokens=_room(model, tokens.shape[1], max_new_tokens))  # fmt: skip
        if native:
            gen = native_decoding.generate(model, tokens, mask, how)
        elif lm is not None:
            gen, cache = hf_decoding.generate(lm, tokens, mask, how)
            if kept is not None:
                kept.caches.append(cache)
                width = tokens.shape[1]
                for j, i in enumerate(rows):
                    pad = width - len(ids[i])
                    kept.rows[i] = (b, j, pad)
                    kept.fed[i] = list(ids[i]) + gen[j, :-1].tolist()
        else:
            gen = _bridge_generate(model, tokens, mask, how)
        for j, i in enumerate(rows):
            out[i] = _finish(tok, gen[j].tolist(), eos, stop_strings)
    return Generation(
        texts=[o[0] for o in out],
        token_ids=[o[1] for o in out],
        n_tokens=np.array([o[2] for o in out], dtype=np.int64),
        cache=kept,
    )


def _fill_id(tok: PreTrainedTokenizerBase, eos: list[int]) -> int:
    """The token finished rows emit, as ``bridge.generate`` chooses it (an EOS id, so the
    completion is cut before it whichever path ran)."""
    if not eos:
        return 0
    return int(tok.eos_token_id) if tok.eos_token_id is not None else int(eos[0])


def _bridge_generate(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    how: Decoding,
) -> Int[torch.Tensor, "batch new"]:
    """``bridge.generate`` (hooks act), seeded like the hook-free paths; new ids on CPU."""
    devices = [tokens.device] if tokens.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(how.seed)
        out = model.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=how.max_new_tokens,
            do_sample=how.temperature > 0,
            temperature=how.temperature if how.temperature > 0 else 1.0,
            stop_at_eos=bool(how.eos_ids),
            eos_token_id=list(how.eos_ids) or None,
            stopping_criteria=[how.stop] if how.stop is not None else None,
            verbose=False,
            return_type="tokens",
        )
    return out[:, tokens.shape[1] :].cpu()


def _finish(
    tok: PreTrainedTokenizerBase, new: list[int], eos: list[int], stop_strings: Sequence[str]
) -> tuple[str, list[int], int]:
    """Cut one row at EOS / after a stop string; count the tokens it really produced."""
    cut = next((k for k, t in enumerate(new) if t in eos), None)
    produced = new if cut is None else new[:cut]
    text = tok.decode(produced, skip_special_tokens=False)
    n = len(produced) + (cut is not None)
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if hits:
        at, s = min(hits)
        text = text[: at + len(s)]
        # Tokens after the stop are fill (the row was frozen); count up to the stop.
        for k in range(1, len(produced) + 1):
            if s in tok.decode(produced[:k], skip_special_tokens=False):
                n = k
                break
    return text, produced, n


@torch.no_grad()
def score_continuations(
    model: TransformerBridge,
    prefixes: Sequence[str] | Sequence[Sequence[int]],
    continuations: Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    reuse: hf_decoding.PromptCache | None = None,
    reuse_rows: Sequence[int | None] | None = None,
    fast: bool = True,
) -> Float[torch.Tensor, "n_prefixes n_continuations"]:
    """Log-probability of each continuation right after each prefix.

    ``score[i, j] = sum_k log p(c_j[k] | prefix_i + c_j[:k])``: prefixes and continuations
    are tokenised *separately* (a continuation is what the model would emit next, not a
    re-tokenisation of the joined text). Every continuation's first token comes from the
    prefix's last position; multi-token continuations add one sequence per *maximal*
    distinct proper continuation prefix (one sequence serves all its own prefixes), so a
    prefix whose spellings are all single tokens costs one pass.

    With a hook attached (patching, steering) the scores run through the bridge forward,
    so the hooks act on them. Without one, Hugging Face models run the hook-free path of
    :mod:`kdgap.agent.hf_decoding` on the twin: logits only at the positions read, and
    with ``reuse`` (a ``Generation.cache``) each prefix starts from the cached tokens it
    shares with its generation row, so only the tokens after them (the rationale's
    re-tokenised tail, the action marker, the continuation) are run. Equal to the bridge
    path up to float rounding (tested).

    Args:
        model: a TransformerBridge.
        prefixes: ``[n_prefixes]`` texts (BOS rule of :func:`encode`) or id lists.
        continuations: ``[n_continuations]`` texts (no special tokens added) or id lists.
        batch_size: sequences per forward (default: sized for ~256 MB of logits).
        tokenizer: overrides ``model.tokenizer``.
        reuse: KV caches of the generation these prefixes extend
            (``generate(..., keep_cache=True).cache``).
        reuse_rows: ``[n_prefixes]`` the prompt index in ``reuse`` each prefix extends
            (None for a prefix that extends none); default ``0..n_prefixes-1``.
        fast: allow the hook-free path (False: always the bridge forward).

    Returns:
        ``[n_prefixes, n_continuations]`` float32 log-probs on CPU.
    """
    tok = _tokenizer(model, tokenizer)
    if len(prefixes) == 0 or len(continuations) == 0:
        raise ValueError(
            f"got {len(prefixes)} prefixes and {len(continuations)} continuations; "
            "pass at least one of each."
        )
    pre = encode(model, prefixes, tokenizer=tok) if isinstance(prefixes[0], str) else prefixes
    conts = [
        tok(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else list(c)
        for c in continuations
    ]
    for c, raw in zip(conts, continuations):
        if len(c) == 0:
            raise ValueError(f"continuation {raw!r} tokenises to nothing; drop it.")
    # Contexts whose next-token distribution we need: () and every proper prefix of a
    # continuation. One sequence prefix + ctx serves ctx and all of ctx's own prefixes
    # (their logits sit at earlier positions), so only maximal contexts are run.
    ctxs = {tuple(c[:k]) for c in conts for k in range(len(c))}
    longest_first = sorted(ctxs, key=len, reverse=True)
    maximal: list[tuple[int, ...]] = []
    for ctx in longest_first:
        if not any(m[: len(ctx)] == ctx for m in maximal):
            maximal.append(ctx)
    lm = twins.fast_model(model) if fast and not has_hooks(model) else None
    if lm is not None:
        if reuse is not None and reuse.model is not lm:
            reuse = None  # the caches came from another model (or a rebuilt twin)
        rows = reuse_rows if reuse_rows is not None else list(range(len(pre)))
        if reuse is not None and len(rows) != len(pre):
            raise ValueError(f"reuse_rows has {len(rows)} entries for {len(pre)} prefixes.")
        if batch_size is None:
            batch_size = max(1, 2**14 // max(1, max(len(p) for p in pre)))
        per = hf_decoding.score_rows(
            lm, pre, maximal, reuse=reuse, reuse_rows=rows if reuse is not None else None,
            pad_id=_pad_id(tok), batch_size=batch_size,
        )  # fmt: skip
        return _sum_logps(lambda i, ctx: per[i][ctx], len(pre), conts)
    jobs = [(i, ctx) for i in range(len(pre)) for ctx in maximal]
    seqs = [list(pre[i]) + list(ctx) for i, ctx in jobs]
    n_vocab = int(model.cfg.d_vocab)
    if batch_size is None:
        longest = max(len(s) for s in seqs)
        batch_size = max(1, int(2**26 // max(1, longest * n_vocab)))
    logp: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for start in range(0, len(seqs), batch_size):
        rows = order[start : start + batch_size]
        tokens, mask = left_pad([seqs[r] for r in rows], _pad_id(tok), model.cfg.device)
        logits = model(tokens, attention_mask=mask, return_type="logits")
        width = max(len(jobs[r][1]) for r in rows) + 1
        tail = F.log_softmax(logits[:, -width:, :].float(), dim=-1).cpu()
        for j, r in enumerate(rows):
            i, ctx = jobs[r]
            for k in range(len(ctx) + 1):
                # Left padding: prefix + ctx[:k] ends len(ctx) - k positions before the end.
                logp.setdefault((i, ctx[:k]), tail[j, width - 1 - (len(ctx) - k)])
    return _sum_logps(lambda i, ctx: logp[(i, ctx)], len(pre), conts)


def _sum_logps(
    get: Callable[[int, tuple[int, ...]], Float[torch.Tensor, " vocab"]],
    n: int,
    conts: list[list[int]],
) -> Float[torch.Tensor, "n n_continuations"]:
    """``[n, len(conts)]``: ``sum_k get(i, c[:k])[c[k]]`` for every prefix i and continuation c."""
    out = torch.zeros(n, len(conts))
    for i in range(n):
        for j, c in enumerate(conts):
            out[i, j] = sum(float(get(i, tuple(c[:k]))[c[k]]) for k in range(len(c)))
    return out
