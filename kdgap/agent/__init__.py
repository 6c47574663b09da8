"""The text agent: the paper's prompt format, parsers, batched generation, :class:`TextAgent`."""

from kdgap.agent.prompts import PaperFormat, format_for
from kdgap.agent.text_agent import MODES, TextAgent

__all__ = ["MODES", "PaperFormat", "TextAgent", "format_for"]
