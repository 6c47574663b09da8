"""Play episodes of any :class:`~kdgap.policies.reference.Policy` and write step records."""

from __future__ import annotations

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
    policy.reset(cfg, seed)
    if driver is not None:
        driver.reset(cfg, seed)
    records: list[StepRecord] = []
    starts = range(0, n_episodes, batch_size)
    bar = tqdm(total=n_episodes * cfg.horizon, desc=f"play {policy.name}", disable=not progress)
    for start in starts:
        stop = min(start + batch_size, n_episodes)
        episodes = np.arange(first_episode + start, first_episode + stop)
        env = VectorBandit(cfg, len(episodes), first_episode=int(first_episode + start))
        env.reset(seed=seed)
        for _ in range(cfg.horizon):
            hist = history_of(env, episodes)
            labels = _labels(hist)
            dec = policy.act(hist)
            # The reward and regret of the policy's own arm, before the env moves on.
            own_reward, own_regret = env.peek(dec.actions)
            executed = dec.actions if driver is None else driver.act(hist).actions
            env.step(executed)
            for j, ep in enumerate(episodes):
                records.append(
                    StepRecord(
                        episode=int(ep),
                        step=hist.t,
                        n_arms=cfg.n_arms,
                        action=int(dec.actions[j]),
                        reward=float(own_reward[j]),
                        regret=float(own_regret[j]),
                        valid=bool(dec.valid[j]),
                        best_arm=int(env.best_arms[j]),
                        ucb_arms=labels[0][j],
                        greedy_arms=labels[1][j],
                        frequent_arms=labels[2][j],
                        rationale_arm=(
                            None if dec.rationale_arms[j] < 0 else int(dec.rationale_arms[j])
                        ),
                        action_probs=(
                            None
                            if dec.action_probs is None
                            else tuple(float(p) for p in dec.action_probs[j])
                        ),
                        prompt=None if dec.prompts is None else dec.prompts[j],
                        completion=None if dec.completions is None else dec.completions[j],
                        cf_rationale_arm=_extra(dec, "cf_rationale_arms", j),
                        cf_action=_extra(dec, "cf_actions", j),
                        executed_action=None if driver is None else int(executed[j]),
                    )
                )
            bar.update(len(episodes))
    bar.close()
    records.sort(key=lambda r: (r.episode, r.step))
    return records


def _extra(dec: Decisions, key: str, j: int) -> int | None:
    arr = dec.extras.get(key)
    if arr is None or arr[j] < 0:
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
