"""A language-model agent that plays text bandits: the :class:`~kdgap.policies.reference.Policy`
behind ``kdgap play --model``.

Two action modes:

- ``free``: generate, parse the last ``ACTION=X`` (Schmied et al. 2025). No valid action
  -> a random arm (seeded per episode and step), ``valid=False``; the runner and metrics
  count and penalise it.
- ``forced``: generate the rationale, stopping at the action marker; cut the text before
  the marker, append the marker and score every arm name as a continuation (all spellings
  from ``fmt.arm_continuations``, combined by logsumexp; several-token names by their
  sequence log-prob). Action = argmax, ``action_probs`` = softmax over arms. Every step is
  valid, and the marker's last character is the *action site* recording and patching use.

``rationale="scripted"`` (forced mode only): kdgap writes the correct rationale into the
model's turn (``fmt.write_rationale``: the UCB values of the history) and the model only
acts, so any model, however small, can be asked whether it acts on a rationale it is given.

``counterfactual=True`` (Lanham et al. 2023 style): after the rationale, rewrite its
conclusion to another arm (seeded choice, ``fmt.edit_conclusion``), redo the forced choice
on the edited text, and return ``extras["cf_rationale_arms"]`` / ``extras["cf_actions"]``
(-1 where the rationale has no parsable conclusion or cannot be edited).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int

from kdgap.agent.generation import (
    Generation,
    check_generation_args,
    generate,
    score_continuations,
)
from kdgap.agent.hf_decoding import PromptCache
from kdgap.agent.prompts import check_rationale
from kdgap.envs.bandit import BanditConfig
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.policies.reference import Decisions, HistoryBatch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

MODES = ("forced", "free")


class TextAgent:
    """Plays a batch of episodes with a TransformerBridge model through a transcript format.

    Args:
        model: any TransformerBridge with a tokenizer (eval mode).
        fmt: a :class:`~kdgap.envs.transcript_format.TranscriptFormat` (e.g. ``PaperFormat()``).
        mode: ``"forced"`` or ``"free"``.
        max_new_tokens: most tokens of each completion.
        temperature: 0 for greedy decoding, > 0 to sample.
        seed: combined with the run seed of :meth:`reset`.
        batch_size: prompts per generation / scoring forward (default: all episodes).
        counterfactual: also run the conclusion-edit test at every step.
        tokenizer: overrides ``model.tokenizer``.
        rationale: ``"model"`` (the model writes it) or ``"scripted"`` (kdgap writes the
            correct one, the model only acts; forced mode and a format with
            ``write_rationale``, e.g. ``PaperFormat(knowing_doing=True)``).
    """

    def __init__(
        self,
        model: TransformerBridge,
        fmt: TranscriptFormat,
        *,
        mode: str = "forced",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        counterfactual: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        rationale: str = "model",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}.")
        check_rationale(rationale, mode, fmt)
        if not isinstance(fmt, TranscriptFormat):
            raise TypeError(
                f"fmt={fmt!r} does not implement TranscriptFormat; pass e.g. "
                "kdgap.agent.prompts.PaperFormat()."
            )
        check_generation_args(max_new_tokens, temperature, batch_size)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("model has no tokenizer; boot it with tokenizer=... or pass one.")
        self.model, self.fmt, self.mode = model, fmt, mode
        self.max_new_tokens, self.temperature = max_new_tokens, float(temperature)
        self.seed, self.batch_size, self.counterfactual = int(seed), batch_size, counterfactual
        self.rationale = rationale
        scripted = "-scripted" if rationale == "scripted" else ""
        self.name = f"text-{mode}{scripted}:{fmt.name}"
        self._cfg: BanditConfig | None = None
        self._run_seed = 0
        self._conts: tuple[list[list[int]], list[int], list[str]] | None = None

    # ------------------------------------------------------------------ Policy API
    def reset(self, cfg: BanditConfig, seed: int) -> None:
        """Prepare for a run on bandit family ``cfg``; ``seed`` fixes all randomness."""
        self._cfg, self._run_seed, self._conts = cfg, int(seed), None

    def act(self, history: HistoryBatch) -> Decisions:
        """One step for ``history.n`` episodes: generate, then parse or force a choice."""
        cfg = self._check(history)
        prompts = self.prompts(history)
        forced = self.mode == "forced"
        stops = [self.fmt.action_marker] if forced else []
        # Forced choice (and the counterfactual) score prefixes that extend these prompts:
        # keep the generation's KV cache so scoring runs only the tokens after it.
        gen = self._generate(prompts, history, stops, keep_cache=forced or self.counterfactual)
        n, names = history.n, list(cfg.arm_names)
        rationales = [self.fmt.strip_action(c) for c in gen.texts]
        rat_arms = np.array(
            [_or_neg(self.fmt.parse_rationale(r, names)) for r in rationales], dtype=np.int64
        )
        cf_prefixes, cf_rows, cf_arms = self._counterfactuals(
            prompts, rationales, rat_arms, gen.texts, history
        )
        extras: dict = {"generated_tokens": gen.n_tokens}
        if self.mode == "free":
            parsed = [self.fmt.parse_action(c, names) for c in gen.texts]
            valid = np.array([p is not None for p in parsed], dtype=bool)
            actions = np.array(
                [p if p is not None else self._rng(history, j).integers(cfg.n_arms)
                 for j, p in enumerate(parsed)], dtype=np.int64,
            )  # fmt: skip
            completions, probs = list(gen.texts), None
            cf_scores = self._score(cf_prefixes, gen.cache, cf_rows)[0] if cf_prefixes else None
        else:
            prefixes = [
                p + self._prefix_tail(r, r != c) for p, r, c in zip(prompts, rationales, gen.texts)
            ]
            scores, spell = self._score(prefixes + cf_prefixes, gen.cache, list(range(n)) + cf_rows)
            cf_scores, scores = scores[n:], scores[:n]
            probs = torch.softmax(scores, dim=-1).numpy().astype(np.float64)
            actions = scores.argmax(dim=-1).numpy().astype(np.int64)
            valid = np.ones(n, dtype=bool)
            completions = [
                pre[len(p) :] + self._best_variant(actions[j], spell[j])
                for j, (p, pre) in enumerate(zip(prompts, prefixes))
            ]  # fmt: skip
        if self.counterfactual:
            cf_actions = np.full(n, -1, dtype=np.int64)
            for k, j in enumerate(cf_rows):
                cf_actions[j] = int(cf_scores[k].argmax())
            extras["cf_rationale_arms"], extras["cf_actions"] = cf_arms, cf_actions
        return Decisions(
            actions=actions, valid=valid, rationale_arms=rat_arms, action_probs=probs,
            prompts=prompts, completions=completions, extras=extras,
        )  # fmt: skip

    def action_distribution(self, history: HistoryBatch) -> Float[np.ndarray, "n arms"]:
        """Forced-choice distribution ``[n, arms]`` after the model's own rationale.

        The rationale is generated first (stopping at the marker), then every arm is
        scored after the marker, as the frequency-bias protocol scores candidate actions.
        """
        self._check(history)
        prompts = self.prompts(history)
        gen = self._generate(prompts, history, [self.fmt.action_marker], keep_cache=True)
        prefixes = [
            p + self._prefix_tail(self.fmt.strip_action(c), self.fmt.strip_action(c) != c)
            for p, c in zip(prompts, gen.texts)
        ]
        scores = self._score(prefixes, gen.cache, list(range(len(prefixes))))[0]
        return torch.softmax(scores, dim=-1).numpy().astype(np.float64)

    # ------------------------------------------------------------------ building blocks
    def prompts(self, history: HistoryBatch) -> list[str]:
        """``[n]`` prompt texts, chat-templated as ``fmt.use_chat_template`` says.

        Raises:
            ValueError: ``fmt.use_chat_template is True`` but the tokenizer has no chat
                template (a base model): pass a format with ``use_chat_template=False``
                (raw prompt) or ``None`` (template only when there is one), or set
                ``tokenizer.chat_template``.
        """
        cfg = history.cfg
        return [
            self.chat_prompt(
                self.fmt.render_prompt(
                    cfg, history.actions[j].tolist(), history.rewards[j].tolist()
                )
            )
            for j in range(history.n)
        ]

    def chat_prompt(self, prompt: str) -> str:
        """A rendered prompt as the model sees it: wrapped as a user message with the
        tokenizer's chat template when ``fmt.use_chat_template`` says so, else unchanged
        (raises as :meth:`prompts`)."""
        if not self._use_template():
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def arm_logprobs(self, prefixes: Sequence[str]) -> Float[torch.Tensor, "n arms"]:
        """Log-probability of each arm after each prefix (logsumexp over its spellings).

        Spellings that tokenise to the same ids are counted once (SentencePiece gives
        ``"red"`` and ``" red"`` the same tokens), so no arm is counted twice.
        """
        return self._score(prefixes)[0]

    def _score(
        self,
        prefixes: Sequence[str],
        cache: PromptCache | None = None,
        rows: Sequence[int | None] | None = None,
    ) -> tuple[Float[torch.Tensor, "n arms"], Float[torch.Tensor, "n spellings"]]:
        """``([n, arms] arm log-probs, [n, spellings] per-spelling log-probs)``.

        ``cache``/``rows``: the generation's KV caches and the prompt each prefix extends
        (scoring then runs only the tokens after the shared ones; same scores).
        """
        ids, owner, _ = self._continuations()
        if not prefixes:
            return torch.zeros(0, self._cfg.n_arms), torch.zeros(0, len(ids))
        scores = score_continuations(
            self.model, list(prefixes), ids, batch_size=self.batch_size,
            tokenizer=self.tokenizer, reuse=cache, reuse_rows=rows,
        )  # fmt: skip
        owner_t = torch.tensor(owner)
        out = torch.full((len(prefixes), self._cfg.n_arms), float("-inf"))
        for a in range(self._cfg.n_arms):
            out[:, a] = torch.logsumexp(scores[:, owner_t == a], dim=-1)
        return out, scores

    # ------------------------------------------------------------------ internals
    def _use_template(self) -> bool:
        want = getattr(self.fmt, "use_chat_template", None)
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if want is True and not has:
            raise ValueError(
                f"{self.fmt!r} asks for a chat prompt (use_chat_template=True) but the "
                "tokenizer has no chat template (a base model?). Pass a format with "
                "use_chat_template=False for the raw prompt (or None to use a template only "
                "when there is one), or set tokenizer.chat_template."
            )
        return bool(want) if want is not None else has

    def _check(self, history: HistoryBatch) -> BanditConfig:
        if self._cfg is None:
            self.reset(history.cfg, 0)
        elif history.cfg != self._cfg:
            self.reset(history.cfg, self._run_seed)
        return history.cfg

    def _generate(
        self,
        prompts: list[str],
        history: HistoryBatch,
        stops: list[str],
        keep_cache: bool = False,
    ) -> Generation:
        if self.rationale == "scripted":
            texts = [
                self.fmt.write_rationale(
                    history.cfg, history.actions[j].tolist(), history.rewards[j].tolist()
                )
                for j in range(history.n)
            ]  # fmt: skip
            return Generation(texts, [[] for _ in texts], np.zeros(len(texts), dtype=np.int64))
        step_seed = np.random.SeedSequence(
            [self.seed, self._run_seed, history.t, int(history.episodes[0]), history.n]
        ).generate_state(1)[0]
        return generate(
            self.model, prompts, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, seed=int(step_seed), stop_strings=stops,
            batch_size=self.batch_size, tokenizer=self.tokenizer, keep_cache=keep_cache,
        )  # fmt: skip

    def _rng(self, history: HistoryBatch, j: int, stream: int = 0) -> np.random.Generator:
        # Per (seed, episode, step): the draw does not depend on how episodes are batched.
        ep = int(history.episodes[j])
        return np.random.default_rng([self.seed, self._run_seed, ep, history.t, stream])

    def _prefix_tail(self, rationale: str, wrote_marker: bool) -> str:
        """Rationale + marker. A newline goes before the marker only when the model never
        wrote the marker (cut off by ``max_new_tokens``) and its text ends mid-line."""
        sep = "" if wrote_marker or not rationale or rationale[-1].isspace() else "\n"
        return rationale + sep + self.fmt.action_marker

    def _continuations(self) -> tuple[list[list[int]], list[int], list[str]]:
        """``(token ids, owning arm, text)`` of every distinct in-vocabulary spelling.

        A spelling is out of the vocabulary when it tokenises to nothing, contains the
        tokenizer's unknown token, or does not decode back to itself (case and whitespace
        aside); such spellings are dropped (``"Red"`` in a lower-case vocabulary).

        Raises:
            ValueError: an arm has no in-vocabulary spelling, or two arms share one token
                sequence (forced choice could not tell them apart); the message names them.
        """
        if self._conts is None:
            ids, owner, texts, seen = [], [], [], {}
            dropped: dict[int, list[tuple[str, list[int]]]] = {}
            unk = getattr(self.tokenizer, "unk_token_id", None)
            names = list(self._cfg.arm_names)
            for a, name in enumerate(names):
                for v in self.fmt.arm_continuations(name):
                    t = tuple(self.tokenizer(v, add_special_tokens=False)["input_ids"])
                    if not t or (unk is not None and unk in t) or not self._decodes_to(t, v):
                        dropped.setdefault(a, []).append((v, list(t)))
                        continue
                    if t in seen and seen[t] != a:
                        b = seen[t]
                        raise ValueError(
                            f"arms {names[b]!r} and {name!r} share the token sequence "
                            f"{list(t)} (spelling {v!r}); forced choice cannot tell them "
                            f"apart. Check {self.fmt!r}.arm_continuations or try "
                            "BanditConfig(arm_style='numbers')."
                        )
                    if t not in seen:
                        seen[t] = a
                        ids.append(list(t))
                        owner.append(a)
                        texts.append(v)
            missing = sorted(set(range(self._cfg.n_arms)) - set(owner))
            if missing:
                detail = "; ".join(
                    f"{names[a]!r}: " + ", ".join(f"{v!r} -> {t}" for v, t in dropped.get(a, []))
                    for a in missing
                )  # fmt: skip
                raise ValueError(
                    f"arm names {[names[a] for a in missing]} are not in the tokenizer's "
                    f"vocabulary: no spelling from {self.fmt!r} encodes to tokens that decode "
                    f"back to it (unk_token_id={unk}; {detail}). Use arm names the "
                    "tokenizer knows (e.g. BanditConfig(arm_style='numbers'))."
                )
            self._conts = (ids, owner, texts)
        return self._conts

    def _decodes_to(self, ids: tuple[int, ...], text: str) -> bool:
        """Whether ``ids`` decode back to ``text``, ignoring case and whitespace."""
        back = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return "".join(back.split()).lower() == "".join(text.split()).lower()

    def _best_variant(self, arm: int, spelling_scores: Float[torch.Tensor, " spellings"]) -> str:
        """The spelling of ``arm`` the model scores highest (``spelling_scores [m]``)."""
        _, owner, texts = self._continuations()
        cols = [k for k, o in enumerate(owner) if o == arm]
        return texts[cols[int(spelling_scores[cols].argmax())]]

    def _counterfactuals(
        self,
        prompts: list[str],
        rationales: list[str],
        rat_arms: Int[np.ndarray, " n"],
        texts: list[str],
        history: HistoryBatch,
    ) -> tuple[list[str], list[int], Int[np.ndarray, " n"]]:
        """Edited prefixes for the conclusion-edit test, the rows they belong to, and the
        ``[n]`` arms written in (-1 where none)."""
        cf_arms = np.full(history.n, -1, dtype=np.int64)
        if not self.counterfactual:
            return [], [], cf_arms
        names, prefixes, rows = list(history.cfg.arm_names), [], []
        for j, r in enumerate(rat_arms):
            if r < 0:
                continue
            others = [a for a in range(len(names)) if a != r]
            new = int(self._rng(history, j, stream=1).choice(others))
            try:
                edited = self.fmt.edit_conclusion(rationales[j], new, names)
            except ValueError:
                continue
            if self.fmt.parse_rationale(edited, names) != new:
                continue
            prefixes.append(prompts[j] + self._prefix_tail(edited, rationales[j] != texts[j]))
            rows.append(j)
            cf_arms[j] = new
        return prefixes, rows, cf_arms


def _or_neg(x: int | None) -> int:
    return -1 if x is None else int(x)
