"""Play episodes of any :class:`~kdgap.policies.reference.Policy` and write step records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm

from kdgap._checks import check_int
from kdgap.envs.bandit import BanditConfig, VectorBandit
from kdgap.envs.stats import greedy_arms, most_frequent_arms, ucb_arms
from kdgap.policies.reference import Decisions, HistoryBatch, Policy
from kdgap.records import StepRecord, mask_to_arms


def history_of(env: VectorBandit, episodes: Int[np.ndarray, " n"]) -> HistoryBatch:
    """The current :class:`HistoryBatch` of a vector bandit."""
    return HistoryBatch(
        cfg=env.cfg,
        actions=env.actions.copy(),
        rewards=env.rewards.copy(),
        counts=env.counts.copy(),
        sums=env.sums.copy(),
        episodes=episodes,
    )


@dataclass(frozen=True)
class Group:
    """Episodes played in lockstep with others (:func:`play_together`).

    Attributes:
        n_episodes: number of episodes.
        first_episode: index of the first (see :func:`play`).
        driver: a policy whose arms are executed instead (off-policy histories; see
            :func:`play`), or None (the policy's own arms).
        counterfactual: keep the policy's counterfactual fields in the records (False:
            ``cf_rationale_arm`` and ``cf_action`` stay None, as from a policy without them).
    """

    n_episodes: int
    first_episode: int = 0
    driver: Policy | None = None
    counterfactual: bool = True


def play(
    policy: Policy,
    cfg: BanditConfig,
    *,
    n_episodes: int,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    driver: Policy | None = None,
    first_episode: int = 0,
) -> list[StepRecord]:
    """Play ``n_episodes`` bandits of family ``cfg`` with ``policy``.

    Episodes run in batches of ``batch_size`` (default: all at once), stepped together so a
    language-model policy generates for the whole batch. Episode ``i`` is the same bandit
    with the same rewards whatever the batch size (see :class:`VectorBandit`).

    With a ``driver``, the histories are *off-policy*: the driver's arms are executed and
    build the history, while ``policy`` still decides (writes its rationale and action) at
    every step and its decision is what the record holds (``action``, ``regret``; the
    ``reward`` is the one its arm would have paid, by common random numbers;
    ``executed_action`` is the driver's arm). Analyses need this when a policy's own
    trajectories are degenerate: an organism that always acts greedily and never explores
    pulls one arm forever, and a probe cannot learn "action" from a constant label.

    Args:
        policy: a reference policy or a text agent.
        cfg: the bandit family.
        n_episodes: number of episodes (>= 1).
        seed: fixes bandits, rewards and the policy's randomness.
        batch_size: episodes per batch (>= 1; None: all at once).
        progress: show a tqdm bar over steps.
        driver: a policy whose arms are executed instead (off-policy histories).
        first_episode: index of the first episode: ``play(..., n_episodes=n,
            first_episode=k)`` returns exactly the records of episodes ``k .. k + n - 1`` of
            a larger run (bandits, rewards and every seeded draw depend on the episode
            index), which is how an executor splits one run across workers.

    Returns:
        ``n_episodes * cfg.horizon`` records, ordered by episode then step.
    """
    n_episodes = check_int("n_episodes", n_episodes)
    batch_size = check_int("batch_size", batch_size, optional=True) or n_episodes
    first_episode = check_int("first_episode", first_episode, minimum=0)
    groups = [Group(min(batch_size, n_episodes - start), first_episode + start, driver)
              for start in range(0, n_episodes, batch_size)]  # fmt: skip
    # One batch after another: each batch is a lockstep of one group.
    with _bar(policy, n_episodes * cfg.horizon, progress) as bar:
        return [r for g in groups for r in _lockstep(policy, cfg, [g], seed, bar)[0]]


def play_together(
    policy: Policy, cfg: BanditConfig, groups: Sequence[Group], *, seed: int = 0,
    progress: bool = True,
) -> list[list[StepRecord]]:  # fmt: skip
    """Play several groups of episodes in lockstep: one ``policy.act`` per step for all.

    The records of each group are those of :func:`play` with the group's settings and the
    same ``seed`` (every draw depends on the seed and the episode index, not on the batch),
    but a language model generates one batch per step instead of one per group: its steps
    are sequential, so two plays of one model take about the time of one.

    Returns:
        ``[records]`` per group, as :func:`play` orders them.
    """
    for g in groups:
        check_int("n_episodes", g.n_episodes)
        check_int("first_episode", g.first_episode, minimum=0)
    total = sum(g.n_episodes for g in groups) * cfg.horizon
    with _bar(policy, total, progress) as bar:
        return _lockstep(policy, cfg, list(groups), seed, bar)


def _bar(policy: Policy, total: int, progress: bool) -> tqdm:
    return tqdm(total=total, desc=f"play {policy.name}", disable=not progress)


def _lockstep(
    policy: Policy, cfg: BanditConfig, groups: list[Group], seed: int, bar: tqdm
) -> list[list[StepRecord]]:
    """Step every group's bandits together; ``[records]`` per group."""
    policy.reset(cfg, seed)
    envs, eps = [], []
    for g in groups:
        if g.driver is not None:
            g.driver.reset(cfg, seed)
        env = VectorBandit(cfg, g.n_episodes, first_episode=g.first_episode)
        env.reset(seed=seed)
        envs.append(env)
        eps.append(np.arange(g.first_episode, g.first_episode + g.n_episodes))
    out: list[list[StepRecord]] = [[] for _ in groups]
    for _ in range(cfg.horizon):
        hists = [history_of(env, e) for env, e in zip(envs, eps)]
        dec = policy.act(hists[0] if len(hists) == 1 else _concat(hists))
        lo = 0
        for g, env, hist, records in zip(groups, envs, hists, out):
            rows = slice(lo, lo + hist.n)
            lo += hist.n
            actions = dec.actions[rows]
            # The reward and regret of the policy's own arm, before the env moves on.
            own_reward, own_regret = env.peek(actions)
            executed = actions if g.driver is None else g.driver.act(hist).actions
            env.step(executed)
            labels = _labels(hist)
            for j in range(hist.n):
                k = rows.start + j
                records.append(
                    StepRecord(
                        episode=int(hist.episodes[j]),
                        step=hist.t,
                        n_arms=cfg.n_arms,
                        action=int(actions[j]),
                        reward=float(own_reward[j]),
                        regret=float(own_regret[j]),
                        valid=bool(dec.valid[k]),
                        best_arm=int(env.best_arms[j]),
                        ucb_arms=labels[0][j],
                        greedy_arms=labels[1][j],
                        frequent_arms=labels[2][j],
                        rationale_arm=(
                            None if dec.rationale_arms[k] < 0 else int(dec.rationale_arms[k])
                        ),
                        action_probs=(
                            None
                            if dec.action_probs is None
                            else tuple(float(p) for p in dec.action_probs[k])
                        ),
                        prompt=None if dec.prompts is None else dec.prompts[k],
                        completion=None if dec.completions is None else dec.completions[k],
                        cf_rationale_arm=_extra(dec, "cf_rationale_arms", k, g.counterfactual),
                        cf_action=_extra(dec, "cf_actions", k, g.counterfactual),
                        executed_action=None if g.driver is None else int(executed[j]),
                    )
                )
            bar.update(hist.n)
    for records in out:
        records.sort(key=lambda r: (r.episode, r.step))
    return out


def _concat(hists: list[HistoryBatch]) -> HistoryBatch:
    """The histories of several groups at the same step as one batch."""
    return HistoryBatch(
        cfg=hists[0].cfg,
        **{k: np.concatenate([getattr(h, k) for h in hists])
           for k in ("actions", "rewards", "counts", "sums", "episodes")},
    )  # fmt: skip


def _extra(dec: Decisions, key: str, j: int, keep: bool = True) -> int | None:
    arr = dec.extras.get(key)
    if not keep or arr is None or arr[j] < 0:
        return None
    return int(arr[j])


def _labels(hist: HistoryBatch) -> tuple[list, list, list]:
    cfg = hist.cfg
    u = ucb_arms(hist.counts, hist.sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)
    g = greedy_arms(hist.counts, hist.sums)
    f = most_frequent_arms(hist.counts)
    return (
        [mask_to_arms(m) for m in u],
        [mask_to_arms(m) for m in g],
        [mask_to_arms(m) for m in f],
    )
