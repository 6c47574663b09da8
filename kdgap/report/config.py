"""Sizes and settings of one ``kdgap analyze`` run (:class:`AnalyzeConfig`), checked on
construction so that a bad setting fails before any model work, and the two size presets
(:data:`SIZES`) that fill the sizes left unset."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kdgap._checks import check_int
from kdgap.agent.prompts import check_rationale_name
from kdgap.hooks.sites import parse_sites
from kdgap.models.spec import ORGANISM_PREFIX
from kdgap.report.session import driver_policy

#: The size presets. ``standard`` fits an organism (a few million parameters) on a laptop
#: CPU in about a minute and any model on a GPU. ``quick`` fits a ~100M-parameter language
#: model on two CPU cores within a quarter of an hour (SmolLM2's run in
#: docs/benchmarks.md): every step there generates up to 128 tokens
#: of rationale one token at a time, so the horizon (sequential steps) sets the wall time,
#: and 20 steps still cover the part of an episode where coverage grows (the seed paper:
#: it stops growing after about 10) and the suffix from step 10 on. Six off-policy bandits
#: are the fewest the probes take: a quarter of the episodes is held out and the rest must
#: fill four cross-validation folds.
SIZES: dict[str, dict[str, int]] = {
    "standard": {"episodes": 16, "horizon": 50, "record_episodes": 24, "n_pairs": 32,
                 "decomposition_steps": 128, "freqbias_histories": 8},
    "quick": {"episodes": 4, "horizon": 20, "record_episodes": 6, "n_pairs": 16,
              "decomposition_steps": 32, "freqbias_histories": 2},
}  # fmt: skip
#: ``AnalyzeConfig.sizes`` values: a preset, or ``auto`` (see :meth:`AnalyzeConfig.for_model`).
SIZE_PRESETS = ("auto", *SIZES)


@dataclass(frozen=True)
class AnalyzeConfig:
    """Sizes and settings of one analysis.

    A size left None takes the value of the ``sizes`` preset (:data:`SIZES`) when a model
    is analysed (:meth:`for_model`); a size given explicitly always wins.

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
        max_new_tokens: the rationale's generation budget per step (None: the agent's
            default, 128 tokens).
        sizes: the preset of the sizes left None: ``"standard"``, ``"quick"`` or
            ``"auto"`` (``quick`` for a language model on the CPU, ``standard`` for an
            organism or any model on an accelerator).
    """

    episodes: int | None = None
    horizon: int | None = None
    record_episodes: int | None = None
    driver: str = "random"
    hooks: str = "resid_post"
    site: str = "action"
    n_pairs: int | None = None
    decomposition_steps: int | None = None
    freqbias_histories: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    aiw: bool = False
    aiw_samples: int = 8
    rationale: str = "model"
    max_new_tokens: int | None = None
    sizes: str = "auto"

    def __post_init__(self) -> None:
        if self.sizes not in SIZE_PRESETS:
            raise ValueError(f"sizes={self.sizes!r} is unknown; pass one of {SIZE_PRESETS}.")
        for name in ("episodes", "record_episodes", "n_pairs", "decomposition_steps",
                     "freqbias_histories"):  # fmt: skip
            check_int(name, getattr(self, name), optional=True)
        check_int("aiw_samples", self.aiw_samples)
        check_int("max_new_tokens", self.max_new_tokens, optional=True)
        # The frequency-bias stage repeats one arm for up to horizon - 10 steps of history.
        check_int("horizon", self.horizon, minimum=10, optional=True,
                  hint="(the frequency-bias protocol needs 10 steps; --steps)")  # fmt: skip
        parse_sites([self.site])  # a malformed site or driver fails here, before model work
        driver_policy(self.driver)
        check_rationale_name(self.rationale)

    def preset_for(self, model: str) -> str:
        """The preset that fills this model's unset sizes (``sizes`` resolved for ``model``)."""
        if self.sizes != "auto":
            return self.sizes
        organism = str(model).startswith(ORGANISM_PREFIX)
        return "standard" if organism or self.device != "cpu" else "quick"

    def for_model(self, model: str) -> AnalyzeConfig:
        """This config with every unset size filled from ``model``'s preset (and ``sizes``
        naming that preset): the settings ``model`` is analysed, keyed and reported with."""
        preset = self.preset_for(model)
        unset = {k: v for k, v in SIZES[preset].items() if getattr(self, k) is None}
        return replace(self, sizes=preset, **unset)
