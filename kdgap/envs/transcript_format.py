"""Transcript formats: how a history becomes text, and how text becomes arms and sites.

A :class:`TranscriptFormat` is the one place that knows a text layout. The text agent
renders prompts and parses actions and rationales through it; the recorder asks it for
the character spans of named *sites*; patching asks it for counterfactual edits. Two
implementations exist: :class:`kdgap.agent.prompts.PaperFormat` (the LLM prompt of
Schmied et al. 2025) and :class:`kdgap.organisms.transcript.OrganismFormat` (the model
organisms' word-level transcript language).

Sites are returned as *character* spans of the full text (prompt + completion); the hook
layer maps them to token positions with the tokenizer's offset mapping, so a format never
counts tokens and works with any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kdgap.envs.bandit import BanditConfig


class SiteNotFound(KeyError):
    """A requested site does not occur in a transcript (reported, never shifted)."""


@runtime_checkable
class TranscriptFormat(Protocol):
    """The text layout of one agent step.

    Attributes:
        name: short identifier (stored in run configs and activation-store manifests).
        action_marker: the text after which the action's arm name follows (``"ACTION="``
            for the paper's prompt). Forced choice appends it and scores the arm names.
        use_chat_template: wrap the prompt as a user message with the tokenizer's chat
            template: ``True`` requires one (a tokenizer without a template is a
            ``ValueError``), ``False`` never wraps, ``None`` wraps when the tokenizer has one.
    """

    name: str
    action_marker: str
    use_chat_template: bool | None

    def render_prompt(
        self, cfg: BanditConfig, actions: Sequence[int], rewards: Sequence[float]
    ) -> str:
        """Text shown to the model for one episode's history (before any chat template)."""

    def parse_action(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Arm index of the action in a completion, or None when there is no valid one."""

    def parse_rationale(self, completion: str, arm_names: Sequence[str]) -> int | None:
        """Arm index the rationale concludes with, or None when there is none."""

    def parse_history(self, prompt: str, arm_names: Sequence[str]) -> tuple[list[int], list[float]]:
        """The history a rendered prompt shows, ``(actions, rewards)``: the inverse of
        :meth:`render_prompt` (a chat-templated prompt reads the same). Patching edits the
        history of played steps through it, so it raises ``ValueError`` on a prompt that is
        not this format's."""

    def strip_action(self, completion: str) -> str:
        """The completion cut just before its (last) action marker: the rationale alone.

        Forced choice appends :attr:`action_marker` to this text and scores the arms.
        """

    def arm_continuations(self, arm_name: str) -> list[str]:
        """Texts that spell ``arm_name`` right after the action marker (all scored).

        For an LLM: ``["red", " red", "Red", " Red"]`` (case and leading-space variants
        tokenise differently); for the organisms a single word.
        """

    def edit_conclusion(self, completion: str, new_arm: int, arm_names: Sequence[str]) -> str:
        """The completion with the rationale's concluding arm replaced by ``new_arm``."""

    def site_spans(self, text: str) -> dict[str, tuple[int, int]]:
        """Character spans ``[start, end)`` of every named site found in ``text``."""
