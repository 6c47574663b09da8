"""Multi-armed bandits (Bernoulli and Gaussian), seeded and vectorised.

Environment facts follow Schmied et al. (2025) / BanditBench (Nie et al. 2024): k in
{5, 10, 20} arms, horizon 50, Gaussian rewards ``r ~ N(mu, sigma)`` with ``mu ~ U(0, 1)``
and ``sigma`` in {0.1, 1, 3}, or Bernoulli rewards. For Bernoulli bandits ``gap=None``
draws ``mu ~ U(0, 1)`` per arm (kdgap's default); ``gap=d`` gives BanditBench's
"hard"/"easy" instances (one best arm at ``0.5 + d/2``, the rest at ``0.5 - d/2``,
d = 0.2 or 0.5).

Seeding: bandit ``i`` of a batch seeded with ``seed`` depends only on ``(seed, i)``, not on
the batch size, so 8 episodes are a prefix of 64. Rewards use *common random numbers*: the
n-th pull of arm a always returns the same reward, so two policies (or a counterfactual
edit) that pull the same arms see the same rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from jaxtyping import Bool, Float, Int

from kdgap._checks import check_int
from kdgap.envs.arms import ARM_STYLES, arm_names
from kdgap.envs.stats import BONUS_FORMS

REWARD_KINDS = ("bernoulli", "gaussian")
#: ``{"counts": [n_envs arms], "sums": [n_envs arms], "t": [n_envs]}``.
Observation = dict[str, np.ndarray]
GAUSSIAN_SIGMAS = (0.1, 1.0, 3.0)


@dataclass(frozen=True)
class BanditConfig:
    """One family of bandit problems.

    Attributes:
        n_arms: number of arms (2-20; the paper uses 5, 10, 20).
        horizon: steps per episode (paper: 50).
        reward: ``"bernoulli"`` or ``"gaussian"``.
        sigma: reward noise of Gaussian bandits (paper: 0.1, 1 or 3).
        gap: Bernoulli only: ``None`` for ``mu ~ U(0, 1)``, else the BanditBench gap.
        arm_style: ``"buttons"`` (colour words) or ``"numbers"``.
        ucb_c, ucb_bonus: the UCB rule that defines the "true UCB arm" label, the UCB
            reference policy and the rule the knowing-doing prompt states (see
            :func:`kdgap.envs.stats.ucb_values`).
    """

    n_arms: int = 5
    horizon: int = 50
    reward: str = "bernoulli"
    sigma: float = 1.0
    gap: float | None = None
    arm_style: str = "buttons"
    ucb_c: float = 0.5
    ucb_bonus: str = "sqrt_log_t_over_n"

    def __post_init__(self) -> None:
        check_int("n_arms", self.n_arms, minimum=2, maximum=20, hint="(paper: 5, 10 or 20)")
        check_int("horizon", self.horizon, hint="(paper: 50)")
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"reward={self.reward!r} is unknown; use one of {REWARD_KINDS}.")
        if self.sigma <= 0:
            raise ValueError(f"sigma={self.sigma!r} must be > 0 (paper: 0.1, 1 or 3).")
        if self.gap is not None and not 0 < self.gap < 1:
            raise ValueError(f"gap={self.gap!r} must be in (0, 1) or None (paper: 0.2, 0.5).")
        if self.arm_style not in ARM_STYLES:
            raise ValueError(f"arm_style={self.arm_style!r} is unknown; use one of {ARM_STYLES}.")
        if self.ucb_bonus not in BONUS_FORMS:
            raise ValueError(f"ucb_bonus={self.ucb_bonus!r} is unknown; use one of {BONUS_FORMS}.")
        if self.ucb_c < 0:
            raise ValueError(f"ucb_c={self.ucb_c!r} must be >= 0.")

    @property
    def arm_names(self) -> tuple[str, ...]:
        """Display names of the arms."""
        return arm_names(self.n_arms, self.arm_style)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the fields."""
        return asdict(self)


def draw_means(cfg: BanditConfig, rng: np.random.Generator) -> Float[np.ndarray, " arms"]:
    """Arm means of one bandit drawn from ``cfg``'s family."""
    if cfg.reward == "bernoulli" and cfg.gap is not None:
        means = np.full(cfg.n_arms, 0.5 - cfg.gap / 2)
        means[rng.integers(cfg.n_arms)] = 0.5 + cfg.gap / 2
        return means
    return rng.uniform(0.0, 1.0, size=cfg.n_arms)


class VectorBandit(gym.vector.VectorEnv):
    """``n_envs`` independent bandits stepped together (Gymnasium vector convention).

    ``reset(seed=s)`` draws bandit ``i`` from ``np.random.default_rng([s, first_episode +
    i])``, so a batch of episodes 64..127 holds the same bandits as episodes 64..127 of one
    big batch; ``step``
    takes an ``[n_envs]`` integer array of arms and returns ``(obs, rewards, terminated,
    truncated, info)``. Observations are the sufficient statistics ``{"counts": [n_envs,
    arms], "sums": [n_envs, arms], "t": [n_envs]}``; the full history is in ``info`` and in
    :attr:`actions` / :attr:`rewards`. Episodes end together after ``cfg.horizon`` steps
    (``truncated`` all True); stepping past the horizon raises.

    Attributes:
        means: ``[n_envs, arms]`` true arm means.
        actions, rewards: ``[n_envs, t]`` history so far.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.DISABLED}

    def __init__(self, cfg: BanditConfig, n_envs: int, *, first_episode: int = 0) -> None:
        check_int("n_envs", n_envs)
        check_int("first_episode", first_episode, minimum=0)
        self.cfg = cfg
        self.first_episode = int(first_episode)
        self.num_envs = n_envs
        k = cfg.n_arms
        self.single_action_space = gym.spaces.Discrete(k)
        self.action_space = gym.spaces.MultiDiscrete(np.full(n_envs, k))
        self.single_observation_space = gym.spaces.Dict(
            {
                "counts": gym.spaces.Box(0, cfg.horizon, (k,), np.int64),
                "sums": gym.spaces.Box(-np.inf, np.inf, (k,), np.float64),
                "t": gym.spaces.Box(0, cfg.horizon, (), np.int64),
            }
        )
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, n_envs)
        self._seeded = False

    # ------------------------------------------------------------------ gym API
    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[Observation, dict[str, Float[np.ndarray, "n_envs arms"]]]:
        """Draw fresh bandits. ``seed`` is required the first time (runs are reproducible)."""
        if seed is None and not self._seeded:
            raise ValueError("seed=None: pass reset(seed=...) so the bandits are reproducible.")
        if seed is not None:
            self._seed = int(seed)
            self._seeded = True
        n, k, h = self.num_envs, self.cfg.n_arms, self.cfg.horizon
        means = np.empty((n, k))
        streams = np.empty((n, k, h))
        for i in range(n):
            rng = np.random.default_rng([self._seed, self.first_episode + i])
            means[i] = draw_means(self.cfg, rng)
            if self.cfg.reward == "bernoulli":
                streams[i] = (rng.random((k, h)) < means[i][:, None]).astype(np.float64)
            else:
                streams[i] = rng.normal(means[i][:, None], self.cfg.sigma, size=(k, h))
        self.means = means
        self._streams = streams
        self.counts = np.zeros((n, k), dtype=np.int64)
        self.sums = np.zeros((n, k))
        self.actions = np.zeros((n, 0), dtype=np.int64)
        self.rewards = np.zeros((n, 0))
        return self._obs(), {"means": means.copy()}

    def step(
        self, actions: Int[np.ndarray, " n_envs"] | Sequence[int]
    ) -> tuple[
        Observation,
        Float[np.ndarray, " n_envs"],
        Bool[np.ndarray, " n_envs"],
        Bool[np.ndarray, " n_envs"],
        dict[str, Float[np.ndarray, " n_envs"]],
    ]:
        """Pull one arm in every bandit; returns ``(obs, rewards, terminated, truncated, info)``."""
        if not hasattr(self, "counts"):
            raise RuntimeError("step() before reset(): call reset(seed=...) first.")
        a = np.asarray(actions, dtype=np.int64).reshape(-1)
        if a.shape != (self.num_envs,):
            raise ValueError(f"actions has shape {a.shape}; expected ({self.num_envs},).")
        if a.min() < 0 or a.max() >= self.cfg.n_arms:
            raise ValueError(f"actions={a.tolist()} contain arms outside 0..{self.cfg.n_arms - 1}.")
        t = self.actions.shape[1]
        if t >= self.cfg.horizon:
            raise RuntimeError(f"the episode ended at horizon={self.cfg.horizon}; call reset().")
        idx = np.arange(self.num_envs)
        r = self._streams[idx, a, self.counts[idx, a]]
        self.counts[idx, a] += 1
        self.sums[idx, a] += r
        self.actions = np.concatenate([self.actions, a[:, None]], axis=1)
        self.rewards = np.concatenate([self.rewards, r[:, None]], axis=1)
        done = np.full(self.num_envs, t + 1 >= self.cfg.horizon)
        terminated = np.zeros(self.num_envs, dtype=bool)
        regret = self.means.max(axis=1) - self.means[idx, a]
        return self._obs(), r, terminated, done, {"regret": regret}

    # ------------------------------------------------------------------ helpers
    def _obs(self) -> Observation:
        t = np.full(self.num_envs, self.actions.shape[1], dtype=np.int64)
        return {"counts": self.counts.copy(), "sums": self.sums.copy(), "t": t}

    def peek(
        self, actions: Int[np.ndarray, " n_envs"] | Sequence[int]
    ) -> tuple[Float[np.ndarray, " n_envs"], Float[np.ndarray, " n_envs"]]:
        """Reward and expected regret that pulling ``actions`` *would* give now, no step.

        Off-policy play uses it to score a policy's arm while another arm is executed.
        """
        a = np.asarray(actions, dtype=np.int64).reshape(-1)
        idx = np.arange(self.num_envs)
        reward = self._streams[idx, a, self.counts[idx, a]]
        return reward, self.means.max(axis=1) - self.means[idx, a]

    @property
    def best_arms(self) -> Int[np.ndarray, " n_envs"]:
        """Index of the highest-mean arm of every bandit."""
        return self.means.argmax(axis=1)
