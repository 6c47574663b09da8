"""Does RLFT get a learning signal on an organism? Action entropy and zero-advantage steps.

RLFT (``kdgap.training.rlft``) learns from differences between the rollouts of a group:
a step whose rollouts all earned the same return has advantage 0 and contributes no
gradient. This script measures, for a shipped organism, (1) how peaked its action is (the
log-probability margin between its chosen arm and the runner-up, forced choice, on its own
play) and (2) the RLFT curves of a short run at the paper's temperature 1, including
``no_signal`` (the share of steps with advantage 0) and the KL to the start.

    python experiments/rlft_signal.py --json experiments/results/rlft_signal.json \
        [--organism seed-calibrated] [--updates 4] [--lr 2e-5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.report.session import Session
from kdgap.training.rlft import RlftConfig, rlft


def action_margins(session: Session, n_episodes: int, horizon: int, seed: int) -> np.ndarray:
    """Per step of the organism's own forced play: log p(chosen arm) - log p(runner-up)."""
    recs = session.play(BanditConfig(horizon=horizon), n_episodes, seed=seed, progress=False)
    logp = np.log(np.clip(np.array([r.action_probs for r in recs]), 1e-300, 1.0))
    top2 = np.sort(logp, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--organism", default="seed-calibrated")
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--lr", type=float, default=RlftConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    session = Session(f"organism:{args.organism}")
    margins = action_margins(session, 16, 50, args.seed)
    cfg = RlftConfig(horizon=50, episodes=8, group=4, updates=args.updates, seed=args.seed,
                     lr=args.lr, ckpt_every=args.updates)  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        state = rlft(session.agent(seed=args.seed), cfg, out, progress=True)
    result = {
        "organism": args.organism,
        "action_logp_margin": {
            "median": float(np.median(margins)),
            "quantiles_5_25_50": np.quantile(margins, [0.05, 0.25, 0.5]).tolist(),
            "n_steps": int(margins.size),
        },  # fmt: skip
        "rlft_config": state["config"],
        "curves": state["curves"],
        "seconds_per_update": (time.perf_counter() - t0) / args.updates,
        "command": "python experiments/rlft_signal.py --json OUT "
        f"--organism {args.organism} --updates {args.updates} --lr {args.lr}",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rlft_config"}, indent=2))
    return result


if __name__ == "__main__":
    main()
