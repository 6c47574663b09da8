"""Sizes and settings of one ``kdgap analyze`` run (:class:`AnalyzeConfig`), checked on
construction so that a bad setting fails before any model work."""

from __future__ import annotations

from dataclasses import dataclass

from kdgap._checks import check_int
from kdgap.agent.prompts import check_rationale_name
from kdgap.hooks.sites import parse_sites
from kdgap.report.session import driver_policy


@dataclass(frozen=True)
class AnalyzeConfig:
    """Sizes and settings of one analysis (defaults fit a laptop CPU in about a minute).

    Attributes:
        episodes: bandits in the behaviour study (the model's own play).
        horizon: steps per bandit (organisms are trained for 50).
        record_episodes: bandits of off-policy transcripts for recording, probes and
            patching (the model decides at every step, ``driver`` builds the history).
        driver: reference policy that builds the off-policy histories.
        hooks: hook spec recorded at every layer.
        site: where probes read the residual stream.
        n_pairs: counterfactual pairs for the conclusion- and history-edit patching.
        decomposition_steps: steps of the mediation decomposition (history -> rationale
            -> action), which decides the verdict.
        freqbias_histories: bandits per repetition count in the frequency-bias protocol.
        seed: one seed for everything.
        device, dtype: where and how the model runs.
        aiw: also run the Alice-in-Wonderland study (a chat model's reasoning check).
        aiw_samples: AIW samples per variation and prompt type.
        rationale: ``"model"`` (the model writes its rationale) or ``"scripted"`` (kdgap
            writes the correct UCB rationale in the model's turn and the model only acts:
            "do you act on a rationale you are given?", for any model).
    """

    episodes: int = 16
    horizon: int = 50
    record_episodes: int = 24
    driver: str = "random"
    hooks: str = "resid_post"
    site: str = "action"
    n_pairs: int = 32
    decomposition_steps: int = 128
    freqbias_histories: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    aiw: bool = False
    aiw_samples: int = 8
    rationale: str = "model"

    def __post_init__(self) -> None:
        for name in ("episodes", "record_episodes", "n_pairs", "decomposition_steps",
                     "freqbias_histories", "aiw_samples"):  # fmt: skip
            check_int(name, getattr(self, name))
        # The frequency-bias stage repeats one arm for up to horizon - 10 steps of history.
        check_int("horizon", self.horizon, minimum=10,
                  hint="(the frequency-bias protocol needs 10 steps; --steps)")  # fmt: skip
        parse_sites([self.site])  # a malformed site or driver fails here, before model work
        driver_policy(self.driver)
        check_rationale_name(self.rationale)
