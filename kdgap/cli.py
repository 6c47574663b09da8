"""The ``kdgap`` command line: parses arguments and calls the report layer, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from kdgap.envs.bandit import BanditConfig
from kdgap.records import atomic_write_json, write_records


def _add_bandit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bandit")
    g.add_argument("--arms", type=int, default=5, help="number of arms (5, 10, 20)")
    g.add_argument("--steps", type=int, default=50, help="horizon (steps per episode)")
    g.add_argument("--reward", default="bernoulli", help="bernoulli | gaussian")
    g.add_argument("--sigma", type=float, default=1.0, help="Gaussian reward noise")
    g.add_argument("--gap", type=float, default=None, help="Bernoulli gap (default mu~U(0,1))")
    g.add_argument("--arm-style", default="buttons", help="buttons | numbers")
    g.add_argument("--ucb-c", type=float, default=0.5, help="UCB exploration coefficient")
    g.add_argument("--seed", type=int, default=0, help="one seed for bandits and sampling")


def _add_agent_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--policy", help="reference policy: ucb, greedy, epsilon-greedy, random")
    src.add_argument(
        "--model",
        help="organism:NAME, organism:PATH, a local Hugging Face folder, a .gguf file, "
        "or a preset such as smollm2",
    )
    g = p.add_argument_group("language-model agent")
    g.add_argument("--mode", default="forced", help="forced (score arms) | free (parse ACTION=)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument("--batch-size", type=int, default=None, help="episodes stepped together")
    g.add_argument("--device", default="cpu", help="cpu | cuda")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _bandit(args) -> BanditConfig:
    return BanditConfig(
        n_arms=args.arms,
        horizon=args.steps,
        reward=args.reward,
        sigma=args.sigma,
        gap=args.gap,
        arm_style=args.arm_style,
        ucb_c=args.ucb_c,
    )


def _policy(args, *, counterfactual: bool = False):
    from kdgap.study import make_agent, reference_policy

    if args.model:
        return make_agent(
            args.model,
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            counterfactual=counterfactual,
        )
    return reference_policy(args.policy or "ucb")


def cmd_play(args) -> int:
    from kdgap.study import PlayConfig, run_play

    cfg = PlayConfig(
        bandit=_bandit(args),
        n_episodes=args.episodes,
        seed=args.seed,
        batch_size=args.batch_size,
        counterfactual=args.counterfactual,
    )
    out, records = run_play(_policy(args, counterfactual=args.counterfactual), cfg)
    if args.json:
        atomic_write_json(args.json, out)
    if args.records:
        write_records(args.records, records)
    _print_table(out)
    return 0


def cmd_freqbias(args) -> int:
    from kdgap.study import run_freqbias

    reps = tuple(range(args.rep_min, args.rep_max + 1, args.rep_step))
    out = run_freqbias(
        _policy(args), _bandit(args), n_histories=args.histories, repetitions=reps, seed=args.seed
    )
    if args.json:
        atomic_write_json(args.json, out)
    for name, w in out["windows"].items():
        print(f"repetitions {name:>7}: F_f={w['F_f']:.3f}  F_g={w['F_g']:.3f}  F_o={w['F_o']:.3f}")
    print(f"corr(entropy, repetitions) = {out['entropy_repetition_corr']}")
    return 0


def _print_table(out: dict) -> None:
    rows = [
        ("policy", out["policy"]),
        ("cumulative regret", out["cumulative_regret"]),
        ("action coverage", out["action_coverage"]),
        ("suffix failure rate", out["suffix_failure_rate"]),
        ("invalid rate", out["invalid_rate"]),
        ("rationale correct", out["rationale_correct"]),
        ("action follows rationale", out["action_follows_rationale"]),
        ("counterfactual flip rate", out["counterfactual_flip_rate"]),
    ]
    for key, value in rows:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<26}{text}")
    if out["kd_matrix"]:
        print(json.dumps(out["kd_matrix"], indent=1))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kdgap`` command."""
    parser = argparse.ArgumentParser(
        prog="kdgap",
        description="Why do LLM agents fail to act on their own reasoning? "
        "Bandits, model organisms, recording, probes and patching.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("play", help="play bandits with a policy or a model; write metrics JSON")
    _add_bandit_args(p)
    _add_agent_args(p)
    p.add_argument("--episodes", type=int, default=64, help="number of bandits")
    p.add_argument("--counterfactual", action="store_true", help="edit rationales, act again")
    p.add_argument("--json", help="write the metrics JSON here")
    p.add_argument("--records", help="write step records (JSON lines) here")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("freqbias", help="run the frequency-bias protocol")
    _add_bandit_args(p)
    _add_agent_args(p)
    p.add_argument("--histories", type=int, default=16, help="bandits per repetition count")
    p.add_argument("--rep-min", type=int, default=0)
    p.add_argument("--rep-max", type=int, default=100)
    p.add_argument("--rep-step", type=int, default=5)
    p.add_argument("--json", help="write the results JSON here")
    p.set_defaults(func=cmd_freqbias)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdgap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # User errors get one clear line, not a traceback from deep inside.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kdgap {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
