"""One session per model: load it once, choose its transcript format, build agents, play, record."""

from __future__ import annotations

import os
from collections.abc import Sequence

from kdgap.agent.prompts import format_for
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.record import record_store
from kdgap.hooks.store import ActivationStore
from kdgap.models import load_model
from kdgap.policies.play import play
from kdgap.policies.reference import Policy, make_policy


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
) -> Policy:
    """A text agent for a model spec (``organism:NAME``, a local folder, a ``.gguf``...).

    Organisms speak their own transcript language (:class:`OrganismFormat`); every other
    model gets the paper's prompt (:class:`PaperFormat`), with the ``<ucb_values>``
    knowing-doing rationale unless ``knowing_doing=False``.
    """

    loaded = load_model(model_spec, device=device, dtype=dtype)
    fmt = format_for(loaded, knowing_doing=knowing_doing)
    kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    return TextAgent(
        loaded.bridge,
        fmt,
        mode=mode,
        temperature=temperature,
        seed=seed,
        counterfactual=counterfactual,
        **kwargs,
    )


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
) -> ActivationStore:
    """Load a model, play bandit episodes with it, and record the transcripts (``kdgap record``).

    The model plays as a forced-mode :class:`~kdgap.agent.text_agent.TextAgent` in its own
    format (:class:`~kdgap.organisms.transcript.OrganismFormat` for ``organism:`` specs, else
    ``PaperFormat(knowing_doing=True)``); every step record (``episodes * horizon`` of them)
    is then recorded by :func:`record_store`, labels included.

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

    Returns:
        The :class:`~kdgap.hooks.store.ActivationStore` at ``out``; ``[episodes * horizon]``
        examples, model id ``model_spec`` (e.g. ``"organism:faithful"``).
    """

    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes={episodes!r} must be an integer >= 1.")
    policy = None
    if driver != "own":
        try:
            policy = make_policy(driver)
        except ValueError as exc:
            raise ValueError(f"driver={driver!r}: {exc} Or pass driver='own' (on-policy).") from exc

    loaded = load_model(model_spec)
    fmt = format_for(loaded)
    cfg = BanditConfig(n_arms=n_arms, horizon=horizon)
    agent = TextAgent(loaded.bridge, fmt, mode="forced", tokenizer=loaded.tokenizer)
    records = play(agent, cfg, n_episodes=episodes, seed=seed, driver=policy, progress=progress)
    identity = {k: v for k, v in loaded.identity.items() if k != "load_seconds"}
    identity.update(driver=driver, episodes=episodes, horizon=horizon, n_arms=n_arms)
    return record_store(
        loaded.bridge, fmt, records, hooks, sites, out, batch_size=batch_size, dtype=dtype,
        model_id=identity.get("spec", model_spec), seed=seed, tokenizer=loaded.tokenizer,
        progress=progress, model_identity=identity,
    )  # fmt: skip
