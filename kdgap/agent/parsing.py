"""Pure text parsers for the paper's transcripts: the action line and the UCB rationale.

Rules (Schmied et al. 2025; the definitions are in docs/science.md):

- **Action.** The *last* ``ACTION=X`` match in a completion wins. The marker itself is
  upper case (the history lines of the prompt say ``Action=green``, and a model that echoes
  them must not be read as acting); ``X`` is matched case-insensitively against the arm
  names, after optional whitespace, markdown and quotes (``ACTION= **Red**.``). When the
  last match names no arm (``ACTION=X``, ``ACTION=purple`` with 5 arms) the step has no
  valid action: the earlier matches are *not* consulted, because the model's final word
  is what the paper executes.
- **Rationale.** The knowing-doing prompt asks for the UCB value of every arm inside
  ``<ucb_values>`` tags. Entries are split on newlines, commas and semicolons and read as
  ``<arm> <sep> <value>`` (``red: 0.71``, ``red = 0.71``, ``UCB(red) = 0.5 + ... = 1.04``,
  ``- **Red**: inf``); the value is the first number after the *last* ``:`` or ``=`` of
  the entry, so a written-out computation yields its result. The rationale's arm is the
  highest value, ties to the lowest arm index (the tie rule of :mod:`kdgap.envs.stats`).
  The last block with at least one entry is used; an unclosed block runs to the end of
  the text (forced choice cuts generation at the action marker).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

ACTION_MARKER = "ACTION="

# Upper-case marker, optional spaces around "=", then decoration before the arm word.
_MARKER_RE = re.compile(r"ACTION[ \t]*=")
_ACTION_RE = re.compile(r"ACTION[ \t]*=\s*[*_\"'`\[(<{]*(?P<arm>[A-Za-z0-9_]+)")
_OPEN_TAG, _CLOSE_TAG = "<ucb_values>", "</ucb_values>"
_SEGMENT_RE = re.compile(r"[^\n,;]+")
_ENTRY_RE = re.compile(
    r"^[\s\-*•>#`\"'_]*(?P<enum>\d+[.)]\s+)?(?:UCB\s*[(\[]\s*)?[*_`\"']*"
    r"(?P<arm>[A-Za-z0-9_]+)(?![A-Za-z0-9_.])[*_`\"']*\s*[)\]]?",
    re.IGNORECASE,
)
_VALUE_RE = re.compile(
    r"[-+]?(?:inf(?:inity)?|∞)|[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", re.IGNORECASE
)


@dataclass(frozen=True)
class UcbEntry:
    """One ``<arm>: <value>`` entry of a ``<ucb_values>`` block.

    Attributes:
        arm: arm index.
        value: the number written (``inf`` for "inf", "infinity", "∞").
        name_span: ``[start, end)`` characters of the arm name in the parsed text.
        value_span: ``[start, end)`` characters of the value string.
    """

    arm: int
    value: float
    name_span: tuple[int, int]
    value_span: tuple[int, int]

    @property
    def span(self) -> tuple[int, int]:
        """The whole entry, arm name to value end."""
        return (self.name_span[0], self.value_span[1])


def _arm_lookup(arm_names: Sequence[str]) -> dict[str, int]:
    if len(arm_names) == 0:
        raise ValueError("arm_names=[] is empty; pass the bandit's arm names (cfg.arm_names).")
    lookup = {str(n).lower(): i for i, n in enumerate(arm_names)}
    if len(lookup) != len(arm_names):
        raise ValueError(f"arm_names={list(arm_names)!r} repeat a name (case-insensitive).")
    return lookup


def action_marker_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of every action marker (``ACTION=``, spaces allowed around ``=``)."""
    return [m.span() for m in _MARKER_RE.finditer(text)]


def parse_action(completion: str, arm_names: Sequence[str]) -> int | None:
    """Arm index of the last ``ACTION=X`` in ``completion``; None if it names no arm.

    Args:
        completion: the model's generated text (may be empty).
        arm_names: ``[arms]`` display names; index ``i`` names arm ``i``.

    Returns:
        The arm index, or None when there is no marker, the last marker is followed by no
        word, or that word is not an arm name.
    """
    lookup = _arm_lookup(arm_names)
    markers = list(_MARKER_RE.finditer(completion or ""))
    if not markers:
        return None
    m = _ACTION_RE.match(completion, markers[-1].start())
    if m is None:
        return None
    return lookup.get(m.group("arm").lower())


def strip_action(completion: str) -> str:
    """``completion`` cut just before its last action marker (unchanged if it has none)."""
    spans = action_marker_spans(completion)
    return completion if not spans else completion[: spans[-1][0]]


def _blocks(text: str) -> list[tuple[int, int]]:
    """Content spans of every ``<ucb_values>`` block, in order (unclosed runs to the end)."""
    out, pos = [], 0
    while (start := text.find(_OPEN_TAG, pos)) >= 0:
        content = start + len(_OPEN_TAG)
        end = text.find(_CLOSE_TAG, content)
        nxt = text.find(_OPEN_TAG, content)
        if end < 0 or (0 <= nxt < end):
            end = nxt if nxt >= 0 else len(text)
        out.append((content, end))
        pos = content
    return out


def _parse_segment(text: str, start: int, end: int, lookup: dict[str, int]) -> UcbEntry | None:
    seg = text[start:end]
    m = _ENTRY_RE.match(seg)
    if m is None:
        return None
    arm, name_span = lookup.get(m.group("arm").lower()), m.span("arm")
    if arm is None and m.group("enum"):
        # "1. red: 0.7": the number was an enumeration, not an arm; read what follows.
        m2 = _ENTRY_RE.match(seg, m.end("enum"))
        if m2 is not None and m2.group("enum") is None:
            m, arm, name_span = m2, lookup.get(m2.group("arm").lower()), m2.span("arm")
    if arm is None:
        return None
    rest_start = m.end()
    seps = [i for i in range(rest_start, len(seg)) if seg[i] in ":="]
    val_from = seps[-1] + 1 if seps else rest_start
    v = _VALUE_RE.search(seg, val_from)
    if v is None:
        return None
    raw = v.group(0).lower().replace("∞", "inf")
    value = math.inf if "inf" in raw else float(raw)
    if raw.startswith("-") and "inf" in raw:
        value = -math.inf
    return UcbEntry(
        arm=arm,
        value=value,
        name_span=(start + name_span[0], start + name_span[1]),
        value_span=(start + v.start(), start + v.end()),
    )


def parse_ucb_values(text: str, arm_names: Sequence[str]) -> list[UcbEntry]:
    """Entries of the last ``<ucb_values>`` block that has any (empty list if none).

    Args:
        text: a completion (or a full transcript; spans are offsets into ``text``).
        arm_names: ``[arms]`` display names.

    Returns:
        One :class:`UcbEntry` per arm written, in text order; an arm written twice keeps
        its last entry.
    """
    lookup = _arm_lookup(arm_names)
    for b_start, b_end in reversed(_blocks(text or "")):
        entries: dict[int, UcbEntry] = {}
        for seg in _SEGMENT_RE.finditer(text, b_start, b_end):
            e = _parse_segment(text, seg.start(), seg.end(), lookup)
            if e is not None:
                entries.pop(e.arm, None)
                entries[e.arm] = e
        if entries:
            return sorted(entries.values(), key=lambda e: e.name_span[0])
    return []


def top_entry(entries: Sequence[UcbEntry]) -> UcbEntry | None:
    """The highest-value entry, ties to the lowest arm index; None for no entries."""
    if not entries:
        return None
    return max(entries, key=lambda e: (e.value, -e.arm))


def parse_rationale(completion: str, arm_names: Sequence[str]) -> int | None:
    """The arm a ``<ucb_values>`` rationale concludes with (its top value), or None.

    Args:
        completion: the model's text.
        arm_names: ``[arms]`` display names.

    Returns:
        Arm index of the highest written UCB value (ties: lowest index), or None when no
        block with a parsable entry exists.
    """
    top = top_entry(parse_ucb_values(completion, arm_names))
    return None if top is None else top.arm
