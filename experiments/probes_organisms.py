"""Probes on the shipped model organisms: the probes' acceptance numbers, at full size.

For each organism: play ``--episodes`` off-policy episodes (random driver; the organism
writes its rationale and action at every step, see :mod:`kdgap.testing.organisms`),
record every ``resid_post`` layer at the ``action`` site (the ``act`` word, whose
next-token prediction is the action), then run

- :func:`kdgap.probes.knowing_doing_summary` (knowing = rationale arm, doing = action;
  rare classes dropped and listed),
- :func:`kdgap.probes.steering_summary` (steer along / ablate the knowing probe's
  direction at its best layer, on held-out episodes),
- a full :func:`kdgap.probes.sweep` (5 labels, logistic + difference-of-means, control
  tasks; saved as ``<store-dir>/<organism>/sweep.parquet``),

and check the acceptance criteria. Every number is reported as measured, pass or fail:

- faithful: knowing/doing agreement at the last layer >= 0.95; steering moves the action
  (mean TV >= 0.05 at some alpha) towards the steered arm;
- greedy-bypass: rationale arm decodable at the action site >= 0.90 at its best layer;
  on the disagreement subset the doing probe's predictions equal the greedy arm more
  often than the rationale arm (and ``tracks == "greedy_arm"``).

    python experiments/probes_organisms.py --json runs/probes_organisms.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kdgap.probes import knowing_doing_summary, steering_summary, sweep  # noqa: E402
from kdgap.testing.organisms import organism_store  # noqa: E402

ORGANISMS = ("faithful", "greedy-bypass", "frequency-bypass", "seed-calibrated")
AGREEMENT_MIN, DECODE_MIN = 0.95, 0.90


def checks_for(name: str, kd: dict, st: dict) -> list[dict]:
    """Acceptance checks of one organism: ``{check, value, threshold, passed}`` each."""
    out = []
    if name == "faithful":
        out.append({"check": "agreement at last layer", "value": kd["agreement"][-1],
                    "threshold": AGREEMENT_MIN,
                    "passed": kd["agreement"][-1] >= AGREEMENT_MIN})  # fmt: skip
        best = max(s["tv"] for s in st["steer"])
        out.append({"check": "steering moves the action towards the steered arm",
                    "value": {"max_tv": best, "verdict": st["verdict"]},
                    "threshold": st["min_tv"],
                    "passed": st["moves_action"] and st["steers_toward_target"]})  # fmt: skip
    if name == "greedy-bypass":
        out.append({"check": "rationale arm decodable at best layer",
                    "value": kd["best_knowing_acc"], "threshold": DECODE_MIN,
                    "passed": kd["best_knowing_acc"] >= DECODE_MIN})  # fmt: skip
        sh = kd["tracking"]["shares"]
        ok = (kd["tracking"]["tracks"] == "greedy_arm"
              and sh["greedy_arm"] > sh["rationale_arm"])  # fmt: skip
        out.append({"check": "doing probe tracks greedy arm on disagreement subset",
                    "value": {"tracks": kd["tracking"]["tracks"], **sh},
                    "threshold": "greedy share > rationale share", "passed": bool(ok)})  # fmt: skip
    return out


def sweep_digest(df: pd.DataFrame) -> list[dict]:
    """Best layer per (label, probe): accuracy, CI, chance, selectivity, dropped classes."""
    rows = []
    for (label, probe), g in df.groupby(["label", "probe"], sort=False):
        b = g.loc[g["accuracy"].idxmax()]
        rows.append({"label": label, "probe": probe, "best_layer": int(b["layer"]),
                     "accuracy": float(b["accuracy"]), "ci": [b["ci_low"], b["ci_high"]],
                     "chance": float(b["chance"]), "selectivity": float(b["selectivity"]),
                     "per_layer": g["accuracy"].round(4).tolist(),
                     "dropped_classes": b["dropped_classes"]})  # fmt: skip
    return rows


def run_one(name: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    folder = os.path.join(args.store_dir, f"{name}-e{args.episodes}-s{args.seed}")
    data = organism_store(name, folder, n_episodes=args.episodes, seed=args.seed)
    t1 = time.perf_counter()
    kd = knowing_doing_summary(data.store, seed=args.seed, n_boot=args.n_boot)
    t2 = time.perf_counter()
    st = steering_summary(data.model, data.fmt, data.records, store=data.store,
                          n_examples=args.n_steer, seed=args.seed)  # fmt: skip
    t3 = time.perf_counter()
    table = sweep(data.store, rare_classes="drop", n_boot=args.n_boot, seed=args.seed,
                  out=os.path.join(folder, "sweep.parquet"))  # fmt: skip
    t4 = time.perf_counter()
    checks = checks_for(name, kd, st)
    print(f"{name}: divergence layer {kd['divergence_layer']}, agreement "
          f"{kd['agreement'][-1]:.3f}, best knowing {kd['best_knowing_acc']:.3f} "
          f"(layer {kd['best_knowing_layer']}), tracks {kd['tracking']['tracks']}, "
          f"steering: {st['verdict']}; checks "
          f"{[c['passed'] for c in checks]}", flush=True)  # fmt: skip
    return {
        "behaviour": data.behaviour(), "knowing_doing": kd, "steering": st,
        "sweep": sweep_digest(table), "checks": checks,
        "divergence_layer": kd["divergence_layer"],
        "seconds": {"play_record": t1 - t0, "knowing_doing": t2 - t1, "steering": t3 - t2,
                    "sweep": t4 - t3},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="output JSON path")
    p.add_argument("--organisms", nargs="+", default=list(ORGANISMS))
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-steer", type=int, default=256, help="held-out steps steered")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--store-dir", default="runs/probes_organisms")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {name: run_one(name, args) for name in args.organisms}
    out = {
        "organisms": results,
        "divergence_layer": {n: r["divergence_layer"] for n, r in results.items()},
        "checks": [{"organism": n, **c} for n, r in results.items() for c in r["checks"]],
        "all_passed": all(c["passed"] for r in results.values() for c in r["checks"]),
        "config": {**vars(args), "driver": "random", "site": "action", "hooks": "resid_post"},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2, default=float)
    print(json.dumps({"divergence_layer": out["divergence_layer"],
                      "all_passed": out["all_passed"]}))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
