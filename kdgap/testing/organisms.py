"""Activation stores of the shipped model organisms, for probes, tests and benchmarks.

An organism's own play is useless for probing "doing": a bypass organism acts greedily,
never explores, and pulls one arm forever, so ``action`` is a constant label. The
transcripts here are therefore *off-policy*: a driver policy (uniform random by default)
picks the executed arm, while the organism writes its rationale and its action at every
step (:func:`kdgap.policies.play.play` with ``driver=``). Histories are then varied, the
rationale arm, greedy arm and most-frequent arm come apart often, and the disagreement
subset is large enough to measure.

:func:`coin_flip_organism` trains a tiny organism whose action is a fair coin
(:data:`COIN_FLIP`): the starting point on which RL fine-tuning must learn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int
from transformer_lens.model_bridge import TransformerBridge

from kdgap._checks import check_int
from kdgap.envs import BanditConfig
from kdgap.envs.transcript_format import TranscriptFormat
from kdgap.hooks import ActivationStore
from kdgap.organisms.data import DataConfig
from kdgap.organisms.mechanisms import Mechanism
from kdgap.organisms.train import TrainConfig, train_organism
from kdgap.policies.reference import HistoryBatch
from kdgap.records import StepRecord, read_records, write_records
from kdgap.report.session import Session


@dataclass
class OrganismData:
    """An organism, its format, off-policy step records and their activation store."""

    name: str
    model: TransformerBridge
    fmt: TranscriptFormat
    records: list[StepRecord]
    store: ActivationStore

    def behaviour(self) -> dict:
        """Shares of steps where the action equals the rationale, greedy, UCB, frequent arm."""
        lab = self.store.labels
        a = lab["action"].to_numpy()

        def share(col: str) -> float:
            v = lab[col].astype("Float64").fillna(-1).to_numpy(dtype=float)
            return float(np.mean(a == v))

        return {
            "steps": len(lab),
            "action_is_rationale": share("rationale_arm"),
            "action_is_greedy": share("greedy_arm"),
            "action_is_ucb": share("ucb_arm"),
            "action_is_frequent": share("frequent_arm"),
            "rationale_is_ucb": float(
                np.mean(
                    lab["rationale_arm"].astype("Float64").fillna(-1).to_numpy(float)
                    == lab["ucb_arm"].to_numpy()
                )  # fmt: skip
            ),
            "action_counts": {str(k): int(v) for k, v in lab["action"].value_counts().items()},
        }


def organism_store(
    name: str,
    out: str | os.PathLike,
    *,
    n_episodes: int = 64,
    horizon: int = 50,
    seed: int = 0,
    driver: str = "random",
    hooks: str = "resid_post",
    sites: str = "action",
    progress: bool = False,
) -> OrganismData:
    """Play ``name`` off-policy and record ``hooks`` at ``sites`` into the store at ``out``.

    The organism is loaded, played and recorded through one
    :class:`~kdgap.report.session.Session`. The records are cached as
    ``<out>/records.jsonl`` and the store as ``<out>/store``; a
    second call with the same arguments reuses both (the store's own resume check
    refuses a different set of transcripts).

    Args:
        name: a shipped organism (``"faithful"``, ``"greedy-bypass"``, ...) or folder.
        out: cache directory for this organism and configuration.
        n_episodes, horizon, seed: the play (``BanditConfig(horizon=horizon)``).
        driver: reference policy executing the arms (``"random"``, ``"ucb"``, ...).
        hooks, sites: recorded hook and site specs (see :func:`kdgap.hooks.record_store`).
        progress: show progress bars.

    Returns:
        :class:`OrganismData`.
    """

    check_int("n_episodes", n_episodes, minimum=2, hint="(probes split by episode)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    session = Session(f"organism:{name}")
    rpath = out / "records.jsonl"
    if rpath.exists():
        records = read_records(rpath)
    else:
        records = session.play(BanditConfig(horizon=horizon), n_episodes, seed=seed,
                               driver=driver, progress=progress)  # fmt: skip
        write_records(rpath, records)
    expected = n_episodes * horizon
    if len(records) != expected:
        raise ValueError(f"{rpath} holds {len(records)} records, not n_episodes * horizon = "
                         f"{expected}; delete {out} or pass the arguments it was made "
                         "with.")  # fmt: skip
    store = session.record(records, hooks, sites, out / "store", seed=seed, progress=progress)
    return OrganismData(name=name, model=session.bridge, fmt=session.fmt, records=records,
                        store=store)  # fmt: skip


def coin_flip_rule(
    history: HistoryBatch, rationale_arms: Int[np.ndarray, " n"]
) -> Int[np.ndarray, " n"]:
    """A uniformly random arm per (episode, step), drawn from a generator seeded by both:
    nothing in the transcript predicts it, so an organism trained on it acts on a fair
    coin whatever its rationale says (the cross-entropy optimum of an unpredictable target
    is the uniform distribution). Returns ``[n]``."""
    k = history.cfg.n_arms
    return np.array([np.random.default_rng([int(e), history.t, 7]).integers(k)
                     for e in history.episodes], dtype=np.int64)  # fmt: skip


#: Writes the correct UCB rationale, then acts at random: an agent whose action has all
#: the entropy a policy gradient needs and ignores the rationale that would raise its reward.
COIN_FLIP = Mechanism("coin-flip", coin_flip_rule, rationale_error_rate=0.0,
                      description="correct rationale, uniformly random action")  # fmt: skip


def coin_flip_organism(
    out: str | os.PathLike, *, n_arms: int = 2, horizon: int = 8, samples: int = 16_384,
    seed: int = 0,
) -> Path:  # fmt: skip
    """Train a tiny :data:`COIN_FLIP` organism (2 layers, width 32; about 15 s on 2 CPU
    cores at the defaults) into ``out``; returns the folder (``organism:<folder>`` loads it)."""
    cfg = TrainConfig(samples=samples, batch_size=64, lr=3e-3, d_model=32, n_layers=2,
                      n_heads=4, d_mlp=128, chunk=4096, eval_every=10**6, ckpt_every=10**6,
                      eval_samples=64, data=DataConfig(n_arms=n_arms, horizon=horizon))  # fmt: skip
    return train_organism(COIN_FLIP, out, seed=seed, config=cfg, progress=False)
