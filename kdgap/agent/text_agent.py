"""A language-model agent that plays text bandits: the :class:`~kdgap.policies.Policy`
behind ``kdgap play --model``.

Two action modes (issue 2, item 5):

- ``free``: generate, parse the last ``ACTION=X`` (Schmied et al. 2025). No valid action
  -> a random arm (seeded per episode and step), ``valid=False``; the runner and metrics
  count and penalise it.
- ``forced``: generate the rationale, stopping at the action marker; cut the text before
  the marker, append the marker and score every arm name as a continuation (all spellings
  from ``fmt.arm_continuations``, combined by logsumexp; several-token names by their
  sequence log-prob). Action = argmax, ``action_probs`` = softmax over arms. Every step is
  valid, and the marker's last character is the *action site* recording and patching use.

``counterfactual=True`` (Lanham et al. 2023 style): after the rationale, rewrite its
conclusion to another arm (seeded choice, ``fmt.edit_conclusion``), redo the forced choice
on the edited text, and return ``extras["cf_rationale_arms"]`` / ``extras["cf_actions"]``
(-1 where the rationale has no parsable conclusion or cannot be edited).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from kdgap.agent.formats import TranscriptFormat
from kdgap.agent.generation import (
    Generation,
    check_generation_args,
    generate,
    score_continuations,
)
from kdgap.envs.bandit import BanditConfig
from kdgap.policies import Decisions, HistoryBatch

MODES = ("forced", "free")


class TextAgent:
    """Plays a batch of episodes with a TransformerBridge model through a transcript format.

    Args:
        model: any TransformerBridge with a tokenizer (eval mode).
        fmt: a :class:`~kdgap.agent.formats.TranscriptFormat` (e.g. ``PaperFormat()``).
        mode: ``"forced"`` or ``"free"``.
        max_new_tokens: most tokens of each completion.
        temperature: 0 for greedy decoding, > 0 to sample.
        seed: combined with the run seed of :meth:`reset`.
        batch_size: prompts per generation / scoring forward (default: all episodes).
        counterfactual: also run the conclusion-edit test at every step.
        tokenizer: overrides ``model.tokenizer``.
    """

    def __init__(
        self,
        model,
        fmt: TranscriptFormat,
        *,
        mode: str = "forced",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        counterfactual: bool = False,
        tokenizer=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}.")
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
        self.name = f"text-{mode}:{fmt.name}"
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
        stops = [self.fmt.action_marker] if self.mode == "forced" else []
        gen = self._generate(prompts, history, stops)
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
            cf_scores = self.arm_logprobs(cf_prefixes) if cf_prefixes else None
        else:
            prefixes = [
                p + self._prefix_tail(r, r != c) for p, r, c in zip(prompts, rationales, gen.texts)
            ]
            scores, spell = self._score(prefixes + cf_prefixes)
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
        gen = self._generate(prompts, history, [self.fmt.action_marker])
        prefixes = [
            p + self._prefix_tail(self.fmt.strip_action(c), self.fmt.strip_action(c) != c)
            for p, c in zip(prompts, gen.texts)
        ]
        return torch.softmax(self.arm_logprobs(prefixes), dim=-1).numpy().astype(np.float64)

    # ------------------------------------------------------------------ building blocks
    def prompts(self, history: HistoryBatch) -> list[str]:
        """``[n]`` prompt texts, chat-templated when the format and tokenizer allow."""
        cfg = history.cfg
        raw = [
            self.fmt.render_prompt(cfg, history.actions[j].tolist(), history.rewards[j].tolist())
            for j in range(history.n)
        ]
        if not (self.fmt.use_chat_template and getattr(self.tokenizer, "chat_template", None)):
            return raw
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in raw
        ]

    def arm_logprobs(self, prefixes: Sequence[str]) -> Float[torch.Tensor, "n arms"]:
        """Log-probability of each arm after each prefix (logsumexp over its spellings).

        Spellings that tokenise to the same ids are counted once (SentencePiece gives
        ``"red"`` and ``" red"`` the same tokens), so no arm is counted twice.
        """
        return self._score(prefixes)[0]

    def _score(self, prefixes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n, arms] arm log-probs, [n, spellings] per-spelling log-probs)``."""
        ids, owner, _ = self._continuations()
        if not prefixes:
            return torch.zeros(0, self._cfg.n_arms), torch.zeros(0, len(ids))
        scores = score_continuations(
            self.model, list(prefixes), ids, batch_size=self.batch_size, tokenizer=self.tokenizer
        )
        owner_t = torch.tensor(owner)
        out = torch.full((len(prefixes), self._cfg.n_arms), float("-inf"))
        for a in range(self._cfg.n_arms):
            out[:, a] = torch.logsumexp(scores[:, owner_t == a], dim=-1)
        return out, scores

    # ------------------------------------------------------------------ internals
    def _check(self, history: HistoryBatch) -> BanditConfig:
        if self._cfg is None:
            self.reset(history.cfg, 0)
        elif history.cfg != self._cfg:
            self.reset(history.cfg, self._run_seed)
        return history.cfg

    def _generate(self, prompts, history, stops) -> Generation:
        step_seed = np.random.SeedSequence(
            [self.seed, self._run_seed, history.t, int(history.episodes[0]), history.n]
        ).generate_state(1)[0]
        return generate(
            self.model, prompts, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, seed=int(step_seed), stop_strings=stops,
            batch_size=self.batch_size, tokenizer=self.tokenizer,
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
        if self._conts is None:
            ids, owner, texts, seen = [], [], [], set()
            for a, name in enumerate(self._cfg.arm_names):
                for v in self.fmt.arm_continuations(name):
                    t = tuple(self.tokenizer(v, add_special_tokens=False)["input_ids"])
                    if t and (a, t) not in seen:
                        seen.add((a, t))
                        ids.append(list(t))
                        owner.append(a)
                        texts.append(v)
            missing = sorted(set(range(self._cfg.n_arms)) - set(owner))
            if missing:
                raise ValueError(f"arms {missing} have no tokenisable spelling in {self.fmt!r}.")
            self._conts = (ids, owner, texts)
        return self._conts

    def _best_variant(self, arm: int, spelling_scores: torch.Tensor) -> str:
        """The spelling of ``arm`` the model scores highest (``spelling_scores [m]``)."""
        _, owner, texts = self._continuations()
        cols = [k for k, o in enumerate(owner) if o == arm]
        return texts[cols[int(spelling_scores[cols].argmax())]]

    def _counterfactuals(self, prompts, rationales, rat_arms, texts, history):
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
