"""Benchmark: the batched probe trainer vs looping scikit-learn over layers.

A full organism sweep: every ``resid_post`` layer of a shipped organism (``--organism``,
default ``faithful``: 4 layers x d_model 128) at the ``action`` site, over ``--episodes``
off-policy episodes x 50 steps (:func:`kdgap.testing.organisms.organism_store`; the
store is cached under ``--store-dir`` and shared with ``experiments/probes_organisms.py``)
x 5 labels (rationale arm, action, UCB arm, greedy arm, most-frequent arm), each with its
Hewitt-Liang control task (``--control-feature``, default the sweep's reward-history
control; ``step`` gives the step-index control, see :mod:`kdgap.probes.control`). Arms an
organism almost never picks are dropped per label (``rare_classes="drop"``, identically
for both trainers). ``--organism synthetic`` runs a
:class:`kdgap.testing.synthetic.SyntheticStore` instead (greedy-bypass labels, every label
planted at its own strength and layers, noise 1; ``--layers``, ``--d-model``, ``--steps``
apply to it only).

Both variants run :func:`kdgap.probes.sweep` with the logistic probe only and identical
settings (same split, same inner folds, same C grid, same C choice rule):
``trainer="batched"`` (one batched torch solver for all hooks, labels, controls and
folds, stage by stage along the Cs, in whitened coordinates) and ``trainer="sklearn"``
(``LogisticProbe`` = ``LogisticRegressionCV`` + refit per cell, at its defaults:
``solver="lbfgs"``, ``tol=1e-4``, ``max_iter=1000``; on nearly separable cells
scikit-learn stops at ``max_iter``, short of the optimum, which the batched trainer
reaches). Both run on one thread (torch, and OpenMP/BLAS via the environment and
``threadpoolctl``). The variants alternate within each of ``--repeats`` repeats, so a
burst of load from other processes hits both alike. Output keys (``--json OUT``):
``speedup`` (sklearn / batched CPU time of the whole sweep, medians over the repeats;
``speedup_wall`` the same in wall time, ``speedup_best`` with the fastest repeats),
``max_accuracy_diff`` (largest |batched - sklearn| test accuracy over all cells, task and
control, as a fraction: 0.01 = 1 point), plus the raw numbers.

    python experiments/bench/probes.py --json runs/bench/probes.json
    python experiments/bench/probes.py --organism synthetic --json runs/bench/probes_syn.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from kdgap.probes import sweep  # noqa: E402
from kdgap.probes.control import DEFAULT_CONTROL  # noqa: E402
from kdgap.probes.dataset import ActivationSource  # noqa: E402
from kdgap.testing.organisms import organism_store  # noqa: E402
from kdgap.testing.synthetic import Plant, SyntheticStore, bandit_labels  # noqa: E402

LABELS = ("rationale_arm", "action", "ucb_arm", "greedy_arm", "frequent_arm")


def build_store(args: argparse.Namespace) -> SyntheticStore:
    """Greedy-bypass labels with every label planted (weak to strong, early to late)."""
    labels = bandit_labels(n_episodes=args.episodes, n_steps=args.steps, n_arms=5,
                           mode="greedy-bypass", seed=args.seed)  # fmt: skip
    L = args.layers
    plants = [
        Plant("rationale_arm", 1.0),
        Plant("action", 1.0, layers=range(L // 2, L)),
        Plant("ucb_arm", 0.5),
        Plant("greedy_arm", 0.7, layers=range(1, L)),
        Plant("frequent_arm", 0.3),
    ]
    return SyntheticStore(labels, n_layers=L, d_model=args.d_model, plants=plants, seed=args.seed)


def load_store(args: argparse.Namespace) -> tuple[ActivationSource, dict]:
    """The benchmark's store and the sweep's extra keyword arguments."""
    if args.organism == "synthetic":
        return build_store(args), {}
    folder = os.path.join(args.store_dir, f"{args.organism}-e{args.episodes}-s{args.seed}")
    data = organism_store(args.organism, folder, n_episodes=args.episodes, seed=args.seed)
    return data.store, {"rare_classes": "drop"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="output JSON path")
    p.add_argument(
        "--organism",
        default="faithful",
        help="shipped organism name, or 'synthetic' for the planted store",
    )
    p.add_argument(
        "--store-dir",
        default="runs/probes_organisms",
        help="cache of organism stores (shared with probes_organisms.py)",
    )
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--control-feature",
        default=DEFAULT_CONTROL,
        help="surface feature of the control tasks (see kdgap.probes.control)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    store, extra = load_store(args)
    kw = dict(labels=LABELS, probes=("logistic",), n_boot=200, seed=args.seed,
              control_feature=args.control_feature, **extra)  # fmt: skip
    # Variants alternate within each repeat, so a burst of load from other processes hits
    # both alike; CPU time (one thread each) is the main measure because it moves far
    # less with that load than wall time, which is reported beside it.
    cpu: dict[str, list[float]] = {"batched": [], "sklearn": []}
    wall: dict[str, list[float]] = {"batched": [], "sklearn": []}
    frames = {}
    with threadpool_limits(limits=1):
        for _ in range(args.repeats):
            for trainer in ("batched", "sklearn"):
                w0, c0 = time.perf_counter(), time.process_time()
                frames[trainer] = sweep(store, trainer=trainer, **kw)
                cpu[trainer].append(time.process_time() - c0)
                wall[trainer].append(time.perf_counter() - w0)
                print(f"{trainer}: cpu {cpu[trainer][-1]:.2f} s, wall {wall[trainer][-1]:.2f} s",
                      flush=True)  # fmt: skip
    fast, ref = frames["batched"], frames["sklearn"]
    diffs = np.concatenate([(fast[c] - ref[c]).abs().to_numpy()
                            for c in ("accuracy", "control_accuracy")])  # fmt: skip
    med = {k: {t: float(np.median(v[t])) for t in v} for k, v in (("cpu", cpu), ("wall", wall))}
    out = {
        "speedup": med["cpu"]["sklearn"] / med["cpu"]["batched"],
        "speedup_wall": med["wall"]["sklearn"] / med["wall"]["batched"],
        "speedup_best": min(cpu["sklearn"]) / min(cpu["batched"]),
        "max_accuracy_diff": float(diffs.max()),
        "mean_accuracy_diff": float(diffs.mean()),
        "c_agreement": float((fast["C"] == ref["C"]).mean()),
        "cpu_seconds_median": med["cpu"],
        "wall_seconds_median": med["wall"],
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cells": len(fast),
        "config": {
            **vars(args),
            "hooks": len(fast["hook"].unique()),
            "d_model": int(store.load(store.hooks[0], store.sites[0])[0].shape[1]),
            "n_examples": len(store.labels),
            "labels": list(LABELS),
            "dropped_classes": fast.groupby("label")["dropped_classes"].first().to_dict()
            if "dropped_classes" in fast
            else {},
            "controls": True,
            "control_feature": args.control_feature,
            "sklearn_reference": "LogisticProbe defaults: lbfgs, tol 1e-4, max_iter 1000",
            "threads": 1,
            "machine": platform.processor() or platform.machine(),
        },  # fmt: skip
        "accuracy_by_cell": fast[["hook", "label", "accuracy", "control_accuracy", "C"]]
        .assign(
            sklearn=ref["accuracy"], sklearn_control=ref["control_accuracy"], sklearn_C=ref["C"]
        )
        .to_dict(orient="records"),  # fmt: skip
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("speedup", "speedup_wall", "max_accuracy_diff")}))
    return out


if __name__ == "__main__":
    main()
