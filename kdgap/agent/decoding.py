"""The KV-cached decode loop shared by the hook-free generation paths.

:mod:`kdgap.agent.native_decoding` (``boot_native`` models) and :mod:`kdgap.models.twins`
(Hugging Face models) differ in how they run a forward with a cache and how they sample;
the loop around them (left-padded prompt, positions that count real tokens only, finished
rows frozen to a fill token, EOS and stop criteria) is this one function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int

#: ``step(ids [batch q], positions [batch q], key_mask [batch k]) -> logits [batch vocab]``:
#: one cached forward returning the last position's next-token logits.
Step = Callable[
    [Int[torch.Tensor, "batch q"], Int[torch.Tensor, "batch q"], Int[torch.Tensor, "batch k"]],
    Float[torch.Tensor, "batch vocab"],
]


def decode_loop(
    step: Step,
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Int[torch.Tensor, "batch pos"],
    *,
    max_new_tokens: int,
    pick: Callable[[Float[torch.Tensor, "batch vocab"]], Int[torch.Tensor, " batch"]],
    eos_ids: Sequence[int] = (),
    fill_id: int = 0,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Int[torch.Tensor, "batch new"]:
    """Run ``step`` over the prompt, then token by token, and return the new tokens.

    Args:
        step: the cached forward (see :data:`Step`); it keeps its own cache.
        tokens, mask: left-padded prompt ids and 0/1 attention mask.
        max_new_tokens: steps to run at most.
        pick: next token of every row from its logits (argmax or a sampler).
        eos_ids: a row that emits one of these is finished.
        fill_id: the token finished rows emit (as ``bridge.generate`` does).
        stop: optional ``stop(sequence [batch pos]) -> finished [batch]`` criterion.

    Returns:
        ``[batch, new]`` generated ids on the prompt's device (``new <= max_new_tokens``).
    """
    device = tokens.device
    eos_t = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    key_mask = mask.long()
    positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
    next_pos = key_mask.sum(-1, keepdim=True)
    logits = step(tokens, positions, key_mask)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    seq, new = tokens, []
    for i in range(max_new_tokens):
        nxt = torch.where(finished, torch.full_like(finished, fill_id, dtype=torch.long),
                          pick(logits))  # fmt: skip
        new.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if len(eos_ids):
            finished |= torch.isin(nxt, eos_t)
        if stop is not None:
            finished |= stop(seq).to(device)
        if bool(finished.all()) or i == max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
        logits = step(nxt[:, None], next_pos, key_mask)
        next_pos = next_pos + 1
    return torch.stack(new, dim=1)
