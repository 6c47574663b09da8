"""The paper's bandit prompt (Schmied et al. 2025) as a :class:`TranscriptFormat`.

The prompt follows BanditBench's button task as used in "LLMs are Greedy Agents": a
system description (buttons, reward distribution, horizon, goal), the history one line per
step (``Step=0 Action=green Reward=0.3``) and a chain-of-thought instruction ending in
``ACTION=X``. ``knowing_doing=True`` adds the knowing-doing instruction: write down the UCB
rule (the exact rule of the bandit config, ``cfg.ucb_c`` / ``cfg.ucb_bonus``, so the
rationale is judged against the rule it was given), compute every arm's value inside
``<ucb_values>`` tags, then act.

Sites (character spans of prompt + completion, see :mod:`kdgap.envs.transcript_format`):

- ``prompt.end``: the last character of the rendered prompt (before any chat-template
  text that follows the user message).
- ``history.last``: the last history line (absent at step 0).
- ``action``: the last character of the last action marker *after the prompt*, i.e. the
  position whose next-token prediction is the action (the prompt's own instruction
  mentions ``ACTION=X`` and is never taken for it).
- ``rationale.arm[<name>]``: each entry ``<name>: <value>`` of the completion's
  ``<ucb_values>`` block (arm name start to value end); ``rationale.conclusion``: the
  entry of the top arm (the arm :func:`parse_rationale` returns).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace

from kdgap.agent import parsing
from kdgap.envs.bandit import BanditConfig
from kdgap.envs.stats import counts_and_sums, first_arm, ucb_arms, ucb_values
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.models.loading import LoadedModel
from kdgap.organisms.transcript import OrganismFormat

_FINAL_RE = re.compile(r"End your answer with ACTION=X, where X is one of: (?P<arms>[^\n]*)\.")
_HISTORY_RE = re.compile(
    r"^Step=(?P<step>\d+) Action=(?P<arm>\S+) Reward=(?P<reward>\S+)$", re.MULTILINE
)
#: Who writes the rationale: the model itself, or kdgap (the correct UCB rationale).
RATIONALES = ("model", "scripted")
_BONUS_TEXT = {
    "sqrt_log_t_over_n": "sqrt(log(t) / N(a))",
    "ucb1": "sqrt(2 * log(t) / N(a))",
}


def _shift(e: parsing.UcbEntry, k: int) -> parsing.UcbEntry:
    return replace(
        e,
        name_span=(e.name_span[0] + k, e.name_span[1] + k),
        value_span=(e.value_span[0] + k, e.value_span[1] + k),
    )


def format_reward(r: float) -> str:
    """A reward as the history shows it: ``1``, ``0``, ``0.3``, ``-1.25`` (2 decimals max)."""
    s = f"{float(r):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


class PaperFormat:
    """The LLM prompt of Schmied et al. (2025); implements :class:`TranscriptFormat`.

    Args:
        knowing_doing: add the UCB instruction and the ``<ucb_values>`` rationale.
        use_chat_template: wrap the prompt as a user message with the tokenizer's chat
            template (the agent applies it). ``True`` requires a template (the agent raises
            ``ValueError`` when the tokenizer has none), ``False`` never applies one, and
            ``None`` (default) applies it when the tokenizer has one.
    """

    action_marker = parsing.ACTION_MARKER

    def __init__(
        self, *, knowing_doing: bool = False, use_chat_template: bool | None = None
    ) -> None:
        self.knowing_doing = bool(knowing_doing)
        self.use_chat_template = None if use_chat_template is None else bool(use_chat_template)
        self.name = "paper-ucb" if self.knowing_doing else "paper"

    def __repr__(self) -> str:
        return f"PaperFormat(knowing_doing={self.knowing_doing})"

    # ------------------------------------------------------------------ rendering
    def render_prompt(
        self, cfg: BanditConfig, actions: Sequence[int], rewards: Sequence[float]
    ) -> str:
        """The prompt for one episode's history ``actions[t], rewards[t]`` (no template).

        Args:
            cfg: the bandit family (arm names, reward kind, horizon, UCB rule).
            actions: ``[t]`` arms pulled so far.
            rewards: ``[t]`` rewards received.
        """
        if len(actions) != len(rewards):
            raise ValueError(
                f"actions has {len(actions)} steps but rewards has {len(rewards)}; "
                "pass the same episode's history for both."
            )
        names = cfg.arm_names
        if any(not 0 <= int(a) < len(names) for a in actions):
            raise ValueError(f"actions={list(actions)!r} contain arms outside 0..{len(names) - 1}.")
        listing = ", ".join(names)
        if cfg.reward == "bernoulli":
            dist = "a Bernoulli distribution (reward 0 or 1) with a fixed but unknown mean"
        else:
            dist = (
                "a Gaussian distribution with a fixed but unknown mean and standard "
                f"deviation {cfg.sigma:g}"
            )
        lines = [
            f"You are in a room with {cfg.n_arms} buttons labeled {listing}. Each button is "
            f"associated with {dist}; the means of the buttons can differ. When you press a "
            "button, you receive a reward sampled from its distribution. You have "
            f"{cfg.horizon} time steps and at each time step you can press any one button. "
            f"Your goal is to maximize the total reward over the {cfg.horizon} time steps.",
            "",
        ]
        t = len(actions)
        if t == 0:
            lines.append("You have not pressed any button yet.")
        else:
            lines.append(f"So far you have pressed {t} buttons with the following rewards:")
            lines += [
                f"Step={i} Action={names[int(a)]} Reward={format_reward(r)}"
                for i, (a, r) in enumerate(zip(actions, rewards))
            ]
        lines.append("")
        if self.knowing_doing:
            scale = _BONUS_TEXT[cfg.ucb_bonus]
            lines.append(
                "First write down the UCB rule: UCB(a) = mean(a) + c * "
                f"{scale}, where mean(a) is the average reward of button a, N(a) is how "
                "often it was pressed, t is the total number of presses and c = "
                f"{cfg.ucb_c:g}; a button never pressed has UCB(a) = inf. Then compute the "
                "UCB value of every button and write them inside <ucb_values></ucb_values> "
                "tags, one per line as 'button: value'. Then press the button with the "
                "highest UCB value."
            )
        else:
            lines.append("Think step by step, briefly, about which button to press next.")
        lines.append(f"End your answer with ACTION=X, where X is one of: {listing}.")
        return "\n".join(lines)

    def write_rationale(
        self, cfg: BanditConfig, actions: Sequence[int], rewards: Sequence[float]
    ) -> str:
        """The correct rationale for a history, as the model's turn would hold it.

        The ``<ucb_values>`` block the knowing-doing prompt asks for, one ``button: value``
        line per arm (UCB of ``cfg``'s rule, ``inf`` for an untried arm), with two decimals,
        or more where two decimals would make another arm the written conclusion: its
        conclusion (:meth:`parse_rationale`, the highest value, ties to the lowest arm) is
        always the UCB arm of :func:`kdgap.envs.stats.ucb_arms` (lowest index on ties).
        Scripted-rationale play writes this in place of the model's own rationale and lets
        the model only act.

        Raises:
            ValueError: the format was made without ``knowing_doing`` (its prompt asks
                for no ``<ucb_values>``), or the history does not fit ``cfg``.
        """
        if not self.knowing_doing:
            raise ValueError(
                "a scripted rationale is the <ucb_values> block of the knowing-doing prompt; "
                "use PaperFormat(knowing_doing=True)."
            )
        if len(actions) != len(rewards):
            raise ValueError(
                f"actions has {len(actions)} steps but rewards has {len(rewards)}; "
                "pass the same episode's history for both."
            )
        counts, sums = counts_and_sums(actions, rewards, cfg.n_arms)
        values = ucb_values(counts, sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)
        best = int(first_arm(ucb_arms(counts, sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)))
        for digits in (2, 4, 8, 17):
            lines = [
                f"{name}: {'inf' if math.isinf(v) else f'{v:.{digits}f}'}"
                for name, v in zip(cfg.arm_names, values)
            ]
            text = "<ucb_values>\n" + "\n".join(lines) + "\n</ucb_values>\n"
            if self.parse_rationale(text, cfg.arm_names) == best:
                break
        return text

    # ------------------------------------------------------------------ parsing
    def parse_history(self, prompt: str, arm_names: Sequence[str]) -> tuple[list[int], list[float]]:
        """The history of a rendered prompt: its ``Step=i Action=X Reward=r`` lines.

        Rewards come back as the prompt shows them (two decimals at most, see
        :func:`format_reward`), so re-rendering the parsed history gives the same text.

        Raises:
            ValueError: the prompt is not this format's (no final instruction), a step
                names an arm outside ``arm_names``, or the steps are not ``0, 1, 2, ...``.
        """
        final = _FINAL_RE.search(prompt)
        if final is None:
            raise ValueError(
                "prompt has no 'End your answer with ACTION=X' line: not a paper-format "
                f"prompt ({prompt[:60]!r}...); pass the format the records were played with."
            )
        names = list(arm_names)
        actions: list[int] = []
        rewards: list[float] = []
        for i, m in enumerate(_HISTORY_RE.finditer(prompt, 0, final.start())):
            if int(m["step"]) != i or m["arm"] not in names:
                raise ValueError(
                    f"history line {m[0]!r} is not step {i} with an arm from {tuple(names)}; "
                    "pass the arm names the records were played with."
                )
            actions.append(names.index(m["arm"]))
            rewards.append(float(m["reward"]))
        return actions, rewards

    def parse_action(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Last ``ACTION=X`` wins (see :func:`kdgap.agent.parsing.parse_action`)."""
        return parsing.parse_action(completion, arm_names)

    def parse_rationale(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Top arm of the ``<ucb_values>`` block, or None (any prompt variant)."""
        return parsing.parse_rationale(completion, arm_names)

    def strip_action(self, completion: str) -> str:
        """``completion`` cut just before its last action marker."""
        return parsing.strip_action(completion)

    def arm_continuations(self, arm_name: str) -> list[str]:
        """``["red", " red", "Red", " Red"]`` (duplicates removed, e.g. for number arms)."""
        name = str(arm_name)
        out: list[str] = []
        for v in (name, " " + name, name.capitalize(), " " + name.capitalize()):
            if v not in out:
                out.append(v)
        return out

    def edit_conclusion(self, completion: str, new_arm: int, arm_names: Sequence[str]) -> str:
        """Rewrite the ``<ucb_values>`` entries so ``new_arm`` is the rationale's top arm.

        The value strings of the old top arm and ``new_arm`` are swapped; any other arm
        that would still tie with the top value gets ``new_arm``'s old value (or, when
        ``new_arm`` itself tied at the top, the best value below the top). Whole-word
        mentions of the old top arm *after* the block (a closing "so I press red") are
        replaced by the new arm's name, capitalisation kept. Everything else is unchanged.

        Raises:
            ValueError: no parsable block, ``new_arm`` out of range or absent from the
                block, or every value ties so no arm can be made the unique top.
        """
        if not 0 <= int(new_arm) < len(arm_names):
            raise ValueError(f"new_arm={new_arm!r} is not an arm index 0..{len(arm_names) - 1}.")
        entries = parsing.parse_ucb_values(completion, arm_names)
        if not entries:
            raise ValueError(
                "completion has no parsable <ucb_values> block; edit_conclusion needs one "
                "(use PaperFormat(knowing_doing=True) prompts)."
            )
        top = parsing.top_entry(entries)
        by_arm = {e.arm: e for e in entries}
        if new_arm not in by_arm:
            raise ValueError(
                f"new_arm={new_arm} ({arm_names[new_arm]!r}) has no entry in <ucb_values>; "
                f"pick one of {[arm_names[a] for a in by_arm]}."
            )
        if new_arm == top.arm:
            return completion

        def vtext(e: parsing.UcbEntry) -> str:
            return completion[e.value_span[0] : e.value_span[1]]

        new_e = by_arm[new_arm]
        donor = new_e
        if new_e.value >= top.value:
            below = [e for e in entries if e.value < top.value]
            if not below:
                raise ValueError(
                    "every <ucb_values> entry ties at the top value; no edit can make "
                    f"arm {arm_names[new_arm]!r} the unique conclusion."
                )
            donor = max(below, key=lambda e: e.value)
        repl = {new_e.value_span: vtext(top), top.value_span: vtext(donor)}
        for e in entries:
            if e.arm not in (new_arm, top.arm) and e.value >= top.value:
                repl[e.value_span] = vtext(donor)
        block_end = max(e.span[1] for e in entries)
        close = completion.find("</ucb_values>", block_end)
        tail_from = len(completion) if close < 0 else close
        old, new = arm_names[top.arm], arm_names[new_arm]
        for m in re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])",
                             completion[tail_from:], flags=re.IGNORECASE):  # fmt: skip
            word = m.group(0)
            cased = new.capitalize() if word[:1].isupper() and word[1:2].islower() else new
            cased = new.upper() if word.isupper() and len(word) > 1 else cased
            repl[(tail_from + m.start(), tail_from + m.end())] = cased
        out = completion
        for (s, e), text in sorted(repl.items(), reverse=True):
            out = out[:s] + text + out[e:]
        return out

    # ------------------------------------------------------------------ sites
    def site_spans(self, text: str) -> dict[str, tuple[int, int]]:
        """Character spans of ``prompt.end``, ``history.last``, ``action`` and the
        ``rationale.*`` sites found in ``text`` (templated prompt + completion).

        Without the prompt's final instruction line the whole text is read as a
        completion (no ``prompt.end`` / ``history.last``).
        """
        spans: dict[str, tuple[int, int]] = {}
        final = _FINAL_RE.search(text)
        comp_start = 0
        arm_names: list[str] | None = None
        if final is not None:
            comp_start = final.end()
            spans["prompt.end"] = (comp_start - 1, comp_start)
            arm_names = [a.strip() for a in final.group("arms").split(",")]
            hist = list(_HISTORY_RE.finditer(text, 0, final.start()))
            if hist:
                spans["history.last"] = hist[-1].span()
        markers = [s for s in parsing.action_marker_spans(text) if s[0] >= comp_start]
        if markers:
            spans["action"] = (markers[-1][1] - 1, markers[-1][1])
        if arm_names:
            region_end = markers[-1][0] if markers else len(text)
            # Parse the completion alone: the prompt's instruction mentions the tags too.
            entries = [
                _shift(e, comp_start)
                for e in parsing.parse_ucb_values(text[comp_start:region_end], arm_names)
            ]
            for e in entries:
                spans[f"rationale.arm[{arm_names[e.arm]}]"] = e.span
            top = parsing.top_entry(entries)
            if top is not None:
                spans["rationale.conclusion"] = top.span
        return spans


def format_for(loaded: LoadedModel, *, knowing_doing: bool = True) -> TranscriptFormat:
    """The transcript format a loaded model speaks (one rule for every command).

    Organisms (``loaded.source == "organism"``, whether named or a saved folder) speak
    their own language (:class:`~kdgap.organisms.transcript.OrganismFormat`); every other
    model gets the paper's prompt (:class:`~kdgap.agent.prompts.PaperFormat`), with the
    ``<ucb_values>`` knowing-doing rationale unless ``knowing_doing=False``, wrapped in
    the chat template exactly when the tokenizer has one (a base model without a template
    gets the raw prompt).

    Args:
        loaded: the model as :func:`kdgap.models.load_model` returned it.
        knowing_doing: for the paper's prompt, ask for the ``<ucb_values>`` rationale.
    """
    if loaded.source == "organism":
        return OrganismFormat()

    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    return PaperFormat(knowing_doing=knowing_doing, use_chat_template=has_template)


def check_rationale_name(rationale: str) -> None:
    """Refuse a ``rationale`` that is not one of :data:`RATIONALES` (needs no model)."""
    if rationale not in RATIONALES:
        raise ValueError(f"rationale={rationale!r} is unknown; use one of {RATIONALES}.")


def check_rationale(rationale: str, mode: str, fmt: TranscriptFormat) -> None:
    """Refuse a ``rationale`` setting that cannot work with ``mode`` and ``fmt``, before any
    model work (a ``ValueError`` that names the value and the fix)."""
    check_rationale_name(rationale)
    if rationale != "scripted":
        return
    if mode != "forced":
        raise ValueError(
            f"rationale='scripted' with mode={mode!r}: a scripted rationale is followed by "
            "the forced choice of the action; use mode='forced'."
        )
    if not callable(getattr(fmt, "write_rationale", None)) or not getattr(
        fmt, "knowing_doing", True
    ):
        raise ValueError(
            f"rationale='scripted' needs a format that writes the correct rationale "
            f"(write_rationale); {fmt!r} does not. Use PaperFormat(knowing_doing=True)."
        )
