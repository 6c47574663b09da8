"""What the ``kdgap`` command line calls: one function per command, nothing else.

``kdgap.cli`` parses arguments and calls these; they build the configurations, load models
(through :class:`~kdgap.report.session.Session`), run the studies and write the files the
command names. Each function is usable from Python as well:

- ``play``: :func:`play_study`; ``freqbias``: :func:`freqbias_study`; both choose who plays
  with :class:`Player` on a bandit family from :func:`bandit_config`;
- ``organisms list``: :func:`organisms_table`;
- ``record``: :func:`record_from_model`;
- ``analyze`` / ``demo``: :func:`analyze` with an :class:`AnalyzeConfig` (``demo``
  analyses :data:`DEMO_MODELS`);
- ``figures``: :func:`render_all`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdgap._checks import check_int, check_out_folder
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.names import resolve_hooks
from kdgap.hooks.sites import parse_sites
from kdgap.hooks.store import ActivationStore, StoreError
from kdgap.io import atomic_write_json
from kdgap.models.spec import parse_model_spec
from kdgap.organisms.registry import list_organisms
from kdgap.policies.reference import Policy, make_policy
from kdgap.records import write_records
from kdgap.report.behavior import PlayConfig, play_summary, run_freqbias, run_play
from kdgap.report.config import SIZE_PRESETS
from kdgap.report.executor import EXECUTORS, LocalExecutor, RayExecutor, make_executor
from kdgap.report.pipeline import AnalyzeConfig, analyze
from kdgap.report.render import render_all
from kdgap.report.session import Session, driver_policy, make_agent
from kdgap.training import CLONING, CloneConfig, RlftConfig, clone, rlft
from kdgap.training.export import save_finetuned

#: ``kdgap finetune --method`` choices.
FINETUNE_METHODS = (*CLONING, "rlft")

__all__ = [
    "CLONING",
    "FINETUNE_METHODS",
    "ActivationStore",
    "LocalExecutor",
    "RayExecutor",
    "RlftConfig",
    "SIZE_PRESETS",
    "DEMO_MODELS",
    "EXECUTORS",
    "AnalyzeConfig",
    "BanditConfig",
    "CloneConfig",
    "PlayConfig",
    "Player",
    "StoreError",
    "analyze",
    "bandit_config",
    "finetune",
    "freqbias_study",
    "make_executor",
    "organisms_table",
    "play_study",
    "record_from_model",
    "render_all",
    "repetitions",
]

#: The organisms ``kdgap demo`` analyses side by side: three with planted mechanisms, and
#: ``seed-calibrated`` after RL fine-tuning (shipped in ``organisms/finetuned``).
DEMO_MODELS = ("organism:faithful", "organism:greedy-bypass", "organism:seed-calibrated",
               "organism:seed-calibrated-rlft")  # fmt: skip


def bandit_config(
    *,
    n_arms: int = 5,
    horizon: int = 50,
    reward: str = "bernoulli",
    sigma: float = 1.0,
    gap: float | None = None,
    arm_style: str = "buttons",
    ucb_c: float = 0.5,
) -> BanditConfig:
    """The bandit family of the ``--arms/--steps/--reward/...`` options (validated)."""
    return BanditConfig(
        n_arms=n_arms, horizon=horizon, reward=reward, sigma=sigma, gap=gap,
        arm_style=arm_style, ucb_c=ucb_c,
    )  # fmt: skip


@dataclass(frozen=True)
class Player:
    """Who plays: a reference policy by name, or a model spec as a text agent.

    Attributes:
        policy: ``ucb``, ``greedy``, ``epsilon-greedy``, ``random`` (default ``ucb`` when
            no model is given).
        model: a model spec (``organism:NAME``, a local folder, a ``.gguf``, a preset).
        mode, max_new_tokens, temperature, batch_size, device, dtype: the text agent's
            settings (see :meth:`kdgap.report.session.Session.agent`).
    """

    policy: str | None = None
    model: str | None = None
    mode: str = "forced"
    max_new_tokens: int | None = None
    temperature: float = 0.0
    batch_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def build(self, *, seed: int = 0, counterfactual: bool = False) -> Policy:
        """The policy, or the model's text agent (loads the model)."""
        if self.model:
            return make_agent(
                self.model, mode=self.mode, max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, seed=seed, batch_size=self.batch_size,
                device=self.device, dtype=self.dtype, counterfactual=counterfactual,
            )  # fmt: skip
        return make_policy(self.policy or "ucb")


def play_study(
    player: Player,
    cfg: PlayConfig,
    *,
    json_out: str | os.PathLike | None = None,
    records_out: str | os.PathLike | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
) -> dict[str, Any]:
    """``kdgap play``: the behaviour study's JSON (:func:`~kdgap.report.behavior.run_play`).

    Writes the JSON to ``json_out`` and the step records (JSON lines) to ``records_out``
    when given. A model's episodes are played on ``executor`` when one is given (the same
    records on any executor; reference policies always play here).
    """
    if player.model and executor is not None:
        session = Session(player.model, device=player.device, dtype=player.dtype)
        how = dict(mode=player.mode, max_new_tokens=player.max_new_tokens,
                   temperature=player.temperature, counterfactual=cfg.counterfactual)  # fmt: skip
        name = session.agent(seed=cfg.seed, **how).name
        t0 = time.perf_counter()
        records = executor.play(session, cfg.bandit, cfg.n_episodes, seed=cfg.seed,
                                batch_size=cfg.batch_size, **how)  # fmt: skip
        out = play_summary(name, records, cfg, time.perf_counter() - t0)
    else:
        policy = player.build(seed=cfg.seed, counterfactual=cfg.counterfactual)
        out, records = run_play(policy, cfg)
    if json_out:
        atomic_write_json(json_out, out)
    if records_out:
        write_records(records_out, records)
    return out


def record_from_model(
    model_spec: str,
    *,
    episodes: int,
    seed: int,
    hooks: str | Sequence[str],
    sites: str | Sequence[str],
    out: str | os.PathLike,
    driver: str = "random",
    batch_size: int = 256,
    dtype: str = "float32",
    horizon: int = 50,
    n_arms: int = 5,
    progress: bool = True,
    executor: LocalExecutor | RayExecutor | None = None,
) -> ActivationStore:
    """Load a model, play bandit episodes with it, and record the transcripts (``kdgap record``).

    The model plays as a forced-mode text agent in its own format (:class:`Session`); every
    step record (``episodes * horizon`` of them) is then recorded, labels included.

    Args:
        model_spec: anything :func:`kdgap.models.load_model` reads, e.g. ``"organism:faithful"``.
        episodes: episodes to play (>= 1).
        seed: fixes the bandits, rewards and the driver; stored as a label column.
        hooks: hook specs, e.g. ``"resid_post"``.
        sites: site specs, e.g. ``"action,rationale.conclusion"`` or a list.
        out: store directory (resumed when it holds the same recording).
        driver: reference policy whose arms build the histories (off-policy play, see
            :func:`kdgap.policies.play.play`): ``"random"``, ``"ucb"``, ...; ``"own"`` lets the
            model's own actions build them (on-policy).
        batch_size: transcripts recorded together (see :func:`record_store`).
        dtype: stored dtype.
        horizon, n_arms: the Bernoulli bandit family (colour buttons).
        progress: progress bars.
        executor: where the play and the recording run (default: this process; the same
            store on any executor).

    Returns:
        The :class:`~kdgap.hooks.store.ActivationStore` at ``out``; ``[episodes * horizon]``
        examples, model id ``model_spec`` (e.g. ``"organism:faithful"``).
    """
    check_int("episodes", episodes)
    policy = driver_policy(driver)  # a bad name fails before the model loads
    parse_sites(sites)
    session = Session(model_spec)
    resolve_hooks(session.bridge, hooks)  # a bad hook spec fails before the play
    executor = executor or LocalExecutor()
    records = executor.play(
        session, BanditConfig(n_arms=n_arms, horizon=horizon), episodes, seed=seed,
        driver=policy, progress=progress,
    )  # fmt: skip
    provenance = {"driver": driver, "episodes": episodes, "horizon": horizon, "n_arms": n_arms}
    return executor.record(
        session, records, hooks, sites, out, provenance=provenance, batch_size=batch_size,
        dtype=dtype, seed=seed, progress=progress,
    )  # fmt: skip


def repetitions(rep_min: int, rep_max: int, rep_step: int) -> tuple[int, ...]:
    """``kdgap freqbias``'s repetition counts ``rep_min, rep_min + rep_step, ... <= rep_max``,
    checked before any model work."""
    check_int("rep_min", rep_min, minimum=0)
    check_int("rep_step", rep_step)
    check_int("rep_max", rep_max, minimum=rep_min, hint="(at least rep_min)")
    return tuple(range(rep_min, rep_max + 1, rep_step))


def freqbias_study(
    player: Player,
    bandit: BanditConfig,
    *,
    n_histories: int,
    repetitions: tuple[int, ...],
    seed: int = 0,
    json_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``kdgap freqbias``: the frequency-bias protocol's JSON (written to ``json_out``)."""
    out = run_freqbias(
        player.build(seed=seed), bandit, n_histories=n_histories, repetitions=repetitions,
        seed=seed,
    )  # fmt: skip
    if json_out:
        atomic_write_json(json_out, out)
    return out


def organisms_table(*, json_out: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """``kdgap organisms list``: one row per shipped organism (also written to ``json_out``)."""
    rows = list_organisms()
    if json_out:
        atomic_write_json(json_out, rows)
    return rows


def finetune(
    model: str, out: str | os.PathLike, cfg: CloneConfig | RlftConfig, *, device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``kdgap finetune``: fine-tune ``model`` by cloning (``cfg.method``) or RLFT (an
    :class:`RlftConfig`), resuming from ``out/run/checkpoint``; save it to ``out/model``
    where kdgap loads models from, and write the curves to ``out/curves.json``. Returns
    ``{"model": spec of the result, "curves": ..., "step": ...}``."""
    out = check_out_folder(out)
    if cfg.lora_rank and parse_model_spec(model).kind == "organism":
        raise ValueError(f"lora_rank={cfg.lora_rank} with model={model!r}: LoRA adapts "
                         "Hugging Face models; fine-tune an organism's every weight "
                         "(lora_rank 0).")  # fmt: skip
    session = Session(model, device=device)
    if isinstance(cfg, RlftConfig):
        method, state = "rlft", rlft(session.agent(seed=cfg.seed), cfg, out / "run",
                                     progress=progress)  # fmt: skip
    else:
        method = cfg.method
        state = clone(session.agent(seed=cfg.seed), cfg, out / "run", progress=progress)
    spec = save_finetuned(session.bridge, session.tokenizer, model, out / "model",
                          {"method": method, "updates": state["step"],
                           "lora_rank": cfg.lora_rank})  # fmt: skip
    result = {"model": spec, **state}
    atomic_write_json(out / "curves.json", result)
    return result
