"""Benchmark: the kdgap recorder vs ``run_with_cache()``-then-slice.

Records every layer's ``resid_post`` at 2 sites (``action``, ``rationale.conclusion``) of
organism transcripts, in batches of ``--batch-size``:

- ``recorder``: :func:`kdgap.hooks.record_store` (hooks copy 2 positions; shards on disk).
- ``cache``: the same batches through ``model.run_with_cache()`` (default: every hook)
  then slicing the same positions and keeping the slices.

Each variant runs in its own subprocess. Memory is the peak RSS above the process's
baseline taken once the model is loaded and the transcripts built (the kernel's peak
counter is reset there through ``/proc/self/clear_refs``). Output keys (``--json OUT``):
``throughput_ratio`` (recorder / cache, transcripts per second, at ``--n``),
``peak_rss_ratio`` (cache / recorder peak above baseline, at ``--n``), ``rss_growth``
(recorder peak at 4000 over at 500 transcripts), plus the raw numbers and the max abs
difference between the two variants' activations (a correctness check).

Model: an organism-size ``boot_native`` model (4 layers, d_model 128, 4 heads, n_ctx 512)
with random weights reading the organisms' transcript language with histories of 230-330
steps (250-350 tokens); ``--organism NAME`` uses a trained one via ``load_organism``.

    python experiments/bench/recording.py --json runs/bench/recording.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = ["action", "rationale.conclusion"]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _setup(args):
    import numpy as np
    import torch

    from kdgap.envs.stats import counts_and_sums, ucb_arms
    from kdgap.organisms.format import OrganismFormat
    from kdgap.organisms.language import OrganismLanguage

    torch.set_num_threads(args.threads)
    if args.organism:
        from kdgap.organisms.registry import load_organism, organism_config

        model, tok = load_organism(args.organism)
        lang = OrganismLanguage(**organism_config(args.organism)["language"])
        lo, hi = 0, lang.horizon - 1
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        lang = OrganismLanguage(n_arms=5, horizon=350)
        tok = lang.save_tokenizer(Path(tempfile.mkdtemp()) / "tok")
        cfg = TransformerBridgeConfig(
            d_model=128, d_head=32, n_layers=4, n_ctx=512, n_heads=4, d_mlp=512,
            d_vocab=len(tok), act_fn="gelu", normalization_type="LN", seed=0,
        )  # fmt: skip
        model = TransformerBridge.boot_native(cfg, tokenizer=tok).eval()
        lo, hi = 230, 330
    rng = np.random.default_rng(args.seed)
    texts = []
    for _ in range(args.n):
        t = int(rng.integers(lo, hi + 1))
        acts, rews = rng.integers(0, 5, t), rng.integers(0, 2, t)
        counts, sums = counts_and_sums(acts, rews, 5)
        concl = int(np.flatnonzero(ucb_arms(counts, sums))[0])
        texts.append(
            lang.prompt_text(acts, rews)
            + lang.completion_text(counts, sums, concl, int(rng.integers(0, 5)))
        )
    return model, tok, OrganismFormat(), texts


def child(args) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch

    from kdgap.hooks.api import record_store
    from kdgap.hooks.recorder import Recorder
    from kdgap.hooks.sites import resolve_sites

    model, tok, fmt, texts = _setup(args)
    import pyarrow.parquet  # noqa: F401  (library code is baseline, not recording memory)

    rec = Recorder(model, fmt, "resid_post", SITES, tokenizer=tok)
    baseline = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    sample: dict[str, torch.Tensor] = {}
    if args.variant == "recorder":
        with tempfile.TemporaryDirectory() as out:
            kw = {"batch_size": args.batch_size, "shard_size": 1024, "progress": False}
            kw["max_batch_tokens"] = args.max_batch_tokens
            st = record_store(model, fmt, texts, "resid_post", SITES, out, tokenizer=tok, **kw)
            elapsed = time.perf_counter() - t0
            for h in rec.hooks:
                for s in SITES:
                    sample[f"{h}@{s}"] = st.load(h, s)[0][:64].clone()
    else:
        kept: dict[str, list] = {f"{h}@{s}": [] for h in rec.hooks for s in SITES}
        with torch.inference_mode():
            for b0 in range(0, len(texts), args.batch_size):
                chunk = texts[b0 : b0 + args.batch_size]
                b = rec.tokenize(chunk)
                pos = resolve_sites(fmt, chunk, b, SITES).positions
                _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
                rows = torch.arange(len(chunk))
                for h in rec.hooks:
                    for j, s in enumerate(SITES):
                        kept[f"{h}@{s}"].append(cache[h][rows, pos[:, j]].clone())
                del cache
        elapsed = time.perf_counter() - t0
        sample = {k: torch.cat(v)[:64] for k, v in kept.items()}
    peak = _rss_kb("VmHWM")
    torch.save(sample, args.sample_out)
    return {"variant": args.variant, "n": args.n, "seconds": elapsed,
            "transcripts_per_s": args.n / elapsed, "baseline_rss_mb": baseline / 1024,
            "peak_above_baseline_mb": (peak - baseline) / 1024}  # fmt: skip


def _spawn(args, variant: str, n: int, tmp: Path) -> tuple[dict, Path]:
    sample = tmp / f"{variant}-{n}.pt"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--n",
        str(n),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--sample-out",
        str(sample),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
    ]
    cmd += ["--organism", args.organism] if args.organism else []  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} n={n} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(res), file=sys.stderr)
    return res, sample


def _budget(s: str) -> int | None:
    return None if s.lower() == "none" else int(s)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--n", type=int, default=2000, help="transcripts for the throughput/memory ratio"
    )
    p.add_argument("--growth", type=str, default="500,4000", help="recorder sizes for rss_growth")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-batch-tokens",
        type=_budget,
        default=2048,
        help="recorder micro-batch budget in padded tokens ('none': whole batches)",
    )
    p.add_argument("--organism", type=str, default=None, help="a trained organism to use")
    p.add_argument("--child", choices=["recorder", "cache"], help=argparse.SUPPRESS)
    p.add_argument("--sample-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.variant = args.child
        print(json.dumps(child(args)))
        return {}
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rec, rec_s = _spawn(args, "recorder", args.n, tmp)
        cache, cache_s = _spawn(args, "cache", args.n, tmp)
        a, b = torch.load(rec_s), torch.load(cache_s)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        small_n, big_n = (int(x) for x in args.growth.split(","))
        small, _ = _spawn(args, "recorder", small_n, tmp)
        big, _ = _spawn(args, "recorder", big_n, tmp)
        whole = argparse.Namespace(**{**vars(args), "max_batch_tokens": "none"})
        unbudgeted, _ = _spawn(whole, "recorder", small_n, tmp)
    result = {
        "throughput_ratio": rec["transcripts_per_s"] / cache["transcripts_per_s"],
        "peak_rss_ratio": cache["peak_above_baseline_mb"] / rec["peak_above_baseline_mb"],
        "rss_growth": big["peak_above_baseline_mb"] / small["peak_above_baseline_mb"],
        # Same forward batch as the cache variant (no micro-batching): what hooks alone save.
        "peak_rss_ratio_whole_batches": cache["peak_above_baseline_mb"]
        / unbudgeted["peak_above_baseline_mb"],
        "max_abs_diff": diff,
        "config": {"n": args.n, "batch_size": args.batch_size, "threads": args.threads,
                   "max_batch_tokens": args.max_batch_tokens,
                   "hooks": "resid_post (all layers)", "sites": SITES,
                   "model": args.organism or "boot_native 4L d128 4 heads (random weights)"},
        "runs": {"recorder": rec, "cache": cache, f"recorder_{small_n}": small,
                 f"recorder_{big_n}": big, f"recorder_{small_n}_whole_batches": unbudgeted},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
