"""Synthetic paper-style transcripts and a regex format for them (tests, docs, benchmarks).

The texts follow the layout of Schmied et al. 2025's bandit prompt (history lines, a
``<ucb_values>`` rationale, ``ACTION=X``) with random contents, so they exercise site
resolution with any tokenizer without needing a real agent run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kdgap.hooks.sites import parse_site

DEMO_ARMS = ("red", "green", "blue", "yellow", "orange")


def demo_format() -> RegexFormat:
    """The :class:`~kdgap.testing.texts.RegexFormat` of :func:`demo_texts`.

    Sites: ``action`` (the final ``ACTION=``: its ``=`` predicts the arm),
    ``rationale.conclusion`` (the arm after ``best:``), ``rationale.arm[<arm>]`` (the
    ``<arm>: <value>`` entry), ``history.last`` (the last history line), ``prompt.end``
    (the instruction line's final ``.``).
    """
    return RegexFormat(
        "demo",
        {
            "action": r"ACTION=(?=\w+\s*$)",
            "rationale.conclusion": r"best: (?P<site>\w+)",
            "rationale.arm[{arm}]": r"<ucb_values>.*(?P<site>{arm}: [\d.]+)",
            "history.last": r"(?P<site>Step=\d+ Action=\w+ Reward=[\d.]+)\n",
            "prompt.end": r"buttons\.(?P<site>\n)",
        },
        arm_names=DEMO_ARMS,
    )


def demo_text(rng: np.random.Generator, n_steps: int, *, arms_in_rationale: int = 5) -> str:
    """One transcript with ``n_steps`` history lines and a rationale naming the first
    ``arms_in_rationale`` arms (fewer than 5 leaves later ``rationale.arm[...]`` missing)."""
    names = DEMO_ARMS
    lines = [f"You are in a room with {len(names)} buttons labeled {', '.join(names)}."]
    for t in range(n_steps):
        lines.append(f"Step={t} Action={names[rng.integers(len(names))]} Reward={rng.random():.1f}")
    lines.append("Think briefly, then end with ACTION=X where X is one of the buttons.")
    vals = ", ".join(f"{a}: {rng.random():.2f}" for a in names[:arms_in_rationale])
    best, act = names[rng.integers(len(names))], names[rng.integers(len(names))]
    lines.append(f"<ucb_values> {vals} </ucb_values> best: {best} ACTION={act}")
    return "\n".join(lines)


def demo_texts(n: int, *, seed: int = 0, min_steps: int = 0, max_steps: int = 6) -> list[str]:
    """``n`` transcripts with ``min_steps..max_steps`` history lines (unequal lengths)."""
    rng = np.random.default_rng(seed)
    return [demo_text(rng, int(rng.integers(min_steps, max_steps + 1))) for _ in range(n)]


class RegexFormat:
    """A minimal site-only transcript format: each site is the *last* match of a regex.

    Useful for ad-hoc transcripts, tests and benchmarks; the real formats are
    :class:`kdgap.agent.prompts.PaperFormat` and :class:`kdgap.organisms.transcript.OrganismFormat`.
    Only ``site_spans`` (what recording needs) is implemented.

    Args:
        name: format name stored in manifests.
        patterns: ``{site_key: regex}``. The span is the named group ``site`` when the regex
            has one, else the whole match. A key containing ``{arm}`` (``"rationale.arm[{arm}]"``)
            is expanded over ``arm_names``, with ``{arm}`` in the regex replaced by the
            escaped arm name.
        arm_names: arm names for ``{arm}`` keys.

    Example:
        ``RegexFormat("demo", {"action": r"ACTION=", "rationale.arm[{arm}]": r"{arm}:"},
        arm_names=["red", "blue"])``
    """

    action_marker = "ACTION="
    use_chat_template = False

    def __init__(self, name: str, patterns: dict[str, str], arm_names: Sequence[str] = ()):
        self.name = name
        self._compiled: dict[str, re.Pattern] = {}
        for key, pat in patterns.items():
            keys = [(key, pat)]
            if "{arm}" in key:
                keys = [(key.replace("{arm}", a), pat.replace("{arm}", re.escape(a)))
                        for a in arm_names]  # fmt: skip
            for k, p in keys:
                self._compiled[parse_site(k).key] = re.compile(p, re.DOTALL)

    def site_spans(self, text: str) -> dict[str, tuple[int, int]]:
        """``{site: (start, end)}`` of the last match of each site's regex in ``text``."""
        out = {}
        for key, rx in self._compiled.items():
            last = None
            for m in rx.finditer(text):
                last = m
            if last is not None:
                g = "site" if "site" in rx.groupindex else 0
                out[key] = (last.start(g), last.end(g))
        return out
