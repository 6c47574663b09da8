"""Training samples for an organism: one bandit step per sequence, as token ids.

A chunk of ``n`` samples is made by rolling out ``n`` Bernoulli bandits to the horizon
with a *behaviour policy* per episode, then cutting each episode at one step ``t``:

    <bos> history[:t] think <rationale of step t> act <rule's arm> <eos>

Behaviour policies (so the organism sees the histories it will produce itself, and
others): ``own`` (the mechanism's rule with the true UCB rationale: what a perfect
organism plays), ``own-noisy`` (the same with a random arm on ``noise`` of the steps),
``random`` and ``ucb``. Steps are drawn with ``p(t) ∝ t + t_offset``: long histories,
where counting is hardest (rationale errors concentrate late in an episode, see
``rationale_correct_by_step`` in a shipped organism's ``metrics.json``), are seen more.

Labels come from :mod:`kdgap.envs.stats` (the same functions the runner labels records
with). At the error rate of the mechanism the conclusion is replaced by a random wrong
arm, the loss on that word is set to 0, and the action is the rule applied to the wrong
arm. Everything is a pure function of ``(seed, chunk)``: a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from jaxtyping import Float, Int

from kdgap._checks import check_int
from kdgap.envs.bandit import BanditConfig, VectorBandit
from kdgap.organisms.language import ACT, BOS, EOS, PAD, THINK, UCB, OrganismLanguage
from kdgap.organisms.mechanisms import Mechanism, true_ucb_arm
from kdgap.policies.play import history_of
from kdgap.policies.reference import HistoryBatch

BEHAVIOURS = ("own", "own-noisy", "random", "ucb")
# Training bandits use seeds offset from the small seeds evaluation uses, so the
# organism is never scored on a bandit it was trained on.
TRAIN_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class DataConfig:
    """How training samples are drawn.

    Attributes:
        n_arms, horizon, ucb_c: the bandit family (Bernoulli, ``mu ~ U(0, 1)``) and the UCB
            rule the rationale states (``mean + ucb_c * sqrt(ln t / N)``).
        behaviour: weights of ``BEHAVIOURS`` (own, own-noisy, random, ucb).
        noise: random-arm share of ``own-noisy`` episodes.
        t_offset: steps are drawn with ``p(t) ∝ t + t_offset``.
        action_weight: loss weight of the conclusion and action words (1 for the rest).
    """

    n_arms: int = 5
    horizon: int = 50
    ucb_c: float = 0.5
    behaviour: tuple[float, float, float, float] = (0.5, 0.2, 0.15, 0.15)
    noise: float = 0.2
    t_offset: float = 10.0
    action_weight: float = 2.0

    def __post_init__(self) -> None:
        OrganismLanguage(self.n_arms, self.horizon)  # validates n_arms and horizon
        if len(self.behaviour) != len(BEHAVIOURS) or min(self.behaviour) < 0:
            raise ValueError(
                f"behaviour={self.behaviour!r} must be {len(BEHAVIOURS)} weights >= 0 "
                f"for {BEHAVIOURS}."
            )
        if sum(self.behaviour) <= 0:
            raise ValueError(f"behaviour={self.behaviour!r} must have a positive weight.")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise={self.noise!r} must be in [0, 1].")
        if self.t_offset <= 0:
            raise ValueError(f"t_offset={self.t_offset!r} must be > 0 (p(t) ∝ t + t_offset).")
        if self.action_weight <= 0:
            raise ValueError(f"action_weight={self.action_weight!r} must be > 0.")
        if self.ucb_c < 0:
            raise ValueError(f"ucb_c={self.ucb_c!r} must be >= 0.")

    @property
    def language(self) -> OrganismLanguage:
        """The transcript language of this bandit shape."""
        return OrganismLanguage(self.n_arms, self.horizon)

    @property
    def bandit(self) -> BanditConfig:
        """The bandit family (Bernoulli, colour buttons)."""
        return BanditConfig(n_arms=self.n_arms, horizon=self.horizon, ucb_c=self.ucb_c)

    def to_dict(self) -> dict:
        """JSON-friendly dict of the fields."""
        return {**asdict(self), "behaviour": list(self.behaviour)}


@dataclass
class Samples:
    """``n`` training sequences, right-padded with ``<pad>``.

    Attributes:
        tokens: ``[n, L]`` token ids.
        weights: ``[n, L]`` loss weight of predicting ``tokens[:, p]`` (0 on the prompt,
            the padding and an injected wrong conclusion).
        t: ``[n]`` step of each sample (history length).
        ucb_arm: ``[n]`` true UCB arm (lowest tie index).
        written: ``[n]`` conclusion written in the sample (``!= ucb_arm`` where injected or
            where the mechanism's ``conclusion_rule`` plants an error).
        action: ``[n]`` the rule's arm.
        injected: ``[n]`` whether the conclusion was replaced by a wrong arm.
    """

    tokens: Int[np.ndarray, "n L"]
    weights: Float[np.ndarray, "n L"]
    t: Int[np.ndarray, " n"]
    ucb_arm: Int[np.ndarray, " n"]
    written: Int[np.ndarray, " n"]
    action: Int[np.ndarray, " n"]
    injected: Int[np.ndarray, " n"]


def make_samples(
    mechanism: Mechanism, cfg: DataConfig, n: int, *, seed: int, chunk: int = 0
) -> Samples:
    """Draw ``n`` samples, a pure function of ``(seed, chunk)``.

    Args:
        mechanism: the planted action rule and its rationale-error rate.
        cfg: the data recipe.
        n: samples (= episodes rolled out), >= 1.
        seed: run seed; chunk: index of this chunk within the run (>= 0).

    Returns:
        :class:`Samples` with ``tokens``/``weights`` of shape ``[n, max length]``.
    """
    n = check_int("n", n)
    chunk = check_int("chunk", chunk, minimum=0)
    lang, bcfg, k, h = cfg.language, cfg.bandit, cfg.n_arms, cfg.horizon
    rng = np.random.default_rng([int(seed), int(chunk), 7])
    env = VectorBandit(bcfg, n, first_episode=int(chunk) * n)
    env.reset(seed=TRAIN_SEED_OFFSET + int(seed))
    episodes = np.arange(chunk * n, chunk * n + n)

    probs = np.asarray(cfg.behaviour, dtype=np.float64) / sum(cfg.behaviour)
    behaviour = rng.choice(len(BEHAVIOURS), size=n, p=probs)
    weights_t = np.arange(h) + cfg.t_offset
    t_pick = rng.choice(h, size=n, p=weights_t / weights_t.sum())

    counts = np.zeros((n, k), np.int64)
    wins = np.zeros((n, k), np.int64)
    ucb = np.zeros(n, np.int64)
    written = np.zeros(n, np.int64)
    action = np.zeros(n, np.int64)
    injected = np.zeros(n, np.int64)
    swapped = np.full((n, 2), -1, np.int64)  # arms whose written statistics were swapped
    idx = np.arange(n)
    for t in range(int(t_pick.max()) + 1):
        hist = history_of(env, episodes)
        true = true_ucb_arm(hist)
        # The conclusion the organism learns to write (planted errors included).
        conclusion = true if mechanism.conclusion_rule is None else mechanism.conclusion_rule(hist)
        inject = rng.random(n) < mechanism.rationale_error_rate
        # A uniformly random *other* arm: shift by 1..k-1 modulo k.
        wrong = (conclusion + rng.integers(1, k, size=n)) % k
        wr = np.where(inject, wrong, conclusion)
        at = t_pick == t
        rule_hist, pair = _written_statistics(mechanism, hist, rng)
        if at.any():
            counts[at] = rule_hist.counts[at] if pair is not None else hist.counts[at]
            wins[at] = np.rint((rule_hist if pair is not None else hist).sums[at]).astype(np.int64)
            if pair is not None:
                swapped[at] = pair[at]
            ucb[at], written[at] = true[at], wr[at]
            injected[at] = inject[at]
            reads = rule_hist if mechanism.reads_statistics else hist
            action[at] = np.asarray(mechanism.rule(reads, wr), dtype=np.int64)[at]
        own = np.asarray(mechanism.rule(hist, conclusion), dtype=np.int64)
        rand = rng.integers(0, k, size=n)
        noisy = np.where(rng.random(n) < cfg.noise, rand, own)
        beh = np.choose(behaviour, [own, noisy, rand, true])
        env.step(beh)

    # ---- token ids, built directly (a test checks they equal the tokenizer's).
    v = lang.vocab
    name_id = np.array([v[a] for a in lang.arm_names])
    hist_base = v[f"{lang.arm_names[0]}0"]  # history words are laid out arm-major: a0, a1
    num_base = v["0"]
    hist_ids = hist_base + 2 * env.actions + np.rint(env.rewards).astype(np.int64)
    rat = np.empty((n, 3 * k), np.int64)
    rat[:, 0::3] = name_id[None, :]
    rat[:, 1::3] = num_base + counts
    rat[:, 2::3] = num_base + wins
    tail = np.stack(
        [np.full(n, v[UCB]), name_id[written], np.full(n, v[ACT]), name_id[action],
         np.full(n, v[EOS])], axis=1,
    )  # fmt: skip
    lengths = np.array([lang.seq_len(int(t)) for t in t_pick])
    L = int(lengths.max())
    tokens = np.full((n, L), v[PAD], np.int64)
    weights = np.zeros((n, L), np.float32)
    for i in idx:
        t = int(t_pick[i])
        seq = np.concatenate([[v[BOS]], hist_ids[i, :t], [v[THINK]], rat[i], tail[i]])
        tokens[i, : len(seq)] = seq
        first = t + 2  # the first rationale word follows bos, t history words and think
        weights[i, first : len(seq)] = 1.0
        for arm in swapped[i][swapped[i] >= 0]:  # swapped statistics: no loss on them
            weights[i, first + 3 * arm + 1 : first + 3 * arm + 3] = 0.0
        concl, act = len(seq) - 4, len(seq) - 2
        weights[i, concl] = 0.0 if injected[i] else cfg.action_weight
        weights[i, act] = cfg.action_weight
    return Samples(tokens, weights, t_pick.astype(np.int64), ucb, written, action, injected)


def _written_statistics(
    mechanism: Mechanism, hist: HistoryBatch, rng: np.random.Generator
) -> tuple[HistoryBatch, Int[np.ndarray, "n 2"] | None]:
    """The statistics the rationale writes: the history's, with two random arms' swapped at
    ``mechanism.statistics_error_rate``. Returns ``(history with the written counts and
    sums, [n, 2] swapped arms or -1)``; ``(hist, None)`` at rate 0, drawing nothing, so the
    data stream of a mechanism without swaps does not depend on this option."""
    if mechanism.statistics_error_rate == 0:
        return hist, None
    n, k = hist.counts.shape
    swap = rng.random(n) < mechanism.statistics_error_rate
    a = rng.integers(0, k, size=n)
    b = (a + rng.integers(1, k, size=n)) % k
    counts, sums = hist.counts.copy(), hist.sums.copy()
    rows = np.nonzero(swap)[0]
    counts[rows, a[rows]], counts[rows, b[rows]] = (
        hist.counts[rows, b[rows]],
        hist.counts[rows, a[rows]],
    )
    sums[rows, a[rows]], sums[rows, b[rows]] = hist.sums[rows, b[rows]], hist.sums[rows, a[rows]]
    pair = np.where(swap[:, None], np.stack([a, b], axis=1), -1)
    return replace(hist, counts=counts, sums=sums), pair


def sort_into_batches(samples: Samples, batch_size: int) -> list[Int[np.ndarray, " batch"]]:
    """Index arrays of batches with similar lengths (less padding), in length order.

    Args:
        samples: a chunk; batch_size: samples per batch (the last batch may be smaller).

    Returns:
        A list of ``[<= batch_size]`` index arrays covering every sample once.
    """
    order = np.argsort(samples.t, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
