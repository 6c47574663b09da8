"""Counterfactual pairs by in-distribution token replacement (Zhang & Nanda 2023).

From one clean step (history, completion) three corruptions, each carrying the two arms
whose logit difference at the action position is the metric (``arm_a`` = clean's arm,
``arm_b`` = the corruption's arm):

- ``"conclusion"`` (a): the rationale's concluding arm swapped for ``new_arm``
  (``fmt.edit_conclusion``).
- ``"statistics"`` (b): the rationale's per-arm statistics of the clean winner and
  ``new_arm`` swapped, so ``new_arm`` wins on the numbers; the written conclusion is held
  unless ``also_conclusion=True``. Uses the format's ``rationale.arm[<name>]`` site spans
  (each entry ``<name><sep><stats>``: the text after the name is swapped), or a custom
  ``stats_editor``.
- ``"history"`` (c): every history step of the clean greedy arm and ``new_arm`` swapped
  (arm identities exchanged, rewards kept), so the greedy arm becomes ``new_arm`` while
  the rationale text is held fixed; re-rendered through ``fmt.render_prompt``.

Everything goes through the :class:`~kdgap.envs.transcript_format.TranscriptFormat`
protocol; the format-specific parts are pluggable: ``stats_editor`` for (b) and ``text_fn``
(how prompt and rationale join into the scored text: e.g. a chat template) for all three.
The scored text is ``text_fn(prompt, strip_action(completion)) + fmt.action_marker``; its
last token is the action position. The sender span (rationale) and history span are the
character ranges of the two parts, so no format needs ``rationale``/``history`` sites.
Greedy arms and their ties follow :mod:`kdgap.envs.stats` (lowest index of the tie set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Bool, Int

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums, first_arm, greedy_arms
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.patch.core import LogitDiff
from kdgap.models.tokens import arm_token_ids, tokenize_batch
from kdgap.records import StepRecord

if TYPE_CHECKING:  # annotations only: importing transformers here would slow every import
    from transformers import PreTrainedTokenizerBase

#: ``record -> (actions, rewards)``: the history a record's prompt shows.
HistoryFn = Callable[[StepRecord], tuple[Sequence[int], Sequence[float]]]
#: ``(prompt, rationale) -> text`` before the action marker.
TextFn = Callable[[str, str], str]

PAIR_KINDS = ("conclusion", "statistics", "history")


@dataclass(frozen=True)
class CounterfactualPair:
    """One clean/corrupt text pair.

    Attributes:
        kind: one of :data:`PAIR_KINDS`.
        clean, corrupt: full scored texts (ending with the action marker).
        arm_a, arm_b: arm indices whose logit difference is the metric (clean's, corrupt's).
        arm_names: display names, index ``i`` naming arm ``i``.
        history_chars, rationale_chars: ``(start, end)`` character ranges in ``clean``
            (token masks are taken from clean; equal token counts make them the same).
    """

    kind: str
    clean: str
    corrupt: str
    arm_a: int
    arm_b: int
    arm_names: tuple[str, ...]
    history_chars: tuple[int, int]
    rationale_chars: tuple[int, int]


def _join(
    prompt: str, rationale: str, marker: str, text_fn: TextFn | None
) -> tuple[str, tuple[int, int], tuple[int, int]]:
    head = text_fn(prompt, "") if text_fn else prompt
    text = (text_fn(prompt, rationale) if text_fn else prompt + rationale) + marker
    return text, (0, len(head)), (len(head), len(head) + len(rationale))


def swap_statistics(
    fmt: TranscriptFormat,
    completion: str,
    arm_x: int,
    arm_y: int,
    arm_names: Sequence[str],
    prefix: str = "",
) -> str:
    """Swap the per-arm statistics text of two arms using ``rationale.arm[<name>]`` spans.

    Spans are read from ``prefix + completion`` (formats find the rationale relative to
    the prompt), and only the completion is edited.

    Raises:
        ValueError: the format has no per-arm span for one of the arms.
    """
    spans = fmt.site_spans(prefix + completion)
    spans = {k: (a - len(prefix), b - len(prefix)) for k, (a, b) in spans.items()}
    names = [arm_names[arm_x], arm_names[arm_y]]
    got = [spans.get(f"rationale.arm[{n}]") for n in names]
    if None in got:
        raise ValueError(
            f"format {getattr(fmt, 'name', fmt)!r} gives no 'rationale.arm[...]' span for "
            f"{[n for n, g in zip(names, got) if g is None]} in this completion; pass "
            "stats_editor= for formats that write statistics differently."
        )
    (s1, e1), (s2, e2) = sorted(got)
    (n1, n2) = [names[got.index(g)] for g in sorted(got)]
    tail1, tail2 = completion[s1 + len(n1) : e1], completion[s2 + len(n2) : e2]
    return (
        completion[: s1 + len(n1)] + tail2 + completion[e1 : s2 + len(n2)] + tail1 + completion[e2:]
    )


def _greedy(actions: Sequence[int], rewards: Sequence[float], n_arms: int) -> int:
    """The history's greedy arm (:func:`~kdgap.envs.stats.greedy_arms`, lowest index of
    the tie set); -1 for an empty history."""
    if len(actions) == 0:
        return -1
    return int(first_arm(greedy_arms(*counts_and_sums(actions, rewards, n_arms))))


def _below(actions: Sequence[int], rewards: Sequence[float], n_arms: int, g: int) -> list[int]:
    """Arms whose empirical mean is strictly below arm ``g``'s (untried arms included).

    Arm ``i`` is below ``g`` when it is not greedy in the history seen through ``i`` and
    ``g`` alone (:func:`~kdgap.envs.stats.greedy_arms` on those two arms' statistics).
    """
    counts, sums = counts_and_sums(actions, rewards, n_arms)
    out = []
    for i in range(n_arms):
        two = np.isin(np.arange(n_arms), [i, g])
        if i != g and not greedy_arms(np.where(two, counts, 0), np.where(two, sums, 0.0))[i]:
            out.append(i)
    return out


def make_pair(
    kind: str, fmt: TranscriptFormat, cfg: BanditConfig, actions: Sequence[int],
    rewards: Sequence[float], completion: str, new_arm: int | None = None, *,
    also_conclusion: bool = False, stats_editor: Callable[..., str] | None = None,
    text_fn: TextFn | None = None,
) -> CounterfactualPair:  # fmt: skip
    """Build one counterfactual pair of ``kind`` from a clean step.

    Args:
        kind: ``"conclusion"``, ``"statistics"`` or ``"history"``.
        fmt: a TranscriptFormat (OrganismFormat, PaperFormat, ...).
        cfg: the BanditConfig (arm names, rendering).
        actions, rewards: the history shown in the prompt.
        completion: the clean completion (its action part, if any, is stripped).
        new_arm: the corruption's arm (default: for (a)/(b) the next arm after the clean
            conclusion; for (c) the first arm with a strictly lower mean than the greedy arm).
        also_conclusion: (b) also rewrite the written conclusion to ``new_arm``.
        stats_editor: ``(fmt, completion, arm_x, arm_y, arm_names, prompt) -> completion``
            for (b) (default :func:`swap_statistics`).
        text_fn: ``(prompt, rationale) -> text`` before the marker (default: concatenation).
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {PAIR_KINDS}.")
    names = tuple(cfg.arm_names)
    rationale = fmt.strip_action(completion)
    prompt = fmt.render_prompt(cfg, actions, rewards)
    if kind == "history":
        g = _greedy(actions, rewards, len(names))
        if g < 0:
            raise ValueError("kind='history' needs a history with at least one step.")
        a, r = np.asarray(actions, int), np.asarray(rewards, float)
        if new_arm is None:
            lower = _below(actions, rewards, len(names), g)
            if not lower:
                raise ValueError("no arm has a mean strictly below the greedy arm; pass new_arm=.")
            new_arm = lower[0]
        swapped = np.where(a == g, new_arm, np.where(a == new_arm, g, a))
        if _greedy(swapped, r, len(names)) != new_arm:
            raise ValueError(
                f"new_arm={new_arm} ties with the greedy arm {g}: swapping them leaves the "
                "greedy arm unchanged; pick an arm with a strictly lower mean (or untried)."
            )
        corrupt_prompt = fmt.render_prompt(cfg, swapped.tolist(), r.tolist())
        arm_a, arm_b, corrupt_rat = g, int(new_arm), rationale
    else:
        arm_a = fmt.parse_rationale(rationale, names)
        if arm_a is None:
            raise ValueError(f"completion has no rationale conclusion: {completion[:80]!r}...")
        new_arm = (arm_a + 1) % len(names) if new_arm is None else int(new_arm)
        if new_arm == arm_a:
            raise ValueError(f"new_arm={new_arm} equals the clean conclusion; pick another arm.")
        if kind == "conclusion":
            corrupt_rat = fmt.edit_conclusion(rationale, new_arm, names)
        else:
            corrupt_rat = (stats_editor or swap_statistics)(
                fmt, rationale, arm_a, new_arm, names, prompt
            )
            if also_conclusion:
                corrupt_rat = fmt.edit_conclusion(corrupt_rat, new_arm, names)
        corrupt_prompt, arm_b = prompt, new_arm
    clean, hist, rat = _join(prompt, rationale, fmt.action_marker, text_fn)
    corrupt, _, _ = _join(corrupt_prompt, corrupt_rat, fmt.action_marker, text_fn)
    return CounterfactualPair(kind, clean, corrupt, int(arm_a), int(arm_b), names, hist, rat)


@dataclass
class PairBatch:
    """Tokenised pairs of one length, ready for patching.

    Attributes:
        clean_tokens, corrupt_tokens: ``[batch pos]``.
        metric: :class:`~kdgap.hooks.patch.core.LogitDiff` (arm_a - arm_b at the last token).
        rationale: ``[batch pos]`` tokens overlapping the rationale (path-patching senders).
        history: ``[batch pos]`` tokens overlapping the history.
        index: ``[batch]`` index of each pair in the input list.
    """

    clean_tokens: Int[torch.Tensor, "batch pos"]
    corrupt_tokens: Int[torch.Tensor, "batch pos"]
    metric: LogitDiff
    rationale: Bool[torch.Tensor, "batch pos"]
    history: Bool[torch.Tensor, "batch pos"]
    index: list[int]


def span_mask(
    offsets: Int[torch.Tensor, "batch pos 2"],
    chars: tuple[int, int] | Sequence[tuple[int, int]],
) -> Bool[torch.Tensor, "batch pos"]:
    """Tokens whose character range overlaps ``chars`` (``(start, end)`` per example)."""
    c = torch.as_tensor(chars, dtype=torch.long).reshape(-1, 2)
    s, e = offsets[..., 0], offsets[..., 1]
    return (s >= 0) & (s < c[:, 1:2]) & (e > c[:, 0:1])


def tokenize_pairs(
    pairs: Sequence[CounterfactualPair],
    tokenizer: PreTrainedTokenizerBase,
    fmt: TranscriptFormat,
    *,
    prepend_bos: bool = True,
) -> list[PairBatch]:
    """Tokenise pairs and group them by length (patching needs unpadded equal lengths).

    The metric reads each arm as the first tokens of its spellings after the action marker
    (:func:`kdgap.models.tokens.arm_token_ids`; one token for the organisms).
    ``prepend_bos`` follows the agent's rule: no BOS goes in front of a text that already
    starts with the BOS string (a chat template that writes it).

    Raises:
        ValueError: a pair's clean and corrupt texts tokenise to different lengths, an arm
            has no token, or the two arms share a token.
    """
    groups: dict[int, list] = {}
    for i, p in enumerate(pairs):
        bos = tokenizer.bos_token
        own_bos = bool(bos) and p.clean.startswith(bos) and p.corrupt.startswith(bos)
        tb = tokenize_batch(
            tokenizer, [p.clean, p.corrupt], prepend_bos=prepend_bos and not own_bos
        )
        n_clean, n_corrupt = tb.lengths.tolist()
        if n_clean != n_corrupt:
            raise ValueError(
                f"pairs[{i}] (kind={p.kind!r}): clean has {n_clean} tokens, corrupt "
                f"{n_corrupt}; position-wise patching needs equal lengths. Choose a new_arm "
                "whose name tokenises like the old one's, or an edit that keeps token counts."
            )
        ta, tb_ = arm_token_ids(tokenizer, fmt, [p.arm_names[p.arm_a], p.arm_names[p.arm_b]])
        if set(ta) & set(tb_):
            raise ValueError(
                f"pairs[{i}]: arms {p.arm_names[p.arm_a]!r} and {p.arm_names[p.arm_b]!r} "
                f"share the tokens {sorted(set(ta) & set(tb_))}; their difference cannot "
                "separate them."
            )
        groups.setdefault(n_clean, []).append((i, tb, ta, tb_, p))
    out = []
    for items in groups.values():
        idx = [x[0] for x in items]
        clean = torch.stack([x[1].tokens[0] for x in items])
        corrupt = torch.stack([x[1].tokens[1] for x in items])
        offs = torch.stack([x[1].offsets[0] for x in items])
        metric = LogitDiff.of([x[2] for x in items], [x[3] for x in items], -1, len(items))
        rat = span_mask(offs, [x[4].rationale_chars for x in items])
        hist = span_mask(offs, [x[4].history_chars for x in items])
        out.append(PairBatch(clean, corrupt, metric, rat, hist, idx))
    return out


def format_history(fmt: TranscriptFormat, arm_names: Sequence[str]) -> HistoryFn:
    """``record -> (actions, rewards)`` read back from the record's prompt by the format.

    The format reads it back (``parse_history(prompt, arm_names)`` of the
    :class:`~kdgap.envs.transcript_format.TranscriptFormat` protocol); the history
    cannot come from the step records themselves, since in off-policy play a record's
    reward is the one the policy's arm would have paid, not the executed arm's.

    Raises:
        ValueError: the format cannot parse a history; the message says what to pass.
    """
    parse = getattr(fmt, "parse_history", None)
    if parse is None:
        raise ValueError(
            f"format {getattr(fmt, 'name', fmt)!r} has no parse_history(prompt, arm_names), "
            "so the history behind a record cannot be read back from its prompt; pass "
            "history_fn= (record -> (actions, rewards))."
        )
    names = tuple(arm_names)
    return lambda record: parse(record.prompt, names)


def _equal_lengths(tokenizer: PreTrainedTokenizerBase, pair: CounterfactualPair) -> bool:
    clean, corrupt = tokenizer([pair.clean, pair.corrupt], add_special_tokens=False)["input_ids"]
    return len(clean) == len(corrupt)


@dataclass(frozen=True)
class RecordPair:
    """A pair built from a :class:`~kdgap.records.StepRecord`, with its episode (bootstrap unit)."""

    pair: CounterfactualPair
    episode: int
    step: int


def pairs_from_records(
    records: Sequence[StepRecord], fmt: TranscriptFormat, kind: str, *, n_pairs: int = 32,
    seed: int = 0, cfg: BanditConfig | None = None, history_fn: HistoryFn | None = None,
    text_fn: TextFn | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[RecordPair]:  # fmt: skip
    """Up to ``n_pairs`` pairs of ``kind`` whose metric arms start from the *clean action*.

    Arms of the metric (``arm_a`` - ``arm_b`` at the action position):

    - ``"conclusion"``: ``arm_a`` = the record's action, ``arm_b`` = the edited conclusion,
      drawn (seeded) among arms that are neither the clean conclusion nor the action.
    - ``"history"``: the history's greedy arm and an arm of strictly lower mean are
      swapped, rationale held; ``arm_a`` = the action, ``arm_b`` = the new greedy arm
      (drawn among arms with a lower mean that are not the action).

    Records without prompt/completion/parsable conclusion, or with no admissible arm,
    are skipped; so are edits whose clean and corrupt texts tokenise to different lengths
    when ``tokenizer`` is given (position-wise patching needs equal lengths: a
    sub-word tokenizer can spell an edited value or arm name in more tokens). The rest are
    sampled without replacement (seeded), spread over episodes.

    Args:
        records: :class:`~kdgap.records.StepRecord` list (``prompt``, ``completion``,
            ``action``, ``episode``, ``step``, ``n_arms`` are used).
        fmt: the TranscriptFormat the records were played with.
        kind: ``"conclusion"`` or ``"history"``.
        cfg: BanditConfig for rendering (default: ``BanditConfig(n_arms=records[0].n_arms)``).
        history_fn: ``record -> (actions, rewards)`` (default: :func:`format_history`,
            the format reads it back from the record's prompt).
        text_fn: as in :func:`make_pair`.
        tokenizer: when given, keep only pairs whose two texts have equal token counts.
    """
    if kind not in ("conclusion", "history"):
        raise ValueError(f"kind={kind!r}: pairs_from_records builds 'conclusion' or 'history'.")
    records = [r for r in records if r.prompt is not None and r.completion is not None]
    if not records:
        raise ValueError(
            "records carry no prompt/completion; play with a TextAgent (kdgap.policies.play.play)."
        )
    cfg = cfg or BanditConfig(n_arms=records[0].n_arms)
    names = tuple(cfg.arm_names)
    history_fn = history_fn or format_history(fmt, names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    out: list[RecordPair] = []
    for i in order:
        rec = records[int(i)]
        acts, rews = history_fn(rec)
        action = int(rec.action)
        rat_arm = fmt.parse_rationale(fmt.strip_action(rec.completion), names)
        if rat_arm is None:
            continue
        if kind == "conclusion":
            choices = [a for a in range(len(names)) if a not in (rat_arm, action)]
        else:
            if not acts:
                continue
            g = _greedy(acts, rews, len(names))
            choices = [a for a in _below(acts, rews, len(names), g) if a != action]
        if not choices:
            continue
        new = int(rng.choice(choices))
        try:  # e.g. another arm ties with the old greedy arm and would win after the swap
            pair = make_pair(kind, fmt, cfg, acts, rews, rec.completion, new, text_fn=text_fn)
        except ValueError:
            continue
        if tokenizer is not None and not _equal_lengths(tokenizer, pair):
            continue
        out.append(RecordPair(replace(pair, arm_a=action, arm_b=new), int(rec.episode), rec.step))
        if len(out) == n_pairs:
            break
    return out
