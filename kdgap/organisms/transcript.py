"""`OrganismFormat`: the :class:`~kdgap.envs.transcript_format.TranscriptFormat` of the organisms.

The text agent, the recorder and patching use the organisms only through this class,
exactly as they use :class:`kdgap.agent.prompts.PaperFormat` for a real LLM. The layout is
documented in :mod:`kdgap.organisms.language`::

    <history words> think <arm> <pulls> <wins> ... ucb <conclusion> act <action>

Sites (character spans of the full text = prompt + completion):

- ``history.last``: the last history word (absent at step 0);
- ``prompt.end``: the ``think`` word, the last prompt token;
- ``rationale.arm[<name>]``: ``<name> <pulls> <wins>`` of one arm in the rationale;
- ``rationale.conclusion``: the arm after ``ucb``;
- ``action``: the last ``act`` word, the position whose next-token prediction is the
  action (PaperFormat's equivalent is the ``=`` of ``ACTION=``); present as soon as ``act``
  is written, with or without the arm after it.

Also ``history`` and ``rationale`` for the whole stretches. Parsing works on
whitespace-separated words, so any amount of whitespace between words is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums, first_arm, ucb_arms
from kdgap.envs.transcript_format import SiteNotFound
from kdgap.organisms.language import ACT, THINK, UCB, OrganismLanguage

_WORD = re.compile(r"\S+")


class ConclusionNotFound(SiteNotFound, ValueError):
    """A completion has no ``ucb <arm>`` conclusion to edit.

    Both a :class:`SiteNotFound` (the site is missing) and a ``ValueError`` (what the text
    agent's counterfactual step catches to skip a step).
    """


def _words(text: str) -> list[tuple[str, int, int]]:
    """``text`` -> ``[(word, start, end), ...]`` (character offsets)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _last_index(words: list[tuple[str, int, int]], word: str, stop: int | None = None) -> int:
    """Index of the last ``word`` in ``words[:stop]``, or -1."""
    end = len(words) if stop is None else stop
    for i in range(end - 1, -1, -1):
        if words[i][0] == word:
            return i
    return -1


class OrganismFormat:
    """Word-level transcript format of kdgap's model organisms (Bernoulli, colour buttons).

    Attributes:
        name: ``"organism"``.
        action_marker: ``"act"``; the arm word follows after a space.
        use_chat_template: False (the organisms have no chat template).
    """

    name = "organism"
    action_marker = ACT
    use_chat_template = False

    # ------------------------------------------------------------------ rendering
    def render_prompt(
        self, cfg: BanditConfig, actions: Sequence[int], rewards: Sequence[float]
    ) -> str:
        """History words then ``think `` (trailing space), e.g. ``"red1 blue0 think "``.

        Args:
            cfg: the bandit family; must be Bernoulli with colour-button arms.
            actions, rewards: the episode's history so far, length ``t``.
        """
        if cfg.reward != "bernoulli":
            raise ValueError(
                f"cfg.reward={cfg.reward!r}: the organisms read Bernoulli histories only; "
                "use BanditConfig(reward='bernoulli')."
            )
        if cfg.arm_style != "buttons":
            raise ValueError(
                f"cfg.arm_style={cfg.arm_style!r}: the organisms name arms by colour; "
                "use BanditConfig(arm_style='buttons')."
            )
        return OrganismLanguage(n_arms=cfg.n_arms, horizon=max(cfg.horizon, 1)).prompt_text(
            actions, rewards
        )

    def write_rationale(
        self, cfg: BanditConfig, actions: Sequence[int], rewards: Sequence[float]
    ) -> str:
        """The correct rationale for a history, as a perfect organism writes it: per arm
        ``<name> <pulls> <wins>``, then ``ucb <arm>`` with the UCB arm of ``cfg``'s rule
        (lowest index on ties), and a trailing space before the action marker."""
        self.render_prompt(cfg, actions, rewards)  # the same checks of cfg and history
        counts, sums = counts_and_sums(actions, rewards, cfg.n_arms)
        best = int(first_arm(ucb_arms(counts, sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)))
        lang = OrganismLanguage(n_arms=cfg.n_arms, horizon=max(cfg.horizon, 1))
        return lang.rationale_text(counts, sums.round().astype(int), best) + " "

    # ------------------------------------------------------------------ parsing
    def parse_action(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Arm after the last ``act`` word, or None when it is missing or not an arm."""
        words = _words(completion)
        i = _last_index(words, ACT)
        if i < 0 or i + 1 >= len(words):
            return None
        name = words[i + 1][0]
        return list(arm_names).index(name) if name in arm_names else None

    def parse_rationale(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Arm after the last ``ucb`` before the last ``act`` (or in the whole text), or None."""
        words = _words(completion)
        j = _last_index(words, ACT)
        i = _last_index(words, UCB, stop=j if j >= 0 else None)
        if i < 0 or i + 1 >= len(words):
            return None
        name = words[i + 1][0]
        return list(arm_names).index(name) if name in arm_names else None

    def parse_history(self, prompt: str, arm_names: Sequence[str]) -> tuple[list[int], list[float]]:
        """The history a prompt shows: ``"red1 green0 think "`` -> ``([0, 1], [1.0, 0.0])``.

        The inverse of :meth:`render_prompt`; words after ``think`` are ignored.

        Raises:
            ValueError: a history word is not ``<arm name><0|1>``.
        """
        actions, rewards = [], []
        for word, _, _ in _words(prompt):
            if word == THINK:
                break
            name, r = word[:-1], word[-1:]
            if name not in arm_names or r not in ("0", "1"):
                raise ValueError(
                    f"prompt word {word!r} is not '<arm><0|1>' with an arm from "
                    f"{tuple(arm_names)}: not an organism prompt."
                )
            actions.append(list(arm_names).index(name))
            rewards.append(float(r))
        return actions, rewards

    def strip_action(self, completion: str) -> str:
        """Completion cut just before its last ``act`` word, ending in whitespace.

        The trailing space keeps ``rationale + action_marker`` two separate words.
        Without an ``act`` word the whole completion is the rationale.
        """
        words = _words(completion)
        j = _last_index(words, ACT)
        head = completion if j < 0 else completion[: words[j][1]]
        if head and not head[-1].isspace():
            head += " "
        return head

    def arm_continuations(self, arm_name: str) -> list[str]:
        """``[" " + arm_name]``: one word after the marker (the space separates the words)."""
        return [f" {arm_name}"]

    def edit_conclusion(self, completion: str, new_arm: int, arm_names: Sequence[str]) -> str:
        """The completion with the arm after the rationale's last ``ucb`` replaced.

        Everything else (counts, the ``act`` part if present) is kept character for
        character.

        Raises:
            ConclusionNotFound: the completion has no ``ucb <word>`` conclusion.
            ValueError: ``new_arm`` is not an arm index.
        """
        if not 0 <= int(new_arm) < len(arm_names):
            raise ValueError(f"new_arm={new_arm!r} must be an arm index 0..{len(arm_names) - 1}.")
        words = _words(completion)
        j = _last_index(words, ACT)
        i = _last_index(words, UCB, stop=j if j >= 0 else None)
        if i < 0 or i + 1 >= len(words) or (j >= 0 and i + 1 >= j):
            raise ConclusionNotFound(
                f"completion={completion!r} has no 'ucb <arm>' conclusion to edit; the "
                "organism stopped early or the text is not an organism transcript."
            )
        _, s, e = words[i + 1]
        return completion[:s] + arm_names[int(new_arm)] + completion[e:]

    # ------------------------------------------------------------------ sites
    def site_spans(self, text: str) -> dict[str, tuple[int, int]]:
        """Character spans ``[start, end)`` of every site found in ``text`` (prompt + completion).

        Sites that do not occur (``history.last`` at step 0, ``action`` before the ``act``
        word is written, ...) are simply absent. ``action`` is the ``act`` word itself (its
        next-token prediction is the arm), not the arm written after it.
        """
        words = _words(text)
        spans: dict[str, tuple[int, int]] = {}
        k = next((i for i, w in enumerate(words) if w[0] == THINK), -1)
        if k < 0:
            return spans
        spans["prompt.end"] = (words[k][1], words[k][2])
        if k > 0:
            spans["history"] = (words[0][1], words[k - 1][2])
            spans["history.last"] = (words[k - 1][1], words[k - 1][2])
        j = _last_index(words, ACT)
        stop = j if j > k else len(words)
        u = _last_index(words, UCB, stop=stop)
        if u > k and u + 1 < stop:
            spans["rationale.conclusion"] = (words[u + 1][1], words[u + 1][2])
            spans["rationale"] = (words[k + 1][1], words[u + 1][2])
        # Per-arm triples: a word that names an arm, inside the rationale, before `ucb`.
        arm_end = u if u > k else stop
        i = k + 1
        while i < arm_end:
            w = words[i][0]
            if w.isalpha():
                last = min(i + 2, arm_end - 1)
                spans.setdefault(f"rationale.arm[{w}]", (words[i][1], words[last][2]))
                i += 3
            else:
                i += 1
        if j > k:
            spans["action"] = (words[j][1], words[j][2])
        return spans
