"""The Alice-in-Wonderland (AIW) study (Nezhurina et al. 2024, arXiv 2406.02061).

"Alice has N brothers and she also has M sisters. How many sisters does Alice's brother
have?" The correct answer is M + 1 (the M sisters and Alice herself). Four variations
(docs/science.md, section 2): (3, 6 -> 7), (4, 2 -> 3), (1, 4 -> 5), (4, 1 -> 2), and three
prompt types:

- ``STANDARD``: solve it, taking care not to make mistakes, answer as ``### Answer: ``;
- ``THINKING``: think carefully and double check the path to the solution, then answer;
- ``RESTRICTED``: output nothing but the answer line.

Each (variation, prompt type) prompt is wrapped in the tokenizer's chat template and
sampled ``n_samples`` times (temperature sampling, seeded). The metric is the
correct-response rate per prompt type with standard error ``sqrt(p (1 - p) / n)``.

The **rationale-vs-answer check** asks whether the reasoning arrives where the answer line
says: the last number written *before* the answer line (:func:`rationale_number`) is
compared with the answer (:func:`parse_answer`). A wrong answer that its own reasoning
leads to is a *confabulation* (confident reasoning for a wrong result, the paper's
observation); a wrong answer that contradicts the reasoning is a *disconnected* answer.

Parsing rules (pure functions, no model):

- :func:`parse_answer`: the **last** ``#... Answer: X`` line wins (at least one ``#``;
  markdown and quotes around ``X`` are skipped; ``X`` is digits or a number word
  ``zero``..``twenty``). None when there is no such line or ``X`` is not a number.
- :func:`rationale_number`: the last whole or decimal number (digits only: number words
  such as "one of her sisters" are too often not quantities) in the text before that
  answer line; None when the answer line is missing or nothing numeric precedes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from kdgap._checks import check_int
from kdgap.agent.generation import generate

#: (N brothers, M sisters) of the four variations; the correct answer is M + 1.
VARIATIONS: tuple[tuple[int, int], ...] = ((3, 6), (4, 2), (1, 4), (4, 1))
PROMPT_TYPES = ("STANDARD", "THINKING", "RESTRICTED")
#: Default completion budget per prompt type (RESTRICTED asks for one line only).
DEFAULT_MAX_NEW_TOKENS = {"STANDARD": 192, "THINKING": 256, "RESTRICTED": 24}

_QUESTION = (
    "Alice has {n} brothers and she also has {m} sisters. "
    "How many sisters does Alice's brother have?"
)
_INSTRUCTIONS = {
    "STANDARD": 'Solve the problem taking care not to make any mistakes. Provide the final '
    'answer in the following form: "### Answer: ".',
    "THINKING": "Before providing the answer to this problem, think carefully and double "
    "check the path to the correct solution for any mistakes. Provide then the final answer "
    'in the following form: "### Answer: ".',
    "RESTRICTED": "To answer the question, DO NOT OUTPUT ANY TEXT EXCEPT the following "
    'format that contains the final answer: "### Answer: ".',
}  # fmt: skip
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_WORD_VALUE = {w: i for i, w in enumerate(_WORDS)}
_ANSWER_RE = re.compile(
    r"#+[ \t]*answer[ \t]*[:=][ \t*_`\"'\[(]*(?P<x>[-+]?\d+(?:\.\d+)?|[A-Za-z]+)",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:\.\d+)?(?![0-9])")


def correct_answer(n: int, m: int) -> int:
    """The correct answer, ``m + 1``: each brother's sisters are Alice and her M sisters."""
    return int(m) + 1


def render_prompt(n: int, m: int, prompt_type: str) -> str:
    """The user message for variation ``(n, m)`` and ``prompt_type`` (no chat template)."""
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"prompt_type={prompt_type!r} is unknown; use one of {PROMPT_TYPES}.")
    n, m = check_int("n", n, minimum=0), check_int("m", m, minimum=0)
    return _QUESTION.format(n=n, m=m) + " " + _INSTRUCTIONS[prompt_type]


def _number(s: str) -> int | float | None:
    s = s.lower()
    if s in _WORD_VALUE:
        return _WORD_VALUE[s]
    try:
        x = float(s)
    except ValueError:
        return None
    return int(x) if x.is_integer() else x


def _last_answer(text: str) -> re.Match | None:
    matches = list(_ANSWER_RE.finditer(text))
    return matches[-1] if matches else None


def parse_answer(text: str) -> int | float | None:
    """The number of the last ``### Answer: X`` line of ``text`` (see module rules)."""
    m = _last_answer(text)
    return None if m is None else _number(m.group("x"))


def rationale_number(text: str) -> int | float | None:
    """The last number written before the (last) answer line, or None."""
    m = _last_answer(text)
    if m is None:
        return None
    nums = _NUMBER_RE.findall(text[: m.start()])
    return _number(nums[-1]) if nums else None


def rationale_consistent(text: str) -> bool | None:
    """Whether the reasoning's last number equals the answer (None if either is missing)."""
    a, r = parse_answer(text), rationale_number(text)
    return None if a is None or r is None else a == r


def standard_error(p: float, n: int) -> float:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` of a rate ``p`` over ``n`` samples."""
    check_int("n", n, hint="A standard error needs at least one sample.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} must be a rate in [0, 1].")
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class AiwSample:
    """One sampled completion and what was read from it.

    Attributes:
        n, m: the variation; ``target = m + 1``.
        prompt_type: one of :data:`PROMPT_TYPES`.
        sample: index of the sample within its (variation, prompt type) cell.
        completion: the generated text (cut at EOS).
        answer: :func:`parse_answer` (None: no parsable answer line; counted as wrong).
        correct: ``answer == target``.
        rationale_number: :func:`rationale_number`.
        consistent: :func:`rationale_consistent`.
    """

    n: int
    m: int
    target: int
    prompt_type: str
    sample: int
    completion: str
    answer: int | float | None
    correct: bool
    rationale_number: int | float | None
    consistent: bool | None


def score_completion(n: int, m: int, prompt_type: str, sample: int, text: str) -> AiwSample:
    """Read one completion into an :class:`AiwSample`."""
    target = correct_answer(n, m)
    ans = parse_answer(text)
    return AiwSample(
        n=int(n), m=int(m), target=target, prompt_type=prompt_type, sample=int(sample),
        completion=text, answer=ans, correct=ans is not None and ans == target,
        rationale_number=rationale_number(text), consistent=rationale_consistent(text),
    )  # fmt: skip


def summarise(samples: Sequence[AiwSample]) -> dict:
    """Rates per prompt type (and per variation within it) from scored samples.

    Per group: ``n``, ``n_correct``, ``correct_rate`` and ``se`` (``sqrt(p(1-p)/n)``),
    ``parsed_rate`` (share with an answer line), ``n_checked`` (samples with both an
    answer and a number before it), ``rationale_matches_answer`` (share of the checked
    ones whose reasoning ends on the answer; None if none checked), ``confabulated``
    (wrong answers their own reasoning ends on) and ``disconnected`` (answers that differ
    from the reasoning's last number).
    """
    out: dict = {}
    for pt in PROMPT_TYPES:
        rows = [s for s in samples if s.prompt_type == pt]
        if not rows:
            continue
        entry = _rates(rows)
        entry["by_variation"] = {
            f"{n},{m}->{m + 1}": _rates([s for s in rows if (s.n, s.m) == (n, m)])
            for n, m in dict.fromkeys((s.n, s.m) for s in rows)
        }
        out[pt] = entry
    return out


def _rates(rows: Sequence[AiwSample]) -> dict:
    n = len(rows)
    k = sum(s.correct for s in rows)
    p = k / n
    checked = [s for s in rows if s.consistent is not None]
    return {
        "n": n,
        "n_correct": int(k),
        "correct_rate": p,
        "se": standard_error(p, n),
        "parsed_rate": sum(s.answer is not None for s in rows) / n,
        "n_checked": len(checked),
        "rationale_matches_answer": (
            sum(bool(s.consistent) for s in checked) / len(checked) if checked else None
        ),
        "confabulated": sum(bool(s.consistent) and not s.correct for s in checked),
        "disconnected": sum(s.consistent is False for s in checked),
    }


@dataclass
class AiwResult:
    """Output of :func:`aiw_study`: every sample and the per-prompt-type summary."""

    samples: list[AiwSample]
    summary: dict
    config: dict

    def to_dict(self, *, with_samples: bool = True) -> dict:
        """JSON-serialisable dict (``samples`` left out with ``with_samples=False``)."""
        out = {"summary": self.summary, "config": self.config}
        if with_samples:
            out["samples"] = [asdict(s) for s in self.samples]
        return out


def aiw_study(
    model: TransformerBridge,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    variations: Sequence[tuple[int, int]] = VARIATIONS,
    prompt_types: Sequence[str] = PROMPT_TYPES,
    n_samples: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int | Mapping[str, int] = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int | None = None,
    chat_template: bool = True,
) -> AiwResult:
    """Sample every (variation, prompt type) ``n_samples`` times and score the answers.

    One :func:`kdgap.agent.generation.generate` call per prompt type (all its variations x
    samples in left-padded batches, seed ``seed + index of the prompt type``), so the
    result is reproducible for a given ``batch_size``.

    Args:
        model: a TransformerBridge with a tokenizer (eval mode).
        tokenizer: overrides ``model.tokenizer``.
        variations: ``(N, M)`` pairs; the target is ``M + 1``.
        prompt_types: subset of :data:`PROMPT_TYPES`.
        n_samples: samples per (variation, prompt type) (>= 1).
        temperature: sampling temperature (> 0 for repeated samples to differ; 0 = greedy).
        max_new_tokens: one budget, or one per prompt type.
        seed: sampling seed.
        batch_size: rows per generation batch (default: all rows of a prompt type).
        chat_template: wrap each prompt as a user message with the tokenizer's template.

    Raises:
        ValueError: bad arguments, or ``chat_template=True`` with a tokenizer that has no
            chat template (pass ``chat_template=False`` for a base model).
    """

    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer; boot it with tokenizer=... or pass tokenizer=.")
    check_int("n_samples", n_samples)
    bad = [p for p in prompt_types if p not in PROMPT_TYPES]
    if bad or not prompt_types:
        raise ValueError(f"prompt_types={list(prompt_types)!r}: use a subset of {PROMPT_TYPES}.")
    if not variations:
        raise ValueError("variations is empty; pass (N, M) pairs such as VARIATIONS.")
    if chat_template and not getattr(tok, "chat_template", None):
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template (a base model?); "
            "pass chat_template=False to send the raw question, or set tokenizer.chat_template."
        )
    budgets = (
        {pt: int(max_new_tokens) for pt in prompt_types}
        if isinstance(max_new_tokens, int)
        else {pt: int(max_new_tokens[pt]) for pt in prompt_types}
    )
    samples: list[AiwSample] = []
    for k, pt in enumerate(prompt_types):
        cells = [(int(n), int(m)) for n, m in variations]
        texts = [render_prompt(n, m, pt) for n, m in cells]
        if chat_template:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        rows = [(c, t, s) for c, t in zip(cells, texts) for s in range(n_samples)]
        gen = generate(
            model, [t for _, t, _ in rows], max_new_tokens=budgets[pt], temperature=temperature,
            seed=int(seed) + k, batch_size=batch_size, tokenizer=tok,
        )  # fmt: skip
        for ((n, m), _, s), text in zip(rows, gen.texts):
            samples.append(score_completion(n, m, pt, s, _strip_specials(text, tok)))
    config = {
        "variations": [list(map(int, v)) for v in variations],
        "prompt_types": list(prompt_types),
        "n_samples": n_samples,
        "temperature": float(temperature),
        "max_new_tokens": budgets,
        "seed": int(seed),
        "chat_template": bool(chat_template),
    }
    return AiwResult(samples=samples, summary=summarise(samples), config=config)


def _strip_specials(text: str, tok: PreTrainedTokenizerBase) -> str:
    """Drop special tokens' text (a chat model's end-of-turn marker) from a completion."""
    for s in getattr(tok, "all_special_tokens", []) or []:
        if s:
            text = text.replace(s, "")
    return text
