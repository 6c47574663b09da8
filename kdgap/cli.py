"""The ``kdgap`` command line: parses arguments and calls :mod:`kdgap.report.api`, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from kdgap.report.api import (
    DEMO_MODELS,
    EXECUTORS,
    FINETUNE_METHODS,
    SIZE_PRESETS,
    ActivationStore,
    AnalyzeConfig,
    BanditConfig,
    CloneConfig,
    LocalExecutor,
    PlayConfig,
    Player,
    RayExecutor,
    RlftConfig,
    StoreError,
    analyze,
    bandit_config,
    finetune,
    freqbias_study,
    make_executor,
    organisms_table,
    play_study,
    record_from_model,
    render_all,
    repetitions,
)


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


# Which parsed argument fills which parameter of the report API (parameter: argument).
_BANDIT = {"n_arms": "arms", "horizon": "steps", "reward": "reward", "sigma": "sigma",
           "gap": "gap", "arm_style": "arm_style", "ucb_c": "ucb_c"}  # fmt: skip
_PLAYER = {name: name for name in ("policy", "model", "mode", "max_new_tokens", "temperature",
                                   "batch_size", "device", "dtype")}  # fmt: skip
_ANALYZE = {"episodes": "episodes", "horizon": "steps", "record_episodes": "record_episodes",
            "driver": "driver", "n_pairs": "pairs", "seed": "seed", "device": "device",
            "dtype": "dtype", "aiw": "aiw", "aiw_samples": "aiw_samples",
            "rationale": "rationale", "decomposition_steps": "decomposition_steps",
            "freqbias_histories": "freqbias_histories", "sizes": "sizes",
            "max_new_tokens": "max_new_tokens"}  # fmt: skip


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("executor (same results on any executor)")
    g.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: this process; ray: the work spread over Ray actors")  # fmt: skip
    g.add_argument("--workers", type=int, default=2, help="ray: actors per model")
    g.add_argument("--ray-address", default=None, help="ray: a cluster (default: local)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per actor")


def _executor(args: argparse.Namespace) -> LocalExecutor | RayExecutor:
    return make_executor(args.executor, workers=args.workers, address=args.ray_address,
                         gpus_per_worker=args.gpus_per_worker)  # fmt: skip


def _pick(args: argparse.Namespace, table: dict[str, str]) -> dict:
    return {param: getattr(args, arg) for param, arg in table.items()}


def _bandit(args: argparse.Namespace) -> BanditConfig:
    return bandit_config(**_pick(args, _BANDIT))


def _player(args: argparse.Namespace) -> Player:
    return Player(**_pick(args, _PLAYER))


def cmd_play(args: argparse.Namespace) -> int:
    cfg = PlayConfig(bandit=_bandit(args), n_episodes=args.episodes, seed=args.seed,
                     batch_size=args.batch_size, counterfactual=args.counterfactual)  # fmt: skip
    player = _player(args)
    executor = _executor(args) if player.model else None  # policies always play here
    try:
        out = play_study(player, cfg, json_out=args.json, records_out=args.records,
                         executor=executor)  # fmt: skip
    finally:
        if executor is not None:
            executor.close()
    _print_table(out)
    return 0


def cmd_freqbias(args: argparse.Namespace) -> int:
    reps = repetitions(args.rep_min, args.rep_max, args.rep_step)
    out = freqbias_study(
        _player(args), _bandit(args), n_histories=args.histories, repetitions=reps,
        seed=args.seed, json_out=args.json,
    )  # fmt: skip
    for name, w in out["windows"].items():
        print(f"repetitions {name:>7}: F_f={w['F_f']:.3f}  F_g={w['F_g']:.3f}  F_o={w['F_o']:.3f}")
    print(f"corr(entropy, repetitions) = {out['entropy_repetition_corr']}")
    return 0


def cmd_organisms(args: argparse.Namespace) -> int:
    rows = organisms_table(json_out=args.json)
    print(f"{'name':<20}{'rationale':>10}{'follows':>9}{'greedy':>8}{'flip':>7}  "
          f"{'planted: reads':<26}{'kdgap: reads':<26}mechanism")  # fmt: skip
    for row in rows:
        m, t = row["metrics"] or {}, row["truth"] or {}
        greedy = (m.get("action_matches") or {}).get("greedy")
        planted = f"{_num(t.get('planted_share'))} {t.get('planted_verdict') or ''}"
        got = f"{_num(t.get('reading_share'))} {t.get('verdict') or ''}"
        print(
            f"{row['name']:<20}{_num(m.get('rationale_correct')):>10}"
            f"{_num(m.get('action_follows_rationale')):>9}{_num(greedy):>8}"
            f"{_num(m.get('counterfactual_flip_rate')):>7}  {planted:<26.26}{got:<26.26}"
            f"{row['description']}"
        )
    print("(behaviour: 64 Bernoulli 5-arm bandits x 50 steps, greedy forced choice, metrics.json;"
          " planted and measured share of steps reading the rationale: truth.json)")  # fmt: skip
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    executor = _executor(args)
    try:
        store = _record(args, executor)
    finally:
        executor.close()
    print(f"recorded {store.n_examples} examples -> {store.path}")
    return 0


def _record(args: argparse.Namespace, executor: LocalExecutor | RayExecutor) -> ActivationStore:
    return record_from_model(
        args.model, episodes=args.episodes, seed=args.seed, hooks=args.hooks, sites=args.sites,
        out=args.out, driver=args.driver, batch_size=args.batch_size, dtype=args.store_dtype,
        horizon=args.steps, n_arms=args.arms, executor=executor,
    )  # fmt: skip


def _analyze_config(args: argparse.Namespace) -> AnalyzeConfig:
    return AnalyzeConfig(**_pick(args, _ANALYZE))


def cmd_analyze(args: argparse.Namespace) -> int:
    """``analyze`` (one ``--model``) and ``demo`` (several ``--models``) share this."""

    models = list(args.models) if getattr(args, "models", None) else list(args.model)
    cfg = _analyze_config(args)  # settings are checked before Ray or any model starts
    executor = _executor(args)
    try:
        summary = analyze(models, args.out, cfg, force=args.force, executor=executor)
    finally:
        executor.close()
    _print_verdicts(summary, args.out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    # Settings left out take the method's own defaults (RLFT and cloning differ).
    names = {"episodes": "episodes", "horizon": "steps", "updates": "updates", "lr": "lr",
             "lora_rank": "lora_rank", "lora_targets": "lora_targets"}  # fmt: skip
    given = {k: getattr(args, a) for k, a in names.items() if getattr(args, a) is not None}
    rl = dict(group=args.group, temperature=args.temperature, kl_coef=args.kl_coef)
    cl = dict(method=args.method, batch_size=args.batch_size)
    cfg = (RlftConfig(**rl, seed=args.seed, **given) if args.method == "rlft"
           else CloneConfig(**cl, seed=args.seed, **given))  # fmt: skip
    res = finetune(args.model, args.out, cfg, device=args.device)
    c = res["curves"]
    if args.method == "rlft":
        got = f"reward {c['reward'][0]:.3f} -> {c['reward'][-1]:.3f}, KL {c['kl'][-1]:.4f}"
    else:
        got = (f"action matches the expert {c['action_matches_expert'][0]:.2f} -> "
               f"{c['action_matches_expert'][-1]:.2f}")  # fmt: skip
    print(f"{args.method}: {res['step']} updates, {got}; model: {res['model']}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    print(f"wrote {render_all(args.dir)}")
    return 0


def _print_verdicts(summary: dict, out: str) -> None:
    w = max(28, *(len(name) for name in summary["models"]))
    for name, entry in summary["models"].items():
        dec = entry["decomposition"]
        lo, hi = dec.get("reading_share_ci") or (None, None)
        print(
            f"{name:<{w}} verdict={entry['verdict']:<20} "
            f"reads rationale on {_fmt(dec.get('reading_share'))} of steps "
            f"[{_fmt(lo)}, {_fmt(hi)}]  indirect share={_fmt(dec.get('indirect_share'))}"
        )
        if entry.get("verdict_reason"):
            print(f"{'':<{w}} ({entry['verdict_reason']})")
    print(f"report: {out}/report.html  summary: {out}/summary.json")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


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
    _add_executor_args(p)
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

    p = sub.add_parser("organisms", help="list the shipped model organisms")
    p.add_argument("action", nargs="?", default="list", choices=["list"])
    p.add_argument("--json", help="also write the list as JSON")
    p.set_defaults(func=cmd_organisms)

    p = sub.add_parser("record", help="play, then record activations at sites into a store")
    _add_bandit_args(p)
    p.add_argument("--model", required=True, help="organism:NAME, a local folder, a .gguf")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--hooks", default="resid_post", help="e.g. resid_post,attn_out or full names")
    p.add_argument("--sites", default="action,rationale.conclusion", help="comma-separated")
    p.add_argument(
        "--driver",
        default="random",
        help="policy that builds the histories (own = the model's own play)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--store-dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--out", required=True, help="store folder")
    _add_executor_args(p)
    p.set_defaults(func=cmd_record)

    for name, helptext in (
        ("analyze", "the knowing-doing diagnosis of one model: report.html + summary.json"),
        ("demo", "analyze the shipped organisms side by side (the README's main command)"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "analyze":
            p.add_argument(
                "--model",
                required=True,
                action="append",
                help="organism:NAME | local HF folder | .gguf path | smollm2; repeat it to "
                "compare models (the first is the baseline of the report's delta table)",
            )
        else:
            p.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
        p.add_argument("--out", required=True, help="output folder (stages cached here)")
        for flag, what in (("episodes", "bandits, own play"), ("steps", "horizon"),
                           ("record-episodes", "off-policy bandits"),
                           ("pairs", "counterfactual pairs"),
                           ("decomposition-steps", "steps of the mediation decomposition "
                            "(it decides the verdict)"),
                           ("freqbias-histories", "bandits per repetition count in the "
                            "frequency-bias protocol")):  # fmt: skip
            p.add_argument(f"--{flag}", type=int, default=None, help=f"{what}; default: --sizes")
        p.add_argument(
            "--sizes", default="auto", choices=SIZE_PRESETS,
            help="preset of the sizes not given: standard (16 bandits x 50 steps, ...), quick "
            "(4 x 20, ...; fits a ~100M-parameter model on 2 CPU cores), auto: quick for a "
            "language model on the CPU, standard for organisms and on GPUs",
        )  # fmt: skip
        p.add_argument("--driver", default="random", help="policy building off-policy histories")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help="rationale tokens per step at most (default: 128)")  # fmt: skip
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (all GPUs)")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--force", action="store_true", help="recompute every stage")
        p.add_argument("--aiw", action="store_true", help="also run the Alice-in-Wonderland study")
        p.add_argument("--aiw-samples", type=int, default=8, help="AIW samples per prompt")
        p.add_argument(
            "--rationale", default="model", choices=("model", "scripted"),
            help="model: the model writes its rationale; scripted: kdgap writes the correct "
            "UCB rationale (paper format) and the model only acts",
        )  # fmt: skip
        _add_executor_args(p)
        p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("finetune", help="fine-tune a model toward the UCB expert; save it")
    p.add_argument("--method", required=True, choices=FINETUNE_METHODS)
    p.add_argument("--model", required=True, help="organism:NAME | local HF folder | ...")
    p.add_argument("--out", required=True, help="folder: run/ (checkpoints), model/, curves")
    for name, kind, what in (("episodes", int, "bandits (expert play; per RLFT update)"),
                             ("steps", int, "horizon"), ("updates", int, "optimiser rounds"),
                             ("lr", float, "learning rate"), ("lora-rank", int, "LoRA rank, "
                             "Hugging Face models (0: every weight)"), ("lora-targets", str,
                             "LoRA modules, comma-separated")):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what}; default: the method's")
    p.add_argument("--batch-size", type=int, default=CloneConfig.batch_size, help="cloning")
    rl = (("group", int, "rollouts per bandit"), ("temperature", float, "sampling temperature"),
          ("kl-coef", float, "KL penalty to the start"))  # fmt: skip
    for name, kind, what in rl:
        default = getattr(RlftConfig, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=kind, default=default, help=f"rlft: {what}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("figures", help="re-render figures and report.html from saved results")
    p.add_argument("dir", help="a folder written by analyze or demo")
    p.set_defaults(func=cmd_figures)
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
    except (ValueError, FileNotFoundError, KeyError, StoreError, ImportError) as err:
        # User errors get one clear line, not a traceback from deep inside.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kdgap {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
