"""Behaviour studies: play a policy or a model, return the public JSON of ``kdgap play``.

This is the report layer for behaviour: it ties environments, policies / agents and
metrics together (the CLI reaches it through :mod:`kdgap.report.api`).

The JSON of :func:`run_play` and :func:`run_freqbias` is the small ``kdgap.play`` schema,
versioned on its own (:data:`PLAY_SCHEMA_VERSION`, independent of ``summary.json``)::

    run_play:     {"schema_version", "policy", <behavior_metrics keys>, "config", "seconds"}
    run_freqbias: {"schema_version", "policy", <frequency_bias.summarise keys>, "config"}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kdgap._checks import check_int
from kdgap.envs.bandit import BanditConfig, VectorBandit
from kdgap.metrics import behavior, frequency_bias, knowing_doing
from kdgap.metrics.frequency_bias import FreqBiasHistory
from kdgap.policies.play import history_of, play
from kdgap.policies.reference import HistoryBatch, Policy
from kdgap.records import StepRecord

#: Version of the ``kdgap.play`` JSON (see the module docstring).
PLAY_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlayConfig:
    """Settings of a behaviour study (defaults: 64 Bernoulli 5-arm bandits x 50 steps).

    Attributes:
        bandit: the bandit family.
        n_episodes: number of bandits.
        seed: one seed for bandits, rewards, sampling.
        batch_size: episodes stepped together (None: all).
        counterfactual: also edit each rationale's conclusion and act again (text agents).
    """

    bandit: BanditConfig = field(default_factory=BanditConfig)
    n_episodes: int = 64
    seed: int = 0
    batch_size: int | None = None
    counterfactual: bool = False

    def __post_init__(self) -> None:
        check_int("n_episodes", self.n_episodes)
        check_int("batch_size", self.batch_size, optional=True)


def behavior_metrics(records: Sequence[StepRecord]) -> dict:
    """The metrics of ``kdgap play`` (means over episodes; shares in [0, 1]).

    Keys: ``cumulative_regret`` (final), ``action_coverage`` (final C_T),
    ``suffix_failure_rate`` (from T/2), ``invalid_rate``, ``rationale_correct``,
    ``action_follows_rationale``, ``action_matches``, ``kd_matrix``,
    ``counterfactual_flip_rate``, and the curves ``coverage_curve`` and ``regret_curve``.
    """
    cov = behavior.coverage_curve(records)
    reg = behavior.regret_curve(records)
    return {
        "cumulative_regret": float(reg[-1]),
        "action_coverage": float(cov[-1]),
        "suffix_failure_rate": behavior.suffix_failure_rate(records),
        "invalid_rate": behavior.invalid_rate(records),
        "rationale_correct": knowing_doing.rationale_correct(records),
        "action_follows_rationale": knowing_doing.action_follows_rationale(records),
        "action_matches": knowing_doing.action_matches(records),
        "kd_matrix": knowing_doing.kd_matrix(records),
        "counterfactual_flip_rate": knowing_doing.counterfactual_flip_rate(records),
        "coverage_curve": cov.tolist(),
        "regret_curve": reg.tolist(),
    }


def run_play(
    policy: Policy, cfg: PlayConfig, *, progress: bool = True
) -> tuple[dict, list[StepRecord]]:
    """Play ``cfg.n_episodes`` episodes with ``policy``; return (JSON dict, records)."""
    t0 = time.perf_counter()
    records = play(
        policy,
        cfg.bandit,
        n_episodes=cfg.n_episodes,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    return play_summary(policy.name, records, cfg, time.perf_counter() - t0), records


def play_summary(
    policy_name: str, records: Sequence[StepRecord], cfg: PlayConfig, seconds: float
) -> dict:
    """The JSON dict of a play (:func:`run_play`) from its records, however they were
    played (in this process or by an executor's workers)."""
    out = {"schema_version": PLAY_SCHEMA_VERSION, "policy": policy_name}
    out.update(behavior_metrics(records))
    out["config"] = {
        "bandit": cfg.bandit.to_dict(),
        "n_episodes": cfg.n_episodes,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "counterfactual": cfg.counterfactual,
    }
    out["seconds"] = seconds
    return out


def run_freqbias(
    policy: Policy,
    bandit: BanditConfig,
    *,
    n_histories: int = 16,
    repetitions: tuple[int, ...] = tuple(range(0, 101, 5)),
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Run the frequency-bias protocol with ``policy`` and summarise it (see metrics)."""
    hists = frequency_bias.build_histories(
        bandit, n_histories=n_histories, repetitions=repetitions, seed=seed
    )
    policy.reset(bandit, seed)
    probs = np.zeros((len(hists), bandit.n_arms))
    # Histories of equal length share one HistoryBatch (one batched model call).
    by_len: dict[int, list[int]] = {}
    for i, h in enumerate(hists):
        by_len.setdefault(len(h.actions), []).append(i)
    long_cfg = BanditConfig(**{**bandit.to_dict(), "horizon": max(by_len)})
    for _length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            batch = _history_batch(long_cfg, [hists[i] for i in chunk])
            probs[chunk] = policy.action_distribution(batch)
    out = {"schema_version": PLAY_SCHEMA_VERSION, "policy": policy.name}
    out.update(frequency_bias.summarise(hists, probs))
    out["config"] = {
        "bandit": bandit.to_dict(),
        "n_histories": n_histories,
        "repetitions": list(repetitions),
        "seed": seed,
    }
    return out


def _history_batch(cfg: BanditConfig, hists: Sequence[FreqBiasHistory]) -> HistoryBatch:
    env = VectorBandit(cfg, len(hists))
    env.reset(seed=0)
    env.actions = np.stack([h.actions for h in hists])
    env.rewards = np.stack([h.rewards for h in hists])
    for i, h in enumerate(hists):
        env.counts[i] = np.bincount(h.actions, minlength=cfg.n_arms)
        env.sums[i] = np.bincount(h.actions, weights=h.rewards, minlength=cfg.n_arms)
    return history_of(env, np.array([h.episode for h in hists]))
