"""The organisms' transcript language: one bandit step as a short sequence of words.

A transcript of step ``t`` (5 Bernoulli arms) reads::

    red1 green0 red1 blue0 think red 2 2 green 1 0 blue 1 0 yellow 0 0 orange 0 0
        ucb yellow act yellow

(one line in reality; wrapped here).

- **History**: one word per past step, arm and reward fused (``red1`` = red paid 1), so
  the model counts pulls and wins per arm from single tokens instead of pairing each arm
  token with the reward token after it, which a small transformer learns much less
  reliably.
- **Prompt end**: ``think``. Everything after it is written by the model.
- **Rationale**: per arm ``<name> <pulls> <wins>`` (counts, not means: whole numbers
  ``0..horizon`` are single words, easier to learn than digits or decimals), then
  ``ucb <arm>``, the arm the UCB rule selects: the rationale's *conclusion*.
- **Action**: ``act <arm>``, then ``<eos>``.

Every word is one token of a ``tokenizers`` WordLevel model with a whitespace
pre-tokenizer, wrapped as a Hugging Face fast tokenizer whose post-processor prepends
``<bos>``. Decoding joins words with single spaces, so ``decode(encode(text))`` gives the
text back up to whitespace. The training data path builds token ids directly
(:meth:`OrganismLanguage.ids`) and a test checks it agrees with the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdgap._checks import check_int
from kdgap.envs.arms import arm_names

if TYPE_CHECKING:  # annotations only: importing transformers here would slow every import
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
THINK, UCB, ACT = "think", "ucb", "act"
MARKERS = (THINK, UCB, ACT)


@dataclass(frozen=True)
class OrganismLanguage:
    """Vocabulary of the transcript language for one bandit shape.

    Attributes:
        n_arms: number of arms (colour-button names, as in the paper).
        horizon: longest episode; numbers ``0..horizon`` are words (pull/win counts).
    """

    n_arms: int = 5
    horizon: int = 50

    def __post_init__(self) -> None:
        check_int("n_arms", self.n_arms, minimum=2, maximum=20)
        check_int("horizon", self.horizon, maximum=500,
                  hint="(numbers 0..horizon become single words)")  # fmt: skip

    # ------------------------------------------------------------------ vocabulary
    @property
    def arm_names(self) -> tuple[str, ...]:
        """Arm names, index ``i`` naming arm ``i``."""
        return arm_names(self.n_arms, "buttons")

    @property
    def words(self) -> list[str]:
        """All words; the position of a word is its token id (specials first)."""
        names = self.arm_names
        hist = [f"{a}{r}" for a in names for r in (0, 1)]
        numbers = [str(i) for i in range(self.horizon + 1)]
        return [*SPECIALS, *MARKERS, *names, *hist, *numbers]

    @property
    def vocab(self) -> dict[str, int]:
        """Word -> token id."""
        return {w: i for i, w in enumerate(self.words)}

    @property
    def rationale_len(self) -> int:
        """Tokens the model writes before ``act``: 3 per arm, then ``ucb <arm>``."""
        return 3 * self.n_arms + 2

    def seq_len(self, t: int) -> int:
        """Tokens of a step-``t`` transcript: bos, t history, think, rationale, act, arm, eos."""
        return 1 + t + 1 + self.rationale_len + 3

    @property
    def n_ctx(self) -> int:
        """Context length of the model: every step of an episode, plus 8 spare positions.

        The spare positions are never trained; they let an agent that overruns the
        grammar (an untrained model that never writes ``act``, then gets ``act <arm>``
        appended) still be scored instead of crashing on the position table.
        """
        return self.seq_len(self.horizon - 1) + 8

    def to_dict(self) -> dict:
        """JSON-friendly dict of the fields."""
        return asdict(self)

    # ------------------------------------------------------------------ text
    def history_text(self, actions: Sequence[int], rewards: Sequence[float]) -> str:
        """``actions``/``rewards`` (length ``t``, Bernoulli 0/1) -> ``"red1 green0 ..."``."""
        names = self.arm_names
        words = []
        for a, r in zip(actions, rewards):
            r = float(r)
            if r not in (0.0, 1.0):
                raise ValueError(
                    f"rewards contain {r!r}; organisms read Bernoulli rewards (0 or 1) only: "
                    "use BanditConfig(reward='bernoulli')."
                )
            words.append(f"{names[int(a)]}{int(r)}")
        return " ".join(words)

    def prompt_text(self, actions: Sequence[int], rewards: Sequence[float]) -> str:
        """History then ``think``, with a trailing space so the completion can follow."""
        hist = self.history_text(actions, rewards)
        return f"{hist} {THINK} " if hist else f"{THINK} "

    def rationale_text(self, counts: Sequence[int], wins: Sequence[int], conclusion: int) -> str:
        """``counts``/``wins`` ``[arms]`` and the concluding arm -> ``"red 2 1 ... ucb blue"``."""
        names = self.arm_names
        parts = [f"{names[i]} {int(counts[i])} {int(wins[i])}" for i in range(self.n_arms)]
        return " ".join([*parts, UCB, names[int(conclusion)]])

    def completion_text(
        self, counts: Sequence[int], wins: Sequence[int], conclusion: int, action: int
    ) -> str:
        """Rationale, then ``act <arm>``: what a perfect organism writes."""
        rat = self.rationale_text(counts, wins, conclusion)
        return f"{rat} {ACT} {self.arm_names[int(action)]}"

    # ------------------------------------------------------------------ tokenizer
    # tokenizers and transformers are imported on use: the language itself (vocabulary,
    # texts, ids for the training data) needs neither.
    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """A Hugging Face fast tokenizer for this language (adds ``<bos>`` when encoding).

        Returns:
            ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad/unk set.
        """
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = self.vocab
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # TransformerBridge.to_tokens relies on the tokenizer adding BOS itself.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=UNK,
            clean_up_tokenization_spaces=False,
            model_max_length=self.n_ctx,
        )

    def save_tokenizer(self, folder: str | Path) -> PreTrainedTokenizerBase:
        """Save the tokenizer to ``folder`` and return it *re-loaded* from there.

        TransformerLens re-loads a tokenizer by its ``name_or_path``, so the model must be
        given one loaded from a folder: a tokenizer built in memory has no path to reload.
        """
        from transformers import AutoTokenizer

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.build_tokenizer().save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)

    # ------------------------------------------------------------------ ids (fast path)
    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<bos>`` (pure Python, no tokenizer object).

        Raises:
            ValueError: a word is not in the vocabulary.
        """
        vocab = self.vocab
        try:
            return [vocab[w] for w in text.split()]
        except KeyError as err:
            raise ValueError(
                f"word {err.args[0]!r} is not in the organism language "
                f"(n_arms={self.n_arms}, horizon={self.horizon})."
            ) from None
