"""Sites: named token positions of a transcript, resolved per example from its text.

A :class:`~kdgap.envs.transcript_format.TranscriptFormat` returns *character* spans of named sites
(``format.site_spans(text) -> {"action": (start, end), "rationale.arm[red]": ...}``); this
module turns them into token positions of a left-padded batch via the tokenizer's
character offsets, so no format ever counts tokens.

**The site's token** (one rule, used everywhere): the token containing the span's last
character ``end - 1``; precisely, the *last token whose start offset is <= end - 1*. For an
ordinary span that is the token holding its last character; for an empty span ``[p, p)`` it
is the token holding character ``p - 1``, i.e. the token whose next-token prediction is the
text at ``p`` (how a format marks "the position that predicts the action"). When ``end - 1``
falls in a gap of the offsets (some tokenizers trim a leading space from a token's
offsets), the rule picks the token before the gap. Prepended BOS and padding cover no
character and are never a site.

**Missing sites** are never shifted to a neighbouring token: ``on_missing="raise"`` raises
:class:`MissingSites` listing the example ids per site; ``on_missing="skip"`` drops every
example that lacks any requested site and reports the dropped ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int

from kdgap.envs.transcript_format import SiteNotFound, TranscriptFormat
from kdgap.models.tokens import TokenBatch

ON_MISSING = ("raise", "skip")

# A site name is dotted words; an optional bracketed argument names an arm or an index.
_SITE_RE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)(?:\[([^\[\],]+)\])?$")


class MissingSites(SiteNotFound):
    """Some examples lack requested sites.

    Attributes:
        missing: ``{site: [example ids lacking it]}``.
    """

    def __init__(self, missing: dict[str, list], fmt_name: str = "?") -> None:
        self.missing = {k: list(v) for k, v in missing.items()}
        self.fmt_name = fmt_name
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [
            f"{site!r} in {len(ids)} example(s) {ids[:20]}{' ...' if len(ids) > 20 else ''}"
            for site, ids in self.missing.items()
        ]
        return (
            f"sites missing (format {self.fmt_name!r}): " + "; ".join(parts) + ". Sites are never "
            "shifted to another token: fix the transcripts or the site list, or pass "
            "on_missing='skip' to drop these examples (their ids are then reported)."
        )


@dataclass(frozen=True)
class SiteSpec:
    """A parsed site spec: ``name`` plus an optional bracketed ``arg``.

    ``rationale.arm[red]`` -> ``SiteSpec("rationale.arm", "red")``; :attr:`key` is the
    canonical string a format's ``site_spans`` uses as its dict key.
    """

    name: str
    arg: str | None = None

    @property
    def key(self) -> str:
        """``name`` or ``name[arg]``."""
        return self.name if self.arg is None else f"{self.name}[{self.arg}]"


def parse_site(spec: str) -> SiteSpec:
    """Parse one site spec (``"action"``, ``"rationale.conclusion"``, ``"rationale.arm[red]"``).

    Raises:
        ValueError: the spec is not ``name`` or ``name[arg]`` with a dotted identifier name.
    """
    m = _SITE_RE.match(str(spec).strip())
    if not m:
        raise ValueError(
            f"site {spec!r} is not a site spec; use a dotted name with an optional bracketed "
            "argument, e.g. 'action', 'rationale.conclusion', 'rationale.arm[red]'."
        )
    arg = m.group(2).strip() if m.group(2) is not None else None
    return SiteSpec(m.group(1), arg or None)


def parse_sites(specs: str | Sequence[str]) -> list[str]:
    """Canonical site keys from a list or a comma-separated string (brackets hold no commas).

    Returns:
        Keys in the given order without duplicates, e.g. ``["action", "rationale.arm[red]"]``.
    """
    items = [specs] if isinstance(specs, str) else list(specs)
    keys: list[str] = []
    for item in items:
        for part in re.split(r",(?![^\[]*\])", str(item)):
            if part.strip():
                key = parse_site(part).key
                if key not in keys:
                    keys.append(key)
    if not keys:
        raise ValueError(f"sites={specs!r} is empty; pass e.g. 'action,rationale.conclusion'.")
    return keys


def site_chars(
    fmt: TranscriptFormat, texts: Sequence[str], sites: Sequence[str]
) -> Int[torch.Tensor, "batch n_sites"]:
    """Character index of every site's last character (``end - 1``), -1 where missing.

    Args:
        fmt: a transcript format (its ``site_spans(text)`` is called once per text).
        texts: full texts, as tokenised.
        sites: canonical site keys (:func:`parse_sites`).

    Raises:
        ValueError: the format returned a span outside the text or with ``end < start``.
    """
    out = torch.full((len(texts), len(sites)), -1, dtype=torch.long)
    for i, text in enumerate(texts):
        spans = fmt.site_spans(text)
        for j, site in enumerate(sites):
            span = spans.get(site)
            if span is None:
                continue
            start, end = int(span[0]), int(span[1])
            if not (0 <= start <= end <= len(text)) or end == 0:
                raise ValueError(
                    f"format {getattr(fmt, 'name', fmt)!r} gave site {site!r} the span "
                    f"({start}, {end}) in a text of {len(text)} characters; spans must satisfy "
                    "0 <= start <= end <= len(text) and end > 0."
                )
            out[i, j] = end - 1
    return out


def chars_to_positions(
    chars: Int[torch.Tensor, "batch n_sites"], offsets: Int[torch.Tensor, "batch pos 2"]
) -> Int[torch.Tensor, "batch n_sites"]:
    """Token position of each character index by the module's rule; -1 where none.

    Position = the last token (of the padded batch) whose start offset is in
    ``0 .. char``; padding and BOS (offset -1) never match.
    """
    starts = offsets[..., 0]  # [batch pos]
    real = starts >= 0
    # ok[b, s, p]: token p starts at or before the site's character (and covers text).
    ok = real[:, None, :] & (starts[:, None, :] <= chars[:, :, None]) & (chars[:, :, None] >= 0)
    pos = torch.arange(starts.shape[1])
    last = torch.where(ok, pos, -1).amax(dim=-1)
    return last


@dataclass
class SitePositions:
    """Resolved sites of one batch.

    Attributes:
        positions: ``[batch n_sites]`` token index in the padded batch (-1 where missing).
        present: ``[batch n_sites]`` whether the site was found.
        keep: ``[batch]`` examples that have every site (all True under ``"raise"``).
        skipped: ids of the dropped examples (``on_missing="skip"``).
    """

    positions: Int[torch.Tensor, "batch n_sites"]
    present: Bool[torch.Tensor, "batch n_sites"]
    keep: Bool[torch.Tensor, " batch"]
    skipped: list


def resolve_sites(
    fmt: TranscriptFormat,
    texts: Sequence[str],
    batch: TokenBatch,
    sites: Sequence[str],
    *,
    ids: Sequence | None = None,
    on_missing: str = "raise",
) -> SitePositions:
    """Token positions of ``sites`` in every example of a tokenised batch.

    Args:
        fmt: the transcript format whose ``site_spans`` defines the sites.
        texts: the ``batch`` texts that ``batch`` was tokenised from (same order).
        batch: :func:`~kdgap.models.tokens.tokenize_batch` output (its offsets are used).
        sites: canonical site keys (:func:`parse_sites`).
        ids: example ids used in reports (default: 0..batch-1).
        on_missing: ``"raise"`` or ``"skip"`` (see the module docstring).

    Raises:
        MissingSites: a site is missing under ``on_missing="raise"``.
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing={on_missing!r} is unknown; use one of {ON_MISSING}.")
    ids = list(range(len(texts))) if ids is None else list(ids)
    if len(ids) != len(texts) or batch.tokens.shape[0] != len(texts):
        raise ValueError(
            f"texts ({len(texts)}), ids ({len(ids)}) and batch ({batch.tokens.shape[0]}) "
            "must have the same length."
        )
    positions = chars_to_positions(site_chars(fmt, texts, sites), batch.offsets)
    present = positions >= 0
    keep = present.all(dim=1)
    if not bool(keep.all()) and on_missing == "raise":
        missing = {
            s: [ids[i] for i in torch.nonzero(~present[:, j]).flatten().tolist()]
            for j, s in enumerate(sites)
            if not bool(present[:, j].all())
        }
        raise MissingSites(missing, getattr(fmt, "name", type(fmt).__name__))
    skipped = [ids[i] for i in torch.nonzero(~keep).flatten().tolist()]
    return SitePositions(positions=positions, present=present, keep=keep, skipped=skipped)
