"""Benchmark: recording a real model's residual stream on the SDPA twin vs the bridge.

``kdgap analyze --model smollm2`` records ``resid_post`` of all 30 layers at the ``action``
site of every forced step. This times that recording both ways, in one process,
alternating, on the same records (``--records``: the ``transcripts.jsonl`` that
``kdgap analyze --model smollm2 --out runs/smollm2`` writes under
``runs/smollm2/models/smollm2/``; ``--n`` of them), and checks the values agree:

- ``twin``: :meth:`kdgap.report.session.Session.record` with ``fast=True`` (default): torch
  hooks on the decoder layers of an SDPA twin sharing the bridge's tensors
  (:mod:`kdgap.hooks.twin_capture`);
- ``bridge``: the same with ``fast=False``: ``run_with_hooks`` on the TransformerBridge.

Output keys (``--json OUT``): ``speedup`` (bridge / twin median seconds), ``max_abs_diff``
and ``max_rel_diff`` (largest difference over the largest activation), the raw timings.

    python experiments/bench/recording_twin.py \\
        --records runs/smollm2/models/smollm2/transcripts.jsonl \\
        --json runs/bench/recording_twin.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kdgap.io import atomic_write_json
from kdgap.records import read_records
from kdgap.report.session import Session


def main(argv=None) -> dict:
    """Time both recording paths and write the JSON; returns the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True, help="transcripts.jsonl of a SmolLM2 analysis")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=64, help="records to record")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session(args.model)  # the model and the format the analysis used
    records = read_records(args.records)[: args.n]
    seconds: dict[str, list[float]] = {"twin": [], "bridge": []}
    acts = {}
    for _ in range(args.repeats):
        for name in ("twin", "bridge"):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                st = session.record(records, "resid_post", "action", out,
                                    fast=name == "twin", progress=False)  # fmt: skip
                seconds[name].append(time.perf_counter() - t0)
                acts[name] = torch.stack([st.load(h, "action")[0] for h in st.hooks])
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    diff = (acts["twin"] - acts["bridge"]).abs().max().item()
    res = {
        "speedup": med["bridge"] / med["twin"],
        "max_abs_diff": diff,
        "max_rel_diff": diff / acts["bridge"].abs().max().item(),
        "median_seconds": med,
        "seconds": seconds,
        "config": {"model": args.model, "n": len(records), "hooks": "resid_post (all layers)",
                   "site": "action", "torch_threads": torch.get_num_threads(),
                   "repeats": args.repeats},
    }  # fmt: skip
    print(f"twin {med['twin']:.1f} s, bridge {med['bridge']:.1f} s: {res['speedup']:.2f}x; "
          f"max abs diff {diff:.2e} (relative {res['max_rel_diff']:.1e})")  # fmt: skip
    if args.json:
        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
