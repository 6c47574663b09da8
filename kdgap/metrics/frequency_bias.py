"""The frequency-bias protocol (Schmied et al. 2025, sec. 4.2).

A history is a random-policy prefix of 2-10 steps followed by the prefix's last action
repeated ``r`` times (``r`` in 0..100). The policy's distribution over arms is then scored
and split into three classes: *greedy* (best empirical mean among tried arms), *frequent*
(most pulled arm) and *other*. Greedy wins ties with frequent.

kdgap reports class shares as expected probability mass (``F_g`` = mean probability of the
greedy arms, ``F_f`` = of frequent arms that are not greedy, ``F_o`` = the rest). For a
deterministic policy this equals classifying its single choice; for a stochastic one it
avoids an arbitrary tie-break of the argmax. Entropy is in nats.

:func:`build_histories` makes the histories (no model); :func:`summarise` scores the
distributions a policy returned for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from kdgap._checks import check_int
from kdgap.envs.bandit import BanditConfig, VectorBandit
from kdgap.envs.stats import counts_and_sums, greedy_arms, most_frequent_arms

WINDOWS: dict[str, tuple[int, int]] = {"0-10": (0, 10), "45-55": (45, 55), "90-100": (90, 100)}


@dataclass(frozen=True)
class FreqBiasHistory:
    """One protocol history: ``actions``/``rewards`` of length ``prefix_len + repetitions``."""

    episode: int
    prefix_len: int
    repetitions: int
    actions: Int[np.ndarray, " t"]
    rewards: Float[np.ndarray, " t"]


def build_histories(
    cfg: BanditConfig,
    *,
    n_histories: int,
    repetitions: tuple[int, ...] = tuple(range(0, 101, 5)),
    prefix_range: tuple[int, int] = (2, 10),
    seed: int = 0,
) -> list[FreqBiasHistory]:
    """Protocol histories: ``n_histories`` bandits x every repetition count.

    For bandit ``i`` the prefix (length uniform in ``prefix_range``, inclusive; random
    arms) is shared by all repetition counts, so curves over ``r`` compare like with like.
    Rewards come from the bandit's reward stream (common random numbers).

    Args:
        cfg: the bandit family (its horizon is ignored: histories run past it).
        n_histories: number of bandits (>= 1).
        repetitions: repetition counts ``r`` (each in 0..100).
        prefix_range: min and max prefix length (paper: 2-10).
        seed: fixes bandits, prefixes and rewards.

    Returns:
        ``n_histories * len(repetitions)`` histories.
    """
    n_histories = check_int("n_histories", n_histories)
    lo, hi = prefix_range
    if not 1 <= lo <= hi:
        raise ValueError(f"prefix_range={prefix_range!r} must satisfy 1 <= min <= max.")
    if not repetitions or min(repetitions) < 0:
        raise ValueError(f"repetitions={repetitions!r} must be non-empty counts >= 0.")
    horizon = hi + max(repetitions)
    long_cfg = BanditConfig(**{**cfg.to_dict(), "horizon": horizon})
    out = []
    for i in range(n_histories):
        rng = np.random.default_rng([seed, i, 1])
        prefix_len = int(rng.integers(lo, hi + 1))
        prefix = rng.integers(cfg.n_arms, size=prefix_len)
        for r in repetitions:
            actions = np.concatenate([prefix, np.full(r, prefix[-1])]).astype(np.int64)
            env = VectorBandit(long_cfg, 1, first_episode=i)
            env.reset(seed=seed)
            for a in actions:
                env.step(np.array([a]))
            out.append(FreqBiasHistory(i, prefix_len, int(r), actions, env.rewards[0].copy()))
    return out


def class_masses(history: FreqBiasHistory, probs: Float[np.ndarray, " arms"]) -> dict[str, float]:
    """Probability mass on the frequent / greedy / other arms (greedy wins ties)."""
    probs = np.asarray(probs, dtype=np.float64)
    counts, sums = counts_and_sums(history.actions, history.rewards, len(probs))
    greedy = greedy_arms(counts, sums)
    frequent = most_frequent_arms(counts) & ~greedy
    f_g = float(probs[greedy].sum())
    f_f = float(probs[frequent].sum())
    return {"F_f": f_f, "F_g": f_g, "F_o": max(0.0, 1.0 - f_f - f_g)}


def entropy(probs: Float[np.ndarray, "... arms"]) -> Float[np.ndarray, "..."]:
    """Shannon entropy in nats (``0 log 0 = 0``)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def summarise(histories: list[FreqBiasHistory], probs: Float[np.ndarray, "n arms"]) -> dict:
    """F_f / F_g / F_o per repetition window, and entropy against repetitions.

    Args:
        histories: from :func:`build_histories`.
        probs: ``[n_histories, arms]`` the policy's distribution for each history.

    Returns:
        ``{"windows": {"0-10": {"F_f", "F_g", "F_o", "n"}, ...}, "repetitions": [...],
        "entropy": [...] (mean per repetition count), "F_f_curve", "F_g_curve",
        "entropy_repetition_corr": Pearson r of entropy vs repetitions (None if constant)}``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(histories) != len(probs):
        raise ValueError(f"got {len(histories)} histories but {len(probs)} distributions.")
    masses = [class_masses(h, p) for h, p in zip(histories, probs)]
    reps = np.array([h.repetitions for h in histories])
    ent = entropy(probs)
    windows = {}
    for name, (lo, hi) in WINDOWS.items():
        sel = [m for m, r in zip(masses, reps) if lo <= r <= hi]
        windows[name] = {
            key: (float(np.mean([m[key] for m in sel])) if sel else None)
            for key in ("F_f", "F_g", "F_o")
        }
        windows[name]["n"] = len(sel)
    levels = sorted(set(reps.tolist()))
    ent_curve = [float(ent[reps == r].mean()) for r in levels]
    f_curve = {
        key: [float(np.mean([m[key] for m, rr in zip(masses, reps) if rr == r])) for r in levels]
        for key in ("F_f", "F_g", "F_o")
    }
    corr = None
    if np.std(ent) > 0 and np.std(reps) > 0:
        corr = float(np.corrcoef(ent, reps)[0, 1])
    return {
        "windows": windows,
        "repetitions": levels,
        "entropy": ent_curve,
        "F_f_curve": f_curve["F_f"],
        "F_g_curve": f_curve["F_g"],
        "F_o_curve": f_curve["F_o"],
        "entropy_repetition_corr": corr,
    }
