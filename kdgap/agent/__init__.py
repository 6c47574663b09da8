"""The text agent: prompts, parsers, batched generation, the runner.

``PaperFormat`` and ``TextAgent`` are imported lazily so that ``import kdgap.agent.runner``
(reference policies only) does not pay for importing torch.
"""

__all__ = ["PaperFormat", "TextAgent"]


def __getattr__(name: str):
    if name == "PaperFormat":
        from kdgap.agent.prompts import PaperFormat

        return PaperFormat
    if name == "TextAgent":
        from kdgap.agent.text_agent import TextAgent

        return TextAgent
    raise AttributeError(f"module 'kdgap.agent' has no attribute {name!r}")
