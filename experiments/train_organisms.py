"""Retrain kdgap's model organisms and record their training curves.

Every (organism, horizon) pair is one job, run as a separate process (``--jobs`` at a
time), each writing a loadable organism folder ``OUT/h<H>/<name>/`` with ``curve.json``
(loss, teacher-forced accuracies, throughput per ``eval_every`` steps) and, with
``--evaluate``, ``metrics.json`` (64 bandits x horizon steps, greedy forced choice, with
the counterfactual edit; see :mod:`kdgap.metrics.organism` and
``experiments/evaluate_organisms.py``). ``OUT/summary.json``
collects wall times, the last curve point and the metrics of every job. Runs resume:
rerunning the same command continues interrupted jobs and skips finished ones.

The recipe is a sample budget (``--samples``, default :class:`TrainConfig`'s), so a CPU
run and a GPU run train the same organism. Examples::

    # everything, on a GPU machine (16 cores): 4 organisms x 3 horizons
    python experiments/train_organisms.py --device cuda --out runs/organisms \\
        --horizons 50 40 30 --jobs 12 --evaluate

    # a 1-2 minute CPU demonstration that the recipe learns (short horizon, small budget)
    python experiments/train_organisms.py --out /tmp/demo --horizons 10 \\
        --organisms faithful --samples 16000 --eval-every 50 --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from evaluate_organisms import evaluate, table_row

from kdgap.io import atomic_write_json
from kdgap.organisms.data import DataConfig
from kdgap.organisms.mechanisms import MECHANISMS
from kdgap.organisms.registry import make_readable
from kdgap.organisms.train import TrainConfig, train_organism

SHIPPED = tuple(MECHANISMS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (one subfolder per horizon)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--jobs", type=int, default=1, help="jobs run in parallel processes")
    p.add_argument("--organisms", nargs="+", default=list(SHIPPED), choices=SHIPPED)
    p.add_argument("--horizons", nargs="+", type=int, default=[50])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=None, help="training samples per organism")
    p.add_argument("--eval-every", type=int, default=None, help="steps between curve points")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per job (default: CPU cores // jobs)")  # fmt: skip
    p.add_argument("--evaluate", action="store_true", help="play 64 bandits after training")
    p.add_argument("--eval-episodes", type=int, default=64)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # "name:horizon" (worker)
    return p.parse_args(argv)


def recipe(args: argparse.Namespace, horizon: int) -> TrainConfig:
    """The :class:`TrainConfig` of one job."""
    kw = {"data": DataConfig(horizon=horizon)}
    if args.samples is not None:
        kw["samples"] = args.samples
    if args.eval_every is not None:
        kw["eval_every"] = args.eval_every
    return TrainConfig(**kw)


def run_single(args: argparse.Namespace) -> None:
    """Worker: train (and optionally evaluate) one organism at one horizon."""
    name, horizon = args.single.rsplit(":", 1)
    horizon = int(horizon)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    torch.set_num_threads(threads)
    folder = Path(args.out) / f"h{horizon}" / name
    t0 = time.perf_counter()
    cfg = recipe(args, horizon)
    train_organism(MECHANISMS[name], folder, seed=args.seed, config=cfg, device=args.device)
    train_s = time.perf_counter() - t0
    result = {"name": name, "horizon": horizon, "device": args.device, "threads": threads,
              "train_wall_s": train_s, "samples": cfg.samples}  # fmt: skip
    if args.evaluate:
        # The weights are saved by now: an evaluation failure must not lose the run, so
        # record why and keep the trained folder.
        try:
            result["metrics"] = evaluate_folder(folder, args.eval_episodes, args.device)
        except Exception as err:  # noqa: BLE001
            result["eval_error"] = f"{type(err).__name__}: {err}"
        result["eval_wall_s"] = time.perf_counter() - t0 - train_s
    curve = json.loads((folder / "curve.json").read_text())
    result["last_curve_point"] = curve[-1] if curve else None
    atomic_write_json(folder / "job.json", result)
    (folder / "job.json").chmod(0o644)


def evaluate_folder(folder: Path, episodes: int, device: str) -> dict:
    """Play ``episodes`` bandits with the organism in ``folder``; write ``metrics.json``.

    Uses :func:`evaluate_organisms.evaluate` (``TextAgent`` in forced mode).
    """
    opts = argparse.Namespace(device=device, horizon=None, seed=0, episodes=episodes)
    result = evaluate(str(folder), opts)
    atomic_write_json(folder / "metrics.json", {k: v for k, v in result.items() if k != "folder"})
    make_readable(folder)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every job (``--jobs`` at a time) and write ``OUT/summary.json``."""
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs} must be >= 1.")
    if args.single:
        run_single(args)
        return 0
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [f"{n}:{h}" for h in args.horizons for n in args.organisms]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    running: list[tuple[str, subprocess.Popen, object]] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            log = open(out / "logs" / f"{job.replace(':', '_h')}.log", "w")
            cmd = [sys.executable, __file__, *passthrough, "--single", job]
            env = {**os.environ, "TQDM_MININTERVAL": "10"}
            running.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log))  # fmt: skip
            print(f"[{time.perf_counter() - t0:6.0f}s] started {job}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
                if proc.returncode:
                    failed.append(job)
                print(f"[{time.perf_counter() - t0:6.0f}s] {status} {job}", flush=True)
    summary = {"argv": sys.argv[1:], "wall_s": time.perf_counter() - t0, "failed": failed,
               "jobs": {}}  # fmt: skip
    for job in jobs:
        name, h = job.rsplit(":", 1)
        path = out / f"h{h}" / name / "job.json"
        summary["jobs"][job] = json.loads(path.read_text()) if path.exists() else None
    atomic_write_json(out / "summary.json", summary)
    for job, res in summary["jobs"].items():
        if res and res.get("metrics"):
            m = res["metrics"]["metrics"]
            print(f"{job:22s} {table_row(m)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
