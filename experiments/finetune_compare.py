"""Fine-tune `seed-calibrated` three ways and diagnose the four models side by side.

Runs ``kdgap finetune`` with each method's defaults (thought cloning, behaviour cloning,
RLFT) on ``organism:seed-calibrated``, timing each, then ``kdgap analyze`` on the start and
the three results into one folder (the report's delta table compares each with the start),
and writes the wall times and the compared measurements to ``--json``. Every step resumes:
fine-tunes from their checkpoints, the analysis from its cached stages.

    python experiments/finetune_compare.py --out runs/finetune --json OUT [--ship]

``--ship`` copies the three fine-tuned models into ``kdgap/organisms/finetuned/`` as
``seed-calibrated-<method>`` (with their training curves in ``finetune.json``): the
checkpoints ``kdgap demo`` and the docs load by name.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from kdgap.organisms.registry import FINETUNED_DIR
from kdgap.report.api import CloneConfig, RlftConfig, analyze, finetune
from kdgap.report.compare import delta_table

START = "organism:seed-calibrated"


def ship(run: Path, method: str) -> str:
    """Copy ``run/model`` to ``FINETUNED_DIR/seed-calibrated-<method>``; returns its spec."""
    name = f"{START.split(':')[1]}-{method}"
    dst = FINETUNED_DIR / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run / "model", dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "name": name}, indent=2))
    curves = json.loads((run / "curves.json").read_text())
    (dst / "finetune.json").write_text(json.dumps({**curves, "model": f"organism:{name}"}))
    return f"organism:{name}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder of the runs and the analysis")
    ap.add_argument("--json", required=True)
    ap.add_argument("--ship", action="store_true", help="copy the models into the package")
    args = ap.parse_args(argv)
    out = Path(args.out)
    configs = {
        "thought-cloning": CloneConfig(method="thought-cloning"),
        "behavior-cloning": CloneConfig(method="behavior-cloning"),
        "rlft": RlftConfig(),
    }
    seconds, models, curves = {}, [START], {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        res = finetune(START, out / name, cfg)
        seconds[name] = time.perf_counter() - t0
        models.append(res["model"])
        curves[name] = res["curves"]
        if args.ship:
            ship(out / name, name)
    summary = analyze(models, out / "analysis")
    table = delta_table(summary["models"])
    result = {
        "finetune_seconds": seconds,
        "models": models,
        "curves": curves,
        "compared": {
            row["metric"]: {"values": row["values"], "ci": row["ci"], "delta": row["delta"]}
            for row in table
        },  # fmt: skip
        "verdicts": {m: e["verdict"] for m, e in summary["models"].items()},
        "setup": {
            "torch_threads": torch.get_num_threads(),
            "host": platform.node(),
            "torch": torch.__version__,
            "configs": {k: vars(c) for k, c in configs.items()},
            "analysis": summary["config"],
        },  # fmt: skip
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"finetune_seconds": seconds, "verdicts": result["verdicts"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
