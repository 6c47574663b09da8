"""The validation table: kdgap's mediation verdict against every organism's planted answer.

For each organism (default: every shipped one, the first four and the zoo), the same
decomposition ``kdgap analyze`` runs (:func:`kdgap.report.mediation_stage.decomposition_stage`
on off-policy transcripts, random driver), the verdict it gives
(:func:`kdgap.report.verdict.verdict`), and the organism's rule applied to the very same
steps (:func:`kdgap.organisms.truth.planted_reads`). One JSON holds every row; with
``--write-truth`` each shipped folder also gets ``truth.json`` (its row), which
``kdgap organisms list`` shows. Example (about 30 s per organism on 2 CPU cores)::

    python experiments/validate_organisms.py --json experiments/results/validation.json \\
        --write-truth --markdown runs/validation_table.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdgap.envs.bandit import BanditConfig
from kdgap.io import atomic_write_json
from kdgap.organisms.registry import resolve_organism, shipped_names
from kdgap.report.mediation_stage import decomposition_stage
from kdgap.report.session import Session
from kdgap.report.verdict import HIGH, LOW, verdict


def validate(name: str, args: argparse.Namespace) -> dict:
    """One organism's row: planted vs measured share and verdict."""
    t0 = time.perf_counter()
    session = Session(f"organism:{name}")
    cfg = BanditConfig(horizon=args.horizon)
    recs = session.play(cfg, args.record_episodes, seed=args.seed, driver="random",
                        progress=False)  # fmt: skip
    dec = decomposition_stage(session, recs, cfg, n_steps=args.steps, seed=args.seed)
    word, reason = verdict(dec.get("reading_share"), dec.get("reading_share_ci"),
                           dec.get("n_steps") or 0)  # fmt: skip
    planted = dec.get("planted") or {}
    share, ci, truth = (
        dec.get("reading_share"),
        dec.get("reading_share_ci"),
        planted.get("reading_share"),
    )
    return {
        "organism": name, "mechanism": planted.get("mechanism"),
        "planted_share": truth, "planted_verdict": planted.get("verdict"),
        "reading_share": share, "reading_share_ci": ci,
        "indirect_share": dec.get("indirect_share"),
        "indirect_share_ci": dec.get("indirect_share_ci"),
        "activation_indirect_share": (dec.get("activation") or {}).get("indirect_share"),
        "verdict": word, "verdict_reason": reason, "agreement": planted.get("agreement"),
        "n_steps": dec.get("n_steps"), "verdict_matches": word == planted.get("verdict"),
        "share_within_0.1": None if truth is None else abs(share - truth) <= 0.1,
        "planted_in_ci": None if truth is None else ci[0] <= truth <= ci[1],
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """The validation table as Markdown (the table of docs/validation.md)."""
    out = [
        "| organism | planted share | planted verdict | measured share [95% CI] | "
        "kdgap's verdict | per-step agreement | indirect share [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci, ici = r["reading_share_ci"] or [None, None], r["indirect_share_ci"] or [None, None]
        word = r["verdict"] if r["verdict_matches"] else f"**{r['verdict']}**"
        out.append(
            f"| `{r['organism']}` | {_f(r['planted_share'])} | {r['planted_verdict']} | "
            f"{_f(r['reading_share'])} [{_f(ci[0])}, {_f(ci[1])}] | {word} | "
            f"{_f(r['agreement'])} | {_f(r['indirect_share'])} [{_f(ici[0])}, {_f(ici[1])}] |"
        )
    return "\n".join(out) + "\n"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--organisms", nargs="+", default=shipped_names())
    p.add_argument("--json", required=True, help="results JSON")
    p.add_argument("--steps", type=int, default=128, help="decomposition steps per organism")
    p.add_argument("--record-episodes", type=int, default=24)
    p.add_argument("--horizon", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write-truth", action="store_true", help="write truth.json per folder")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.organisms:
        row = validate(name, args)
        rows.append(row)
        ci = row["reading_share_ci"] or [float("nan")] * 2
        print(f"{name:<20} planted {row['planted_share']:.3f} {row['planted_verdict']:<19} "
              f"measured {row['reading_share']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
              f"{row['verdict']:<19} agree {row['agreement']:.3f}", flush=True)  # fmt: skip
        if args.write_truth:
            atomic_write_json(Path(resolve_organism(name)) / "truth.json", row)
    out = {"settings": {k: v for k, v in vars(args).items() if k != "organisms"},
           "regions": {"low": LOW, "high": HIGH}, "rows": rows,
           "all_verdicts_match": all(r["verdict_matches"] for r in rows)}  # fmt: skip
    atomic_write_json(args.json, out)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows))
    print(json.dumps({"all_verdicts_match": out["all_verdicts_match"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
