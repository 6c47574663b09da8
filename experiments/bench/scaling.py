"""Benchmark: one organism analysis on Ray workers vs the single-process path.

The analysis is the model work that scales out: the behaviour play (the model's own
bandits), the off-policy transcripts and their recording, and the patching stage, of
``kdgap analyze`` with its default sizes on a shipped organism. It runs on the
single-process path (``--executor local``, one torch thread) and on 1 and 2 local Ray
workers (one torch thread each; one variant runs at a time), interleaved, each repeat in a
fresh output folder; times are wall-clock medians. Actors start (and load the model)
before the timed runs, once per worker count: that one-off cost is reported apart
(``actor_start_seconds``).

    python experiments/bench/scaling.py --json OUT [--organism faithful] [--repeats 3]

Keys: ``speedup_2_workers`` = single-process time / 2-worker time; ``speedup_1_worker``
the same for one worker (Ray's overhead); ``max_abs_diff``: the largest difference
between any number of the stages' results, or any recorded activation, on Ray and on the
single-process path (0: identical); ``seconds`` per variant (medians) and ``runs`` (every repeat).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.report.executor import LocalExecutor, RayExecutor
from kdgap.report.pipeline import Analysis, AnalyzeConfig
from kdgap.report.session import Session

#: Result keys that hold wall times or paths, not results.
VOLATILE = ("seconds", "path")


def numbers(obj, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a stage result, by its path (times and paths left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in VOLATILE:
                out.update(numbers(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def run(spec: str, executor, cfg: AnalyzeConfig) -> tuple[float, dict[str, float], dict]:
    """``(seconds, numbers, activations)`` of behaviour + transcripts/recording + patching,
    in a fresh folder (``activations``: every recorded (hook, site) tensor)."""
    with tempfile.TemporaryDirectory() as out:
        analysis = Analysis(spec, Path(out), cfg, executor=executor)
        analysis.session  # noqa: B018 - loaded before the clock starts, as every variant
        t0 = time.perf_counter()
        analysis.play_ahead()  # as Analysis.run: both plays at once, in lockstep
        behavior, store, patching = analysis.behavior(), analysis.activations(), analysis.patching()
        seconds = time.perf_counter() - t0
        labels = store.labels
        acts = {(h, st): store.load(h, st)[0] for h in store.hooks for st in store.sites}
    flat = numbers({"behavior": behavior, "patching": patching})
    flat.update({f"record.{c}[{i}]": float(x) for c in ("example", "action")
                 for i, x in enumerate(labels[c])})  # fmt: skip
    return seconds, flat, acts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--organism", default="faithful")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import ray

    torch.set_num_threads(1)
    # 3 actors live at once (1 + 2 workers) but only one variant runs at a time: the
    # logical CPUs cover the actors, the machine's 2 cores the work.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    spec, cfg = f"organism:{args.organism}", AnalyzeConfig()
    session = Session(spec)
    variants = {"single_process": LocalExecutor()}
    start = {}
    for n in (1, 2):
        t0 = time.perf_counter()
        ex = RayExecutor(n, threads=1)
        # Actors load the model on their first task: a one-episode-each play starts them.
        ex.play(session, BanditConfig(horizon=2), n)
        start[n] = time.perf_counter() - t0
        variants[f"{n}_workers"] = ex
    runs: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, dict[str, float]] = {}
    acts: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, ex in variants.items():  # interleaved: load drifts hit every variant
            seconds, results[name], acts[name] = run(spec, ex, cfg)
            runs[name].append(seconds)
    ref = results["single_process"]
    diffs = [
        abs(results[name][k] - v) if k in results[name] else float("inf")
        for name in variants for k, v in ref.items()
    ]  # fmt: skip
    diffs += [float("inf") for name in variants if results[name].keys() != ref.keys()]
    diffs += [float((acts[name][k] - t).abs().max()) for name in variants
              for k, t in acts["single_process"].items()]  # fmt: skip
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {
        "speedup_2_workers": med["single_process"] / med["2_workers"],
        "speedup_1_worker": med["single_process"] / med["1_workers"],
        "max_abs_diff": max(diffs),
        "numbers_compared": len(ref),
        "seconds": med,
        "runs": runs,
        "actor_start_seconds": {f"{n}_workers": s for n, s in start.items()},
        "setup": {"model": spec, "config": "AnalyzeConfig() defaults",
                  "stages": ["behavior", "transcripts + record", "patching"],
                  "torch_threads_per_process": 1, "ray_num_cpus": 3,
                  "repeats": args.repeats, "host": platform.node(),
                  "torch": torch.__version__, "ray": ray.__version__},
    }  # fmt: skip
    for ex in variants.values():
        ex.close()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    return out


if __name__ == "__main__":
    main()
