"""An in-memory activation store with planted signals, for tests and benchmarks.

:class:`SyntheticStore` satisfies :class:`kdgap.probes.dataset.ActivationSource`. Its label
table comes from :func:`bandit_labels` (faithful or greedy-bypass agents), and its
activations are Gaussian noise plus, for each :class:`Plant`, a fixed random direction per
class of a label added at chosen layers. Ground truth is therefore known: a label planted
from layer 2 on is decodable from layer 2 on and nowhere before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from kdgap.probes.dataset import layer_of


@dataclass(frozen=True)
class Plant:
    """Add ``strength * e[label_value]`` to the activations of ``layers`` (None = all).

    ``e`` holds one random unit direction per class (fixed by the store's seed and the
    label name). ``label="episode"`` plants an episode-identity fingerprint instead.
    """

    label: str
    strength: float = 1.0
    layers: Sequence[int] | None = None
    sites: Sequence[str] | None = None


def bandit_labels(
    *,
    n_episodes: int = 64,
    n_steps: int = 50,
    n_arms: int = 5,
    mode: str = "faithful",
    p_disagree: float = 0.3,
    p_missing: float = 0.02,
    seed: int = 0,
) -> pd.DataFrame:
    """A label table like a recorded run's (one row per step), with a known policy.

    ``mode="faithful"``: the action is the rationale's arm. ``mode="greedy-bypass"``: on a
    fraction ``p_disagree`` of steps the action is the greedy arm instead (the
    disagreement subset is where that differs from the rationale's arm). The rationale's
    arm is the UCB arm 90% of the time and missing (NA) with probability ``p_missing``.
    ``reward`` is a fair coin per step (the reward-history control task's surface
    feature, :func:`kdgap.probes.control.reward_history`), drawn from its own stream so
    the other labels do not depend on it.
    """
    if mode not in ("faithful", "greedy-bypass"):
        raise ValueError(f"mode={mode!r}: use 'faithful' or 'greedy-bypass'.")
    rng = np.random.default_rng(seed)
    n = n_episodes * n_steps
    ucb = rng.integers(0, n_arms, n)
    greedy = rng.integers(0, n_arms, n)
    frequent = np.where(rng.random(n) < 0.5, greedy, rng.integers(0, n_arms, n))
    rationale = np.where(rng.random(n) < 0.9, ucb, rng.integers(0, n_arms, n))
    bypass = (rng.random(n) < p_disagree) if mode == "greedy-bypass" else np.zeros(n, bool)
    action = np.where(bypass, greedy, rationale)
    missing = rng.random(n) < p_missing
    table = pd.DataFrame(
        {
            "episode": np.repeat(np.arange(n_episodes), n_steps),
            "step": np.tile(np.arange(n_steps), n_episodes),
            "action": action,
            "rationale_arm": pd.array(np.where(missing, -1, rationale), dtype="Int64"),
            "ucb_arm": ucb,
            "greedy_arm": greedy,
            "frequent_arm": frequent,
        }
    )
    table.loc[missing, "rationale_arm"] = pd.NA
    table["reward"] = np.random.default_rng([seed, 1]).integers(0, 2, n).astype(float)
    table["rationale_correct"] = (table["rationale_arm"] == table["ucb_arm"]).astype("boolean")
    table["action_class"] = np.where(action == ucb, "optimal",
                                     np.where(action == greedy, "greedy", "other"))  # fmt: skip
    table["model"], table["seed"] = f"synthetic:{mode}", seed
    return table


class SyntheticStore:
    """In-memory :class:`~kdgap.probes.dataset.ActivationSource` with planted signals.

    Args:
        labels: label table (e.g. from :func:`bandit_labels`).
        n_layers: hooks are ``blocks.{l}.hook_resid_post`` for ``l < n_layers``.
        d_model: activation width.
        plants: signals to plant.
        sites: site names (each site gets independent noise).
        noise: standard deviation of the isotropic noise.
        seed: seed of directions and noise.
    """

    def __init__(
        self,
        labels: pd.DataFrame,
        *,
        n_layers: int = 4,
        d_model: int = 32,
        plants: Sequence[Plant] = (),
        sites: Sequence[str] = ("action",),
        noise: float = 1.0,
        seed: int = 0,
    ):
        self._labels = labels.reset_index(drop=True)
        self._hooks = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        self._sites = list(sites)
        rng = np.random.default_rng(seed)
        n = len(self._labels)
        self._acts: dict[tuple[str, str], torch.Tensor] = {}
        for site in self._sites:
            for hook in self._hooks:
                self._acts[(hook, site)] = noise * rng.standard_normal((n, d_model))
        for i, plant in enumerate(plants):
            if plant.label not in self._labels.columns:
                raise KeyError(f"Plant label={plant.label!r} is not a column of labels.")
            values = self._labels[plant.label].astype("Int64").fillna(-1).to_numpy(np.int64)
            n_values = int(values.max()) + 1
            dirs = np.random.default_rng([seed, i]).standard_normal((n_values, d_model))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            signal = np.where(values[:, None] >= 0, dirs[np.maximum(values, 0)], 0.0)
            for (hook, site), acts in self._acts.items():
                if plant.layers is not None and layer_of(hook) not in plant.layers:
                    continue
                if plant.sites is not None and site not in plant.sites:
                    continue
                acts += plant.strength * signal
        self._acts = {k: torch.tensor(v, dtype=torch.float32) for k, v in self._acts.items()}

    @property
    def hooks(self) -> list[str]:
        return list(self._hooks)

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    @property
    def labels(self) -> pd.DataFrame:
        return self._labels.copy()

    def load(
        self, hook: str, site: str
    ) -> tuple[Float[torch.Tensor, "n_examples d_model"], pd.DataFrame]:
        """``(acts: Float[Tensor, "n_examples d_model"], labels)`` at ``hook``/``site``."""
        if (hook, site) not in self._acts:
            raise KeyError(
                f"hook={hook!r}, site={site!r} not recorded; hooks: {self._hooks}, "
                f"sites: {self._sites}."
            )
        return self._acts[(hook, site)].clone(), self._labels.copy()
