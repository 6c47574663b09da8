"""Confirm kdgap's real-model path on a GPU in a few minutes and print a short table.

Loads the model once (a :class:`kdgap.report.session.Session`, bfloat16 by default), checks
batched generation against plain Hugging Face greedy decoding token for token, then runs
every stage of ``kdgap analyze --model MODEL --aiw`` at small sizes on that model, one
table row per stage (behaviour, baselines, frequency bias, recording, probes, patching,
Alice in Wonderland). Run through ``experiments/gpu_check.sh``::

    experiments/gpu_check.sh                      # smollm2 preset on cuda, bfloat16
    experiments/gpu_check.sh /path/to/hf_folder   # any spec load_model accepts
    experiments/gpu_check.sh smollm2 --device cpu --dtype float32 --episodes 2 --tokens 8

The stage files are written as ``kdgap analyze`` writes them, to ``--out`` (default: a
temporary folder, removed at the end).

Exit status: 0 when every stage passed, 1 when one failed, 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdgap.agent.generation import generate
from kdgap.models.tokens import encode
from kdgap.report.pipeline import Analysis, AnalyzeConfig
from kdgap.report.session import Session

#: A stage that needs another one's result is skipped when that one failed.
NEEDS = {"probes": "record"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="kdgap GPU check")
    ap.add_argument("model", nargs="?", default="smollm2", help="a kdgap model spec")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke test)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="prompts in the generation check")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens in the generation check")
    ap.add_argument("--episodes", type=int, default=4, help="bandits of the model's own play")
    ap.add_argument("--steps", type=int, default=12, help="steps per bandit")
    ap.add_argument("--record-episodes", type=int, default=8, help="off-policy bandits")
    ap.add_argument("--pairs", type=int, default=4, help="counterfactual pairs")
    ap.add_argument("--aiw-samples", type=int, default=2, help="AIW samples per prompt")
    ap.add_argument("--out", type=Path, default=None, help="keep the stage files here")
    return ap.parse_args(argv)


def check_device(device: str) -> str | None:
    """None when ``device`` is usable, else the reason (checked before anything loads)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (
                f"--device {device}: torch {torch.__version__} sees no CUDA device "
                f"(torch.version.cuda={torch.version.cuda}). Install a CUDA build of torch on "
                "a GPU machine, or pass --device cpu --dtype float32 for a CPU smoke test."
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist."
    elif device != "cpu":
        return f"--device {device!r} is unknown; use cuda, cuda:N or cpu."
    return None


def generation_check(session: Session, batch: int, tokens: int) -> tuple[str, bool]:
    """Batched generation speed, and greedy tokens equal to plain Hugging Face ``generate``."""
    b, tok = session.bridge, session.tokenizer
    qs = [f"Count from {i} to {i + 20}, separated by commas." for i in range(batch)]
    if getattr(tok, "chat_template", None):
        qs = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                      add_generation_prompt=True) for q in qs]  # fmt: skip
    t0 = time.perf_counter()
    g = generate(b, qs, max_new_tokens=tokens)
    tps = int(g.n_tokens.sum()) / (time.perf_counter() - t0)
    ids = torch.tensor([encode(b, qs[:1])[0]], device=b.cfg.device)
    with torch.no_grad():
        want = b.original_model.generate(
            ids, max_new_tokens=tokens, do_sample=False, use_cache=True,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
    got = g.token_ids[0]
    n = min(len(got), len(want))
    same = sum(a == b_ for a, b_ in zip(got[:n], want[:n]))
    return f"{tps:.0f} tok/s (batch {batch}); vs HF greedy {same}/{n} tokens", same == n


def stage_line(name: str, result: object) -> tuple[str, bool]:
    """One table cell for a stage's result, and whether it looks sound."""

    def f(v: object) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    if name == "behavior":
        return (f"rationale correct {f(result['rationale_correct'])}, follows "
                f"{f(result['action_follows_rationale'])}, invalid "
                f"{f(result['invalid_rate'])}"), True  # fmt: skip
    if name == "baselines":
        return f"regret ucb {f(result['ucb']['cumulative_regret'])}", True
    if name == "freqbias":
        return f"corr(entropy, repetitions) {result['entropy_repetition_corr']}", True
    if name == "record":
        acts, _ = result.load(hook=result.hooks[-1], site=result.sites[0])
        acts = torch.as_tensor(acts).float()
        ok = bool(torch.isfinite(acts).all())
        return f"{result.n_examples} examples, {len(result.hooks)} hooks, finite={ok}", ok
    if name == "probes":
        return f"doing acc, last layer {f(result['doing_acc'][-1])}", True
    if name == "patching":
        return f"mediated fraction {f(result['mediated_fraction'])}", True
    rates = {pt: f(e["correct_rate"]) for pt, e in result["summary"].items()}
    return f"correct {rates}", True


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    reason = check_device(args.device)
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    rows: list[tuple[str, float, str, bool]] = []

    def run(name: str, fn: Callable[[], tuple[str, bool]]) -> bool:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            result, ok = fn()
        except Exception as e:  # noqa: BLE001 - one failed stage is a table row, not a crash
            result, ok = f"{type(e).__name__}: {str(e)[:120]}", False
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - t0, result, ok))
        print(f"  {name}: {'ok' if ok else 'FAILED'} ({rows[-1][1]:.1f} s)", flush=True)
        return ok

    print(f"gpu_check: {args.model} on {args.device} ({args.dtype})", flush=True)
    state: dict = {}

    def load() -> tuple[str, bool]:
        s = state["session"] = Session(args.model, device=args.device, dtype=args.dtype)
        dt = {str(p.dtype) for p in s.bridge.parameters()}
        ident = s.identity
        return f"{ident.get('architecture')} {ident.get('n_params', 0) / 1e6:.0f}M {dt}", True

    if run("load", load):
        run("generate", lambda: generation_check(state["session"], args.batch, args.tokens))
        cfg = AnalyzeConfig(
            episodes=args.episodes, horizon=args.steps, record_episodes=args.record_episodes,
            n_pairs=args.pairs, freqbias_histories=1, aiw=True, aiw_samples=args.aiw_samples,
            device=args.device, dtype=args.dtype,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            analysis = Analysis(args.model, args.out or tmp, cfg, session=state["session"])
            stages = {"behavior": analysis.behavior, "baselines": analysis.baselines,
                      "freqbias": analysis.freqbias, "record": analysis.activations,
                      "probes": analysis.probes, "patching": analysis.patching,
                      "aiw": analysis.aiw}  # fmt: skip
            failed: set[str] = set()
            for name, fn in stages.items():
                if NEEDS.get(name) in failed:
                    rows.append((name, 0.0, f"skipped: {NEEDS[name]} failed", False))
                    failed.add(name)
                elif not run(name, lambda name=name, fn=fn: stage_line(name, fn())):
                    failed.add(name)
    print()
    print(f"| {'stage':<14}| {'seconds':>8} | {'ok':<3}| result")
    print(f"|{'-' * 15}|{'-' * 10}|{'-' * 4}|{'-' * 40}")
    for name, secs, result, ok in rows:
        print(f"| {name:<14}| {secs:8.1f} | {'yes' if ok else 'NO':<3}| {result}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name()})")  # fmt: skip
    return 0 if len(rows) == 9 and all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
