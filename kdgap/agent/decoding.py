"""The KV-cached decode loop shared by the hook-free generation paths, and its settings.

:mod:`kdgap.agent.native_decoding` (``boot_native`` models) and
:mod:`kdgap.agent.hf_decoding` (the SDPA twin of a Hugging Face model) differ in how they
run a forward with a cache and how they sample; the loop around them (left-padded prompt,
positions that count real tokens only, finished rows frozen to a fill token, EOS and stop
criteria) is :func:`decode_loop`, and what to generate is one :class:`Decoding`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

#: ``step(ids [batch q], positions [batch q], key_mask [batch k]) -> logits [batch vocab]``:
#: one cached forward returning the last position's next-token logits.
Step = Callable[
    [Int[torch.Tensor, "batch q"], Int[torch.Tensor, "batch q"], Int[torch.Tensor, "batch k"]],
    Float[torch.Tensor, "batch vocab"],
]
#: ``pick(logits [batch vocab]) -> next token [batch]``: argmax or a sampler.
Pick = Callable[[Float[torch.Tensor, "batch vocab"]], Int[torch.Tensor, " batch"]]
#: ``stop(sequence [batch pos]) -> finished [batch]``: an extra stopping criterion.
Stop = Callable[[Int[torch.Tensor, "batch pos"]], Bool[torch.Tensor, " batch"]]


@dataclass(frozen=True)
class Decoding:
    """What one generation batch asks for, on every path.

    Attributes:
        max_new_tokens: steps to run at most.
        temperature: 0 = argmax; > 0 samples ``softmax(logits / temperature)`` (each path
            with its own seeded sampler).
        seed: seeds the sampler.
        eos_ids: a row that emits one of these is finished.
        fill_id: the token finished rows emit (as ``bridge.generate`` does).
        stop: optional extra criterion (see :data:`Stop`).
    """

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    eos_ids: tuple[int, ...] = ()
    fill_id: int = 0
    stop: Stop | None = None


def decode_loop(
    step: Step,
    pick: Pick,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    how: Decoding,
) -> Int[torch.Tensor, "batch new"]:
    """Run ``step`` over the prompt, then token by token, and return the new tokens.

    Args:
        step: the cached forward (see :data:`Step`); it keeps its own cache.
        pick: next token of every row from its logits (see :data:`Pick`).
        tokens, mask: left-padded prompt ids and 0/1 attention mask.
        how: length, EOS ids, fill token and stop criterion (``temperature`` and ``seed``
            belong to ``pick``).

    Returns:
        ``[batch, new]`` generated ids on the prompt's device (``new <= max_new_tokens``).
    """
    device = tokens.device
    eos_t = torch.tensor(list(how.eos_ids), dtype=torch.long, device=device)
    key_mask = mask.long()
    positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = key_mask.sum(-1, keepdim=True)
    logits = step(tokens, positions, key_mask)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    seq, new = tokens, []
    for i in range(how.max_new_tokens):
        nxt = torch.where(finished, torch.full_like(finished, how.fill_id, dtype=torch.long),
                          pick(logits))  # fmt: skip
        new.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if len(how.eos_ids):
            finished |= torch.isin(nxt, eos_t)
        if how.stop is not None:
            finished |= how.stop(seq).to(device)
        if bool(finished.all()) or i == how.max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
        logits = step(nxt[:, None], next_pos, key_mask)
        next_pos = next_pos + 1
    return torch.stack(new, dim=1)
