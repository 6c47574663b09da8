"""KV-cached generation for ``TransformerBridge.boot_native`` models.

transformer-lens 4.3's ``NativeModel`` has no KV cache: ``bridge.generate`` re-runs the
whole sequence for every new token, so a batch of long prompts then generates no faster
per token than one prompt. This module runs the same submodules
(``tok_embed``, ``pos``, ``layers[i].ln1/attn.q,k,v,o/ln2/mlp``, ``ln_out``, ``head``) with
cached keys and values, reproducing ``NativeAttention.forward`` (scale, soft cap, GQA
``repeat_interleave``, rotary with explicit positions, masked rows set to zero). Left
padding follows the bridge: positions count real tokens only and pad keys are masked.
Equality with ``bridge.generate`` (greedy, token for token) is tested.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from kdgap.agent.decoding import Decoding, decode_loop
from kdgap.models.runtime import causal_native
from kdgap.models.twins import native_twin

try:  # the native source exists in transformer-lens 4.x; guard for other versions
    from transformer_lens.model_bridge.sources.native.model import NativeModel, apply_softcap
except ImportError:  # pragma: no cover - older/newer layouts fall back to bridge.generate
    NativeModel, apply_softcap = None, None

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

#: Per layer: None before the prompt pass, then ``[keys, values, used positions]``.
KVCache = list


#: True when a model wraps a causal ``NativeModel`` this loop can run.
supports = causal_native


def _forward(
    nm: NativeModel,
    ids: Int[torch.Tensor, "batch q"],
    positions: Int[torch.Tensor, "batch q"],
    key_mask: Int[torch.Tensor, "batch k"],
    cache: KVCache,
    capacity: int,
) -> Float[torch.Tensor, "batch d_vocab"]:
    """Run ``q`` new positions against the cache (updated in place); last-position logits.

    ``cache[layer]`` is None before the prompt pass, then ``[keys, values, used]`` with
    buffers of ``capacity`` positions.
    """
    h = nm.tok_embed(ids)
    if nm.pos is not None:
        h = h + nm.pos(positions)
    b, q = ids.shape
    for li, block in enumerate(nm.layers):
        attn = block.attn
        x = block.ln1(h)
        qh = attn.q(x).view(b, q, attn.n_heads, attn.d_head).transpose(1, 2)
        kh = attn.k(x).view(b, q, attn.n_kv_heads, attn.d_head).transpose(1, 2)
        vh = attn.v(x).view(b, q, attn.n_kv_heads, attn.d_head).transpose(1, 2)
        if attn.rotary is not None:
            qh, kh = attn.rotary.apply_rope(qh, kh, position_ids=positions)
        # Preallocated buffers written in place: a torch.cat of the whole cache at every
        # token would dominate the step time on long prompts.
        if cache[li] is None:
            shape = (b, attn.n_kv_heads, capacity, attn.d_head)
            cache[li] = [kh.new_empty(shape), vh.new_empty(shape), 0]
        kbuf, vbuf, used = cache[li]
        kbuf[:, :, used : used + q] = kh
        vbuf[:, :, used : used + q] = vh
        cache[li][2] = used + q
        kh, vh = kbuf[:, :, : used + q], vbuf[:, :, : used + q]
        if attn.kv_repeats > 1:
            kh = kh.repeat_interleave(attn.kv_repeats, dim=1)
            vh = vh.repeat_interleave(attn.kv_repeats, dim=1)
        scores = torch.matmul(qh, kh.transpose(-2, -1)) / attn.scale
        scores = apply_softcap(scores, attn.attn_scores_soft_cap)
        k = kh.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool, device=ids.device).triu(k - q + 1)
        masked = causal[None, None] | ~key_mask.bool()[:, None, None, :]
        pattern = F.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        pattern = pattern.masked_fill(masked, 0.0)  # all-pad query rows: NaN -> 0
        out = torch.matmul(pattern, vh).transpose(1, 2).reshape(b, q, -1)
        h = h + attn.o(out)
        if not block.cfg.attn_only:
            h = h + block.mlp(block.ln2(h))
    logits = nm.head(nm.ln_out(h[:, -1:, :]))[:, -1, :]
    return apply_softcap(logits, nm.output_logits_soft_cap)


@torch.no_grad()
def generate(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    how: Decoding,
) -> Int[torch.Tensor, "batch new"]:
    """Greedy or sampled continuation of left-padded ``tokens`` with a KV cache.

    Args:
        model: a bridge for which :func:`supports` is True.
        tokens, mask: left-padded prompt ids and 0/1 attention mask.
        how: what to generate; ``temperature > 0`` samples ``softmax(logits /
            temperature)`` with a ``torch.Generator`` seeded by ``how.seed``.

    Returns:
        ``[batch, new]`` generated ids on CPU (``new <= how.max_new_tokens``); finished
        rows are filled with ``how.fill_id``.
    """
    # The plain twin runs the same blocks without the bridge's wrapper components (and
    # their per-call overhead, most of a small model's decoding time); the wrapped model
    # where no twin is served.
    nm = native_twin(model) or model.original_model
    gen = torch.Generator(device=tokens.device).manual_seed(int(how.seed))
    cache: KVCache = [None] * len(nm.layers)
    capacity = tokens.shape[1] + how.max_new_tokens

    def step(
        ids: Int[torch.Tensor, "batch q"],
        positions: Int[torch.Tensor, "batch q"],
        key_mask: Int[torch.Tensor, "batch k"],
    ) -> Float[torch.Tensor, "batch vocab"]:
        return _forward(nm, ids, positions, key_mask, cache, capacity)

    def pick(logits: Float[torch.Tensor, "batch vocab"]) -> Int[torch.Tensor, " batch"]:
        if how.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = F.softmax(logits.float() / how.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    return decode_loop(step, pick, tokens, mask, how).cpu()
