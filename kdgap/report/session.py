"""The model session: load a model once, choose its transcript format, build agents, play, record.

Every route from a model spec to transcripts and activations goes through :class:`Session`:
``kdgap analyze`` (:class:`~kdgap.report.pipeline.Analysis`), ``kdgap record``
(:func:`record_from_model`), ``kdgap play --model`` (:func:`make_agent`) and the organism
stores of tests and benchmarks (:func:`kdgap.testing.organisms.organism_store`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from kdgap.agent.prompts import check_rationale, check_rationale_name, format_for
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks.record import record_shards, record_store
from kdgap.hooks.store import ActivationStore
from kdgap.models import LoadedModel, load_model
from kdgap.models.tokens import encode
from kdgap.policies.play import Group, play, play_together
from kdgap.policies.reference import Policy, make_policy
from kdgap.records import StepRecord

#: ``driver`` value of on-policy play: the model's own actions build the histories.
OWN = "own"
#: :meth:`Session.play` keyword arguments that plays in lockstep must share.
_SHARED_ARGS = ("seed", "mode", "max_new_tokens", "temperature", "progress")
_PLAY_ARGS = {*_SHARED_ARGS, "driver", "counterfactual", "batch_size", "first_episode"}


@dataclass(eq=False)
class Session:
    """One model, loaded once, and the transcript format it speaks.

    ``Session("organism:faithful")`` loads the model (:func:`kdgap.models.load_model`) and
    chooses its format once (:func:`kdgap.agent.prompts.format_for`: organisms speak their
    own transcript language, every other model the paper's prompt, chat-templated exactly
    when the tokenizer has a template). Agents, play and recording then share them.

    Attributes:
        spec: the model spec (``organism:NAME``, a local folder, a ``.gguf``, a preset).
        device, dtype: where and how the model runs.
        knowing_doing: paper format only: ask for the ``<ucb_values>`` rationale.
        rationale: ``"model"`` (the model writes its rationale) or ``"scripted"`` (kdgap
            writes the correct one and the model only acts; see
            :class:`~kdgap.agent.text_agent.TextAgent`).
        max_new_tokens: the agents' generation budget (None: the agent's default).
        loaded: the :class:`~kdgap.models.LoadedModel`.
        fmt: the transcript format.
    """

    spec: str
    device: str = "cpu"
    dtype: str = "float32"
    knowing_doing: bool = True
    rationale: str = "model"
    max_new_tokens: int | None = None
    loaded: LoadedModel = field(init=False, repr=False)
    fmt: TranscriptFormat = field(init=False)

    def __post_init__(self) -> None:
        check_rationale_name(self.rationale)  # before the model loads
        self.loaded = load_model(self.spec, device=self.device, dtype=self.dtype)
        self.fmt = format_for(self.loaded, knowing_doing=self.knowing_doing)
        check_rationale(self.rationale, "forced", self.fmt)
        # Wraps prompts for transcript_text; one agent serves every call.
        self._templater = self.agent()

    @property
    def bridge(self) -> TransformerBridge:
        """The model (eval mode)."""
        return self.loaded.bridge

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer."""
        return self.loaded.tokenizer

    @property
    def model_id(self) -> str:
        """The name stores and labels carry: the spec as the user wrote it."""
        return self.loaded.identity.get("spec", self.spec)

    @property
    def identity(self) -> dict[str, Any]:
        """The model's provenance (:attr:`LoadedModel.identity` without its load time)."""
        return {k: v for k, v in self.loaded.identity.items() if k != "load_seconds"}

    def agent(
        self,
        *,
        mode: str = "forced",
        counterfactual: bool = False,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> TextAgent:
        """A :class:`~kdgap.agent.text_agent.TextAgent` of this model in its format.

        Args:
            mode: ``"forced"`` (score every arm after the rationale) or ``"free"``.
            counterfactual: also edit each rationale's conclusion and act again.
            max_new_tokens: generation budget (None: the session's).
            temperature: 0 decodes greedily.
            seed: combined with the run seed of each play.
            batch_size: rows generated together (None: all).
        """
        budget = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        kwargs = {} if budget is None else {"max_new_tokens": budget}
        return TextAgent(
            self.bridge, self.fmt, mode=mode, temperature=temperature, seed=seed,
            batch_size=batch_size, counterfactual=counterfactual, tokenizer=self.tokenizer,
            rationale=self.rationale, **kwargs,
        )  # fmt: skip

    def transcript_text(self, prompt: str, rationale: str) -> str:
        """``prompt`` (as the format renders it) and ``rationale`` joined as the model
        sees them: chat-templated exactly as the agents of :meth:`agent` wrap prompts. The
        patching pairs are built with it (``text_fn``), so an edited transcript is the
        text the model would have seen."""
        return self._templater.chat_prompt(prompt) + rationale

    def check_fits(self, cfg: BanditConfig) -> None:
        """Refuse, before any play, a horizon whose last step does not fit the model's context.

        The last step's transcript (the longest history, chat-templated, the correct
        rationale where the format writes one, the action marker and an arm) is tokenised
        as the agent tokenises it and compared with ``n_ctx``: a longer horizon would
        otherwise fail deep inside a forward pass, after the steps before it were played.

        Raises:
            ValueError: names the horizon, the tokens needed, ``n_ctx`` and the fix.
        """
        n_ctx = getattr(self.bridge.cfg, "n_ctx", None)
        if not n_ctx:
            return
        names = cfg.arm_names
        longest = max(range(len(names)), key=lambda a: len(names[a]))
        acts, rews = [longest] * (cfg.horizon - 1), [1.0] * (cfg.horizon - 1)
        write = getattr(self.fmt, "write_rationale", None)
        try:
            rationale = write(cfg, acts, rews) if callable(write) else ""
        except ValueError:  # a format that writes no rationale (e.g. without knowing_doing)
            rationale = ""
        prompt = self.fmt.render_prompt(cfg, acts, rews)
        arm = self.fmt.arm_continuations(names[longest])[0]
        text = self.transcript_text(prompt, rationale) + self.fmt.action_marker + arm
        need = len(encode(self.bridge, [text], tokenizer=self.tokenizer)[0])
        if need > n_ctx:
            raise ValueError(
                f"horizon={cfg.horizon}: the last step's transcript needs about {need} tokens "
                f"and the model's context is n_ctx={n_ctx}; play fewer steps (--steps)."
            )

    def play(
        self,
        cfg: BanditConfig,
        n_episodes: int,
        *,
        seed: int = 0,
        driver: str | Policy | None = None,
        counterfactual: bool = False,
        progress: bool = True,
        batch_size: int | None = None,
        mode: str = "forced",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        first_episode: int = 0,
    ) -> list[StepRecord]:
        """Play ``n_episodes`` bandits of family ``cfg`` with :meth:`agent` (seeded ``seed``).

        Args:
            cfg: the bandit family.
            n_episodes: bandits to play.
            seed: fixes the bandits, rewards, the driver and the agent.
            driver: who builds the histories: None or ``"own"``: the model's own actions
                (on-policy); a reference policy or its name (``"random"``, ``"ucb"``, ...):
                its arms are executed while the model still decides at every step
                (off-policy, see :func:`kdgap.policies.play.play`).
            counterfactual, mode, max_new_tokens, temperature: the agent (see :meth:`agent`).
            progress: progress bar.
            batch_size: episodes stepped together (None: all).
            first_episode: index of the first episode (a range of a larger run, see
                :func:`kdgap.policies.play.play`).

        Returns:
            ``[n_episodes * cfg.horizon]`` step records.
        """
        self.check_fits(cfg)
        agent = self.agent(
            mode=mode, counterfactual=counterfactual, max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed,
        )  # fmt: skip
        return play(
            agent, cfg, n_episodes=n_episodes, seed=seed, batch_size=batch_size,
            progress=progress, driver=driver_policy(driver), first_episode=first_episode,
        )  # fmt: skip

    def play_many(self, plays: Sequence[tuple[BanditConfig, int, dict]]) -> list[list[StepRecord]]:
        """:meth:`play` of each ``(cfg, n_episodes, kwargs)``, same records.

        Plays of one bandit family that differ only in their episodes, driver and
        counterfactual (and leave ``batch_size`` unset) run in lockstep
        (:func:`~kdgap.policies.play.play_together`): one generation per step for all of
        them, so the behaviour study and the off-policy transcripts of an analysis cost
        about one play's sequential steps instead of two.
        """
        out: list[list[StepRecord] | None] = [None] * len(plays)
        buckets: dict[tuple, list[int]] = {}
        for i, (cfg, _, kwargs) in enumerate(plays):
            unknown = set(kwargs) - _PLAY_ARGS
            if unknown:
                raise TypeError(f"plays[{i}] has unknown play arguments {sorted(unknown)}.")
            if kwargs.get("batch_size") is not None:
                out[i] = self.play(cfg, plays[i][1], **kwargs)
                continue
            shared = tuple(sorted((k, v) for k, v in kwargs.items() if k in _SHARED_ARGS))
            buckets.setdefault((cfg, shared), []).append(i)
        for (cfg, shared), idx in buckets.items():
            opts = dict(shared)
            progress = opts.pop("progress", True)
            groups = [
                Group(plays[i][1], plays[i][2].get("first_episode", 0),
                      driver_policy(plays[i][2].get("driver")),
                      bool(plays[i][2].get("counterfactual", False)))
                for i in idx
            ]  # fmt: skip
            self.check_fits(cfg)
            # The agent's own defaults fill what the plays leave out, as in :meth:`play`.
            agent = self.agent(**opts, counterfactual=any(g.counterfactual for g in groups))
            got = play_together(agent, cfg, groups, seed=agent.seed, progress=progress)
            for i, records in zip(idx, got):
                out[i] = records
        return out  # type: ignore[return-value]

    def record(
        self,
        records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
        hooks: str | Sequence[str],
        sites: str | Sequence[str],
        out: str | os.PathLike,
        *,
        provenance: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> ActivationStore:
        """Record ``hooks`` at ``sites`` of ``records`` into the store at ``out``.

        :func:`kdgap.hooks.record.record_store` with this model, its format, its tokenizer,
        its id (:attr:`model_id`) and its identity (plus ``provenance``, e.g. how the
        transcripts were played) filled in; ``options`` are ``record_store``'s other
        keyword arguments (``seed``, ``batch_size``, ``dtype``, ``progress``, ...).
        """
        return record_store(self.bridge, self.fmt, records, hooks, sites, out,
                            **self._store_args(provenance), **options)  # fmt: skip

    def record_shards(
        self,
        records: Sequence[StepRecord] | Sequence[str] | str | os.PathLike,
        hooks: str | Sequence[str],
        sites: str | Sequence[str],
        out: str | os.PathLike,
        ranges: Sequence[tuple[int, int]],
        *,
        provenance: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> list[tuple[dict, list[int]]]:
        """A worker's share of :meth:`record` (same arguments): the shards ``ranges``
        recorded and written, not listed (:func:`kdgap.hooks.record.record_shards`)."""
        return record_shards(self.bridge, self.fmt, records, hooks, sites, out, ranges,
                             **self._store_args(provenance), **options)  # fmt: skip

    def _store_args(self, provenance: Mapping[str, Any] | None) -> dict[str, Any]:
        """What a store records of this model: its id, tokenizer and identity (plus how the
        transcripts were played)."""
        return {"model_id": self.model_id, "tokenizer": self.tokenizer,
                "model_identity": {**self.identity, **(provenance or {})}}  # fmt: skip


def driver_policy(driver: str | Policy | None) -> Policy | None:
    """The policy that builds the histories (None: on-policy), from a name or a policy.

    Raises:
        ValueError: an unknown policy name; the message names ``driver`` and ``"own"``.
    """
    if driver is None or driver == OWN:
        return None
    if not isinstance(driver, str):
        return driver
    try:
        return make_policy(driver)
    except ValueError as exc:
        raise ValueError(f"driver={driver!r}: {exc} Or pass driver='own' (on-policy).") from exc


def make_agent(
    model_spec: str,
    *,
    mode: str = "forced",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    counterfactual: bool = False,
    knowing_doing: bool = True,
) -> TextAgent:
    """A text agent for a model spec (``kdgap play --model``): :meth:`Session.agent`.

    Organisms speak their own transcript language; every other model gets the paper's
    prompt, with the ``<ucb_values>`` knowing-doing rationale unless ``knowing_doing=False``.
    """
    session = Session(model_spec, device=device, dtype=dtype, knowing_doing=knowing_doing)
    return session.agent(
        mode=mode, counterfactual=counterfactual, max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed, batch_size=batch_size,
    )  # fmt: skip
