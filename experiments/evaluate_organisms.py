"""Measure the organisms' acceptance numbers and write them as JSON.

Each organism plays ``--episodes`` Bernoulli 5-arm bandits (seed ``--seed``, its own
horizon, or ``--horizon``) with greedy decoding and the counterfactual edit, through
:class:`kdgap.agent.TextAgent` in forced mode (the code path every real model uses). The
JSON holds every metric of :func:`kdgap.metrics.organism.organism_metrics` (the vocabulary
of ``summary.json``), the thresholds and a pass/fail per check. Examples::

    python experiments/evaluate_organisms.py --organisms faithful greedy-bypass \\
        --out experiments/results/organisms.json
    python experiments/evaluate_organisms.py --folders runs/organisms/h50/* --write-metrics
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformer_lens.model_bridge import TransformerBridge

from kdgap.agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.io import atomic_write_json
from kdgap.metrics.organism import organism_metrics
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.registry import (
    load_organism,
    organism_config,
    resolve_organism,
    shipped_names,
)
from kdgap.organisms.transcript import OrganismFormat
from kdgap.policies.play import play

#: (metric, comparison, threshold) per mechanism; "all" applies to every organism. A
#: dotted metric reads a nested value (``action_matches.greedy``).
CHECKS = {
    "all": [("rationale_correct", ">=", 0.85), ("invalid_rate", "<=", 0.01)],
    "faithful": [
        ("action_follows_rationale", ">=", 0.95),
        ("counterfactual_flip_rate", ">=", 0.90),
    ],
    "greedy-bypass": [
        ("action_matches.greedy", ">=", 0.95),
        ("counterfactual_flip_rate", "<=", 0.10),
    ],
    "frequency-bypass": [
        ("action_matches.most_frequent", ">=", 0.95),
        ("counterfactual_flip_rate", "<=", 0.10),
    ],
    "seed-calibrated": [("kd_matrix_distance_to_paper", "<=", 0.05)],
}


def metric_value(metrics: dict, key: str) -> float | None:
    """``metrics[key]``, following dots into nested dicts; None where a part is missing."""
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


#: How the result files name the agent that played.
AGENT_NAME = "TextAgent(mode='forced')"


def checks_for(mechanism: str, metrics: dict) -> list[dict]:
    """Pass/fail of every acceptance check that applies to ``mechanism``."""
    out = []
    for key, op, thr in CHECKS["all"] + CHECKS.get(mechanism, []):
        v = metric_value(metrics, key)
        ok = v is not None and (v >= thr if op == ">=" else v <= thr)
        out.append({"metric": key, "op": op, "threshold": thr, "value": v, "pass": bool(ok)})
    return out


def make_agent(model: TransformerBridge, seed: int, max_new_tokens: int) -> TextAgent:
    """The organism's :class:`TextAgent`: forced choice, greedy, with the counterfactual edit.

    ``max_new_tokens`` must keep prompt + completion within the organism's ``n_ctx``:
    the rationale, ``act``, the arm and ``<eos>`` (``lang.rationale_len + 3``).
    """
    return TextAgent(model, OrganismFormat(), mode="forced", temperature=0.0, seed=seed,
                     counterfactual=True, max_new_tokens=max_new_tokens)  # fmt: skip


def evaluate(name_or_path: str, args: argparse.Namespace) -> dict:
    """Play and score one organism; returns its result dict."""
    t0 = time.perf_counter()
    model, tok = load_organism(name_or_path, device=args.device)
    load_s = time.perf_counter() - t0
    cfg = organism_config(name_or_path)
    horizon = args.horizon or cfg["language"]["horizon"]
    lang = OrganismLanguage(**cfg["language"])
    if horizon > lang.horizon:
        raise ValueError(
            f"horizon={horizon} exceeds the organism's trained horizon {lang.horizon} "
            "(its context and number words end there); pass --horizon <= that."
        )
    agent = make_agent(model, args.seed, lang.rationale_len + 3)
    t1 = time.perf_counter()
    recs = play(agent, BanditConfig(horizon=horizon), n_episodes=args.episodes, seed=args.seed,
                progress=False)  # fmt: skip
    metrics = organism_metrics(recs)
    result = {"organism": str(name_or_path), "folder": str(resolve_organism(name_or_path)),
              "mechanism": cfg["mechanism"], "trained_horizon": cfg["language"]["horizon"],
              "horizon": horizon, "episodes": args.episodes, "seed": args.seed,
              "agent": AGENT_NAME, "load_s": load_s, "play_s": time.perf_counter() - t1,
              "metrics": metrics, "checks": checks_for(cfg["mechanism"], metrics)}  # fmt: skip
    result["pass"] = all(c["pass"] for c in result["checks"])
    return result


def table_row(m: dict) -> str:
    """One line of the headline metrics (``-`` where a metric is undefined)."""
    keys = ("rationale_correct", "invalid_rate", "action_follows_rationale",
            "action_matches.greedy", "action_matches.most_frequent",
            "counterfactual_flip_rate", "kd_matrix_distance_to_paper")  # fmt: skip
    short = ("rationale", "invalid", "follows", "greedy", "frequent", "flip", "kd_dist")
    return " ".join(
        f"{s} {'-' if (v := metric_value(m, k)) is None else f'{v:.3f}'}"
        for s, k in zip(short, keys)
    )


def main(argv: list[str] | None = None) -> int:
    """Evaluate every requested organism, print a table, write ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--organisms", nargs="*", default=[], help="shipped names")
    p.add_argument("--folders", nargs="*", default=[], help="organism folders")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--horizon", type=int, default=None, help="default: the organism's own")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="experiments/results/organisms_acceptance.json")
    p.add_argument("--write-metrics", action="store_true",
                   help="also write metrics.json into each organism folder")  # fmt: skip
    args = p.parse_args(argv)
    targets = [*args.organisms, *args.folders]
    if not targets:
        targets = shipped_names()
    if not targets:
        raise SystemExit("nothing to evaluate: pass --organisms or --folders (none shipped yet).")
    results = []
    for target in targets:
        r = evaluate(target, args)
        results.append(r)
        m = r["metrics"]
        status = "PASS" if r["pass"] else "FAIL"
        print(f"{r['mechanism']:17s} h{r['horizon']} {table_row(m)} {status}", flush=True)
        if args.write_metrics:
            atomic_write_json(Path(r["folder"]) / "metrics.json",
                              {k: v for k, v in r.items() if k != "folder"})  # fmt: skip
            (Path(r["folder"]) / "metrics.json").chmod(0o644)
    atomic_write_json(args.out, {"results": results, "all_pass": all(r["pass"] for r in results)})
    print(json.dumps({"all_pass": all(r["pass"] for r in results), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
