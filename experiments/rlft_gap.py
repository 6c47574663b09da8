"""Does RLFT close the seed-calibrated organism's gap? Before/after play with bootstrap
intervals, and how often its rollouts ever try acting on the rationale.

1. **Before/after**: the start and the fine-tuned model each play the same 64 seeded
   bandits x 50 steps (forced choice, greedy decoding: the behaviour stage's play).
   Per episode: cumulative regret and the share of steps whose action is the rationale's
   arm. Means with 95% bootstrap intervals over episodes, and the paired difference
   (same bandits, resampled together).
2. **Exploration**: policy-gradient RL can only reinforce an action its rollouts sample.
   The start plays at temperature 1 (rationales sampled as in RLFT's rollouts) and, on
   every *gap step* (correct rationale, a different arm chosen), we read the probability
   it gives the rationale's arm. Their sum per step, times the steps of one RLFT update
   (episodes x group x horizon), is the expected number of rollouts per update that act on
   a correct rationale the model would otherwise overrule: the only samples that can teach
   RLFT to close the gap. The same measure on a tiny organism that acts on a fair coin
   (``kdgap.testing.organisms.COIN_FLIP``, on which RLFT does learn: tests/training)
   gives the contrast.

    python experiments/rlft_gap.py --tuned organism:seed-calibrated-rlft \
        --json experiments/results/rlft_gap.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.probes.stats import cluster_bootstrap
from kdgap.records import StepRecord
from kdgap.report.session import Session
from kdgap.testing.organisms import coin_flip_organism
from kdgap.training.rlft import RlftConfig


def per_episode(records: list[StepRecord]) -> dict[str, np.ndarray]:
    """Cumulative regret and the follows-rationale share of every episode."""
    eps = sorted({r.episode for r in records})
    regret = np.array([sum(r.regret for r in records if r.episode == e) for e in eps])
    follows = np.array([np.mean([r.valid and r.action == r.rationale_arm
                                 for r in records if r.episode == e]) for e in eps])  # fmt: skip
    return {"cumulative_regret": regret, "follows_rationale": follows}


def exploration(spec: str, cfg: BanditConfig, n_episodes: int, seed: int) -> dict:
    """On the gap steps of a temperature-1 play: the probability of the rationale's arm."""
    recs = Session(spec).play(cfg, n_episodes, seed=seed, temperature=1.0, progress=False)
    gap = [r for r in recs if r.rationale_arm is not None and r.rationale_arm in r.ucb_arms
           and r.action != r.rationale_arm]  # fmt: skip
    p = np.array([r.action_probs[r.rationale_arm] for r in gap])
    return {
        "steps": len(recs),
        "gap_steps": len(gap),
        "p_rationale_arm_on_gap_steps": {
            "median": float(np.median(p)) if len(p) else None,
            "mean": float(p.mean()) if len(p) else None,
            "max": float(p.max()) if len(p) else None,
        },
        # Expected rollouts acting on an overruled correct rationale, per step played.
        "follow_samples_per_step": float(p.sum() / len(recs)),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--start", default="organism:seed-calibrated")
    ap.add_argument("--tuned", required=True, help="the RLFT model (e.g. its finetune --out/model)")
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = BanditConfig(horizon=args.horizon)
    per = {m: per_episode(Session(m).play(cfg, args.episodes, seed=args.seed, progress=False))
           for m in (args.start, args.tuned)}  # fmt: skip
    compared = {}
    for metric in ("cumulative_regret", "follows_rationale"):
        a, b = per[args.start][metric], per[args.tuned][metric]
        compared[metric] = {}
        for name, x in (("start", a), ("tuned", b), ("delta", b - a)):
            # Each episode one cluster: a percentile interval over resampled episodes.
            est = cluster_bootstrap(x, np.arange(len(x)), n_boot=2000, seed=args.seed)
            compared[metric] |= {name: est.value, f"{name}_ci": [est.low, est.high]}
    rl = RlftConfig()
    per_update = rl.episodes * rl.group * rl.horizon
    explore = {"start": exploration(args.start, cfg, 16, args.seed)}
    explore["start"]["follow_samples_per_rlft_update"] = (
        explore["start"]["follow_samples_per_step"] * per_update
    )
    with tempfile.TemporaryDirectory() as tmp:
        coin = coin_flip_organism(Path(tmp) / "coin-flip")
        explore["coin_flip"] = exploration(f"organism:{coin}", BanditConfig(n_arms=2, horizon=8,
                                           gap=0.8), 64, args.seed)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {
        "start": args.start,
        "tuned": args.tuned,
        "episodes": args.episodes,
        "horizon": args.horizon,
        "compared": compared,
        "exploration": explore,
        "rlft_steps_per_update": per_update,
        "seconds": time.perf_counter() - t0,
        "setup": {
            "torch_threads": torch.get_num_threads(),
            "host": platform.node(),
            "torch": torch.__version__,
            "commit": commit,
        },  # fmt: skip
        "command": "python experiments/rlft_gap.py " + " ".join(argv or []),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("compared", "exploration")}, indent=2))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
