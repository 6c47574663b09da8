"""KV-cached generation and forced-choice scoring on the SDPA twin of a Hugging Face model.

The agent's time goes into the prompt pass and the decode loop. ``bridge.generate``
computes the full-vocabulary logits at every prompt position in its first step, decodes
through transformer-lens's eager attention bridge, and forced choice then runs the whole
prompt + rationale again. Here, on the causal LM of :func:`kdgap.models.twins.fast_model`
(the SDPA twin, sharing the bridge's tensors):

- :func:`generate` mirrors ``TransformerBridge.generate`` (left padding, positions that
  count real tokens only, greedy ``argmax`` or transformer-lens's own ``sample_logits``
  under ``torch.random.fork_rng`` seeded like the bridge path, finished rows frozen) but
  computes only the last prompt position's logits and returns its KV cache, which
  :class:`PromptCache` keeps per prompt.
- :func:`score_rows` scores continuations after prefixes, starting each prefix from the
  longest run of tokens it shares with a cached generation row (the prompt and usually the
  whole rationale), so only the few tokens after it are run.

Results equal the bridge path up to float rounding (SDPA vs eager attention, ~1e-6 in
log-probabilities); greedy tokens are tested equal to Hugging Face ``generate`` and to the
bridge path. Callers use this path only when no hook is attached (hooks must see every
position), exactly like :mod:`kdgap.agent.native_decoding` for native models.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from transformer_lens.utilities import sample_logits
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kdgap.agent.decoding import Decoding, decode_loop


@functools.cache
def _accepts_keep_cls(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _accepts_keep(lm: PreTrainedModel) -> bool:
    return _accepts_keep_cls(type(lm))


def _forward(
    lm: PreTrainedModel,
    ids: Int[torch.Tensor, "batch q"],
    mask: Int[torch.Tensor, "batch k"],
    positions: Int[torch.Tensor, "batch q"],
    cache: Cache | None = None,
    keep: int = 1,
) -> tuple[Float[torch.Tensor, "batch keep vocab"], Cache]:
    """``(logits [batch, keep, vocab], cache)`` of ``ids`` after ``cache``."""
    kw = {"logits_to_keep": keep} if _accepts_keep(lm) else {}
    out = lm(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
        use_cache=True, **kw,
    )  # fmt: skip
    return out.logits[:, -keep:, :], out.past_key_values


# ------------------------------------------------------------------------------ generation
@dataclass
class PromptCache:
    """KV caches of one :func:`kdgap.agent.generation.generate` call, per prompt.

    Attributes:
        rows: ``[n_prompts]`` ``(batch index, row in that batch, left padding)``.
        fed: ``[n_prompts]`` the token ids whose keys and values the cache holds, in order
            (prompt ids, then every generated token but the last).
        caches: one Hugging Face cache per generation batch.
        model: the causal LM that filled the caches (scoring must use the same one).

    The caches hold keys and values of the weights at generation time: edit no weight in
    place between ``generate(..., keep_cache=True)`` and the scoring that reuses them
    (:class:`~kdgap.agent.text_agent.TextAgent` never does).
    """

    rows: list[tuple[int, int, int]] = field(default_factory=list)
    fed: list[list[int]] = field(default_factory=list)
    caches: list[Cache] = field(default_factory=list)
    model: PreTrainedModel | None = None

    def row_cache(self, i: int, length: int, copies: int = 1) -> DynamicCache | None:
        """A fresh cache with prompt ``i``'s first ``length`` cached tokens (no padding),
        repeated ``copies`` times along the batch, or None when it cannot be cut."""
        b, r, pad = self.rows[i]
        src = self.caches[b]
        layers = getattr(src, "layers", None)
        if not layers or any(type(x) is not DynamicLayer for x in layers):
            return None
        out = DynamicCache()
        for li, layer in enumerate(layers):
            k = layer.keys[r : r + 1, :, pad : pad + length].expand(copies, -1, -1, -1)
            v = layer.values[r : r + 1, :, pad : pad + length].expand(copies, -1, -1, -1)
            out.update(k.contiguous(), v.contiguous(), li)
        return out


@torch.no_grad()
def generate(
    lm: PreTrainedModel,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    how: Decoding,
) -> tuple[Int[torch.Tensor, "batch new"], Cache]:
    """Greedy or sampled continuation of left-padded ``tokens`` with a KV cache.

    Args:
        lm: a Hugging Face causal LM (see :func:`kdgap.models.twins.fast_model`).
        tokens, mask: left-padded prompt ids and 0/1 attention mask.
        how: what to generate; ``temperature > 0`` samples with transformer-lens's
            ``sample_logits`` from the global RNG seeded with ``how.seed`` inside
            ``fork_rng`` (as the bridge path samples).

    Returns:
        ``(new [batch, new], cache)``: generated ids on CPU (``new <= max_new_tokens``) and
        the Hugging Face cache (prompt + all generated tokens but the last).
    """
    state: dict[str, Cache | None] = {"cache": None}

    def step(
        ids: Int[torch.Tensor, "batch q"],
        positions: Int[torch.Tensor, "batch q"],
        key_mask: Int[torch.Tensor, "batch k"],
    ) -> Float[torch.Tensor, "batch vocab"]:
        logits, state["cache"] = _forward(lm, ids, key_mask, positions, state["cache"])
        return logits[:, -1, :]

    def pick(logits: Float[torch.Tensor, "batch vocab"]) -> Int[torch.Tensor, " batch"]:
        if how.temperature > 0:
            return sample_logits(logits, temperature=how.temperature).to(logits.device)
        return logits.argmax(dim=-1)

    devices = [tokens.device] if tokens.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(how.seed))
        new = decode_loop(step, pick, tokens, mask, how)
    return new.cpu(), state["cache"]


# -------------------------------------------------------------------------------- scoring
def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def score_rows(
    lm: PreTrainedModel,
    prefix_ids: Sequence[Sequence[int]],
    maximal: Sequence[tuple[int, ...]],
    *,
    reuse: PromptCache | None = None,
    reuse_rows: Sequence[int | None] | None = None,
    pad_id: int = 0,
    batch_size: int = 8,
) -> list[dict[tuple[int, ...], Float[torch.Tensor, " vocab"]]]:
    """Next-token log-probs after each prefix + every prefix of every context in ``maximal``.

    Args:
        lm: the causal LM (the one that filled ``reuse``'s caches when reusing).
        prefix_ids: ``[n]`` token ids of each prefix.
        maximal: the continuation contexts to run (each covers all its own prefixes).
        reuse: caches of a generation whose rows share leading tokens with the prefixes.
        reuse_rows: ``[n]`` the prompt of ``reuse`` each prefix extends (None: none).
        pad_id: id of the (masked) left padding.
        batch_size: prefixes per forward pass on the no-cache path.

    Returns:
        ``[n]`` dicts ``{ctx: log-probs [vocab] (float32, CPU)}`` for ``()`` and every
        proper prefix and full length of each context in ``maximal``.
    """
    device = next(lm.parameters()).device
    ctxs = list(maximal) or [()]
    width = max(len(c) for c in ctxs) + 1
    out: list[dict] = [{} for _ in prefix_ids]

    def run(i_list: list[int], past: int, cache: Cache | None) -> None:
        # One forward: each prefix's uncached tail + each context, left-padded (pads sit
        # between the cached tokens and the row, masked; positions count real tokens), so
        # every row's needed positions are its last ``len(ctx) + 1``.
        rows, owners = [], []
        for i in i_list:
            tail = list(prefix_ids[i][past:])
            for c in ctxs:
                rows.append(tail + list(c))
                owners.append((i, c))
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), int(pad_id), dtype=torch.long)
        key = torch.zeros((len(rows), past + n), dtype=torch.long)
        key[:, :past] = 1
        for j, r in enumerate(rows):
            ids[j, n - len(r) :] = torch.tensor(r, dtype=torch.long)
            key[j, past + n - len(r) :] = 1
        positions = past + (key[:, past:].cumsum(-1) - 1).clamp(min=0)
        logits, _ = _forward(lm, ids.to(device), key.to(device), positions.to(device),
                             cache, keep=width)  # fmt: skip
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, (i, c) in enumerate(owners):
            for k in range(len(c) + 1):
                out[i].setdefault(tuple(c[:k]), logp[j, width - 1 - (len(c) - k)])

    cached, fresh = [], []
    for i, ids in enumerate(prefix_ids):
        row = None if reuse is None or reuse_rows is None else reuse_rows[i]
        if row is None:
            fresh.append(i)
            continue
        length = min(_common(ids, reuse.fed[row]), len(ids) - 1)
        cache = reuse.row_cache(row, length, copies=len(ctxs)) if length > 0 else None
        if cache is None:
            fresh.append(i)
        else:
            cached.append((i, length, cache))
    for i, length, cache in cached:
        run([i], length, cache)
    # Without a cache: batches of similar length (left-padded, as generation pads).
    fresh.sort(key=lambda i: len(prefix_ids[i]))
    step = max(1, batch_size)
    for s in range(0, len(fresh), step):
        run(fresh[s : s + step], 0, None)
    return out
