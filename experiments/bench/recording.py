"""Benchmark: the kdgap recorder vs ``run_with_cache()``-then-slice, on a shipped organism.

Records every layer's ``resid_post`` at 2 sites (``action``, ``rationale.conclusion``) of
real organism transcripts: the organism (``--organism``, default ``faithful``) plays
Bernoulli bandits in forced mode with a random driver (off-policy histories, so lengths
cover the whole horizon), once, in the parent process; the step records go to a JSONL
file every child reads. Variants, each in its own subprocess, over the same transcripts
in the same batches of ``--batch-size`` (default: ``record_store``'s own default, 256,
i.e. the batch a user gets without choosing one):

- ``recorder``: :func:`kdgap.hooks.record_store` with its defaults (step records in,
  sharded store with labels out, 256 inputs per shard; hooks copy 2 positions; each shard's
  inputs batched in order of length; each transcript run only up to its last site; rows
  grouped by that length into forwards of at most 2048 padded tokens, widths padded to a
  multiple of 16; the forward abandoned once the last hook fired; freed heap pages given
  back to the OS after each forward and each shard write).
- ``recorder_same_batches``: the same with ``sort_by_length=False``, ``pad_multiple=1``,
  ``truncate=False`` and no micro-batching, so its forwards are exactly the cache variant's.
- ``cache``: each batch of ``--batch-size`` consecutive transcripts through
  ``model.run_with_cache()`` (default: every hook), then the same positions sliced and kept.

Memory is the peak RSS above the process's baseline. The baseline is taken once the
process is ready to record: model loaded, records read, and one warm-up batch run through
the variant's own code path (the recorder writes a one-batch store to a scratch folder,
which loads and first-uses pyarrow, safetensors and the tokenizer; the cache variant runs
one ``run_with_cache`` batch); then ``gc.collect`` and ``malloc_trim``, so freed warm-up
memory is not counted as baseline; the kernel's peak counter is reset there through
``/proc/self/clear_refs``. ``peak_above_model_loaded_mb`` is the conservative reading:
the same peak against the RSS right after loading the model (warm-up leftovers, library
code pages and allocator arenas included). Every child runs one thread (torch, OpenMP and
the tokenizer's Rust pool). Each variant and size runs ``--repeats`` times, interleaved;
the ratios use the *medians* of the repeats, and the ``*_max`` / ``*_best`` keys give the
highest peak and the fastest run.

Allocator: every variant and size runs twice per repeat, once with glibc's mmap threshold
pinned (``MALLOC_MMAP_THRESHOLD_=131072``, the value glibc starts from; setting it turns off
the *dynamic* threshold) and once with glibc's defaults. Under the default, freed forward
tensors stay in the heap in a layout that changes from run to run, so the peak of one and
the same recording varies from run to run by more than a 20% flatness criterion can resolve.
Pinned, large blocks are unmapped when freed and peak RSS tracks live memory, at a speed
cost both variants pay (the measured spreads and costs are in docs/benchmarks.md). The
top-level keys come from the pinned runs; the same keys for glibc's defaults are under
``default_malloc`` (``--malloc`` picks one configuration). Output keys (``--json OUT``):
``throughput_ratio`` (recorder / cache, transcripts per wall-clock second, at ``--n``),
``peak_rss_ratio`` (cache / recorder peak above baseline, at ``--n``), ``rss_growth``
(recorder peak at 4000 over at 500 transcripts), ``throughput_ratio_cpu`` (per CPU second,
insensitive to other load on the machine), the two memory ratios against the model-loaded
RSS, the same two ratios for ``recorder_same_batches``, the raw numbers, and the max abs
difference between the recorder's and the cache's activations (a correctness check).

    python experiments/bench/recording.py --json runs/bench/recording.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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


def play_records(organism: str, n: int, seed: int, path: Path) -> dict:
    """Play ``organism`` with a random driver until ``n`` step records; write them to ``path``."""
    import torch

    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.organisms import OrganismFormat, load_organism
    from kdgap.organisms.registry import organism_config
    from kdgap.policies.play import play
    from kdgap.policies.reference import make_policy
    from kdgap.records import write_records

    torch.set_num_threads(1)
    model, _ = load_organism(organism)
    lang = organism_config(organism)["language"]
    cfg = BanditConfig(n_arms=lang["n_arms"], horizon=lang["horizon"])
    t0 = time.perf_counter()
    agent = TextAgent(model, OrganismFormat(), mode="forced")
    recs = play(agent, cfg, n_episodes=math.ceil(n / cfg.horizon), seed=seed,
                driver=make_policy("random"), progress=False)[:n]  # fmt: skip
    write_records(path, recs)
    return {"episodes": math.ceil(n / cfg.horizon), "horizon": cfg.horizon,
            "play_seconds": time.perf_counter() - t0}  # fmt: skip


def child(args) -> dict:
    """Run one variant in this process and return its measurements."""
    import gc

    import torch

    from kdgap.hooks.record import record_store, transcript_text
    from kdgap.hooks.recorder import Recorder
    from kdgap.hooks.sites import resolve_sites
    from kdgap.models.runtime import release_free_memory
    from kdgap.organisms import OrganismFormat, load_organism
    from kdgap.records import read_records

    torch.set_num_threads(args.threads)
    model, tok = load_organism(args.organism)
    fmt = OrganismFormat()
    records = read_records(args.records)[: args.n]
    texts = [transcript_text(r) for r in records]
    rec = Recorder(model, fmt, "resid_post", SITES, tokenizer=tok)
    bs = args.batch_size
    store_kw: dict = {"batch_size": bs, "progress": False, "tokenizer": tok}  # default shards
    if args.variant == "recorder_same_batches":  # the cache variant's forwards exactly
        store_kw.update(sort_by_length=False, max_batch_tokens=None, pad_multiple=1, truncate=False)

    def cache_batch(chunk: list[str]) -> dict[str, torch.Tensor]:
        """The cache variant: run_with_cache (every hook), slice the sites, keep copies."""
        b = rec.tokenize(chunk)
        pos = resolve_sites(fmt, chunk, b, SITES).positions
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
        rows = torch.arange(len(chunk))
        out = {
            f"{h}@{s}": cache[h][rows, pos[:, j]].clone()
            for h in rec.hooks
            for j, s in enumerate(SITES)
        }
        del cache
        return out

    release_free_memory()
    model_loaded = _rss_kb("VmRSS")
    # Warm-up: one batch through the variant's own code path (the recorder: a one-batch
    # store in a scratch folder, so pyarrow, safetensors and the tokenizer are loaded and
    # used once; the cache: one run_with_cache batch). Then free, trim, take the baseline.
    if args.variant == "cache":
        with torch.inference_mode():
            cache_batch(texts[:bs])
    else:
        with tempfile.TemporaryDirectory() as scratch:
            record_store(model, fmt, records[:bs], "resid_post", SITES, scratch, **store_kw)
    gc.collect()
    release_free_memory()
    baseline = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0, c0 = time.perf_counter(), time.process_time()
    sample: dict[str, torch.Tensor] = {}
    if args.variant != "cache":
        with tempfile.TemporaryDirectory() as out:
            st = record_store(model, fmt, records, "resid_post", SITES, out, **store_kw)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = _rss_kb("VmHWM")
            for h in rec.hooks:
                for s in SITES:
                    sample[f"{h}@{s}"] = st.load(h, s)[0][:64].clone()
    else:
        kept: dict[str, list] = {f"{h}@{s}": [] for h in rec.hooks for s in SITES}
        with torch.inference_mode():
            for b0 in range(0, len(texts), bs):
                for k, v in cache_batch(texts[b0 : b0 + bs]).items():
                    kept[k].append(v)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _rss_kb("VmHWM")
        sample = {k: torch.cat(v)[:64] for k, v in kept.items()}
    torch.save(sample, args.sample_out)
    return {"variant": args.variant, "n": args.n, "batch_size": bs, "seconds": elapsed,
            "cpu_seconds": cpu, "transcripts_per_s": args.n / elapsed,
            "transcripts_per_cpu_s": args.n / cpu,
            "model_loaded_rss_mb": model_loaded / 1024, "baseline_rss_mb": baseline / 1024,
            "peak_above_baseline_mb": (peak - baseline) / 1024,
            "peak_above_model_loaded_mb": (peak - model_loaded) / 1024}  # fmt: skip


#: glibc's starting mmap threshold. Setting it (to the value glibc starts from anyway) turns
#: off glibc's *dynamic* threshold, which otherwise rises to the largest block freed so far,
#: after which freed forward tensors stay in the heap (see the module docstring). Large
#: blocks are then mapped and unmapped per allocation: peak RSS tracks live memory, at a
#: speed cost for both variants alike (page faults on fresh mappings).
PINNED_MMAP_THRESHOLD = 128 * 1024
MALLOC_CONFIGS = ("pinned", "default")


def _spawn(args, variant: str, n: int, tmp: Path, malloc: str) -> tuple[dict, Path]:
    sample = tmp / f"{variant}-{n}-{malloc}.pt"
    cmd = [sys.executable, __file__, "--child", variant, "--n", str(n),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--organism", args.organism, "--records", str(args.records),
           "--sample-out", str(sample)]  # fmt: skip
    # One thread everywhere: torch/OpenMP, and the tokenizer's own (Rust) thread pool.
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "RAYON_NUM_THREADS": threads}
    if args.threads == 1:
        env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = str(PINNED_MMAP_THRESHOLD)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} n={n} failed:\n{out.stderr[-3000:]}")
    res = {**json.loads(out.stdout.strip().splitlines()[-1]), "malloc": malloc}
    print(json.dumps(res), file=sys.stderr)
    return res, sample


def _best(runs: list[tuple[dict, Path]]) -> tuple[dict, Path]:
    """Repeated runs of one variant and size, summarised by their *medians* (the machine is
    shared and noisy: one run's peak memory moves by +-10 MB with heap fragmentation), with
    the fastest speed and the highest peak kept beside them (``*_best`` / ``*_max``)."""
    best, sample = max(runs, key=lambda r: r[0]["transcripts_per_s"])
    out = {**best, "repeats_transcripts_per_s": [round(r[0]["transcripts_per_s"], 1) for r in runs]}
    for key in ("transcripts_per_s", "transcripts_per_cpu_s"):
        out[f"{key}_best"] = max(r[0][key] for r in runs)
        out[key] = statistics.median(r[0][key] for r in runs)
    for key in ("peak_above_baseline_mb", "peak_above_model_loaded_mb"):
        out[f"repeats_{key}"] = [round(r[0][key], 1) for r in runs]
        out[f"{key}_max"] = max(r[0][key] for r in runs)
        out[key] = statistics.median(r[0][key] for r in runs)
    return out, sample


def _summarise(best: dict, small_n: int, big_n: int) -> dict:
    """The ratios of one allocator configuration from ``{variant: _best(...)}``."""
    (rec, rec_s), (cache, cache_s), (same, _) = best["rec"], best["cache"], best["same"]
    small, big = best["small"][0], best["big"][0]
    import torch

    a, b = torch.load(rec_s), torch.load(cache_s)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    cache_mb, cache_tps = cache["peak_above_baseline_mb"], cache["transcripts_per_s"]
    strict, peak = "peak_above_model_loaded_mb", "peak_above_baseline_mb"
    return {
        "throughput_ratio": rec["transcripts_per_s"] / cache_tps,
        "peak_rss_ratio": cache_mb / rec[peak],
        "rss_growth": big[peak] / small[peak],
        # The conservative readings: highest peak of the repeats, fastest run.
        "peak_rss_ratio_max": cache[f"{peak}_max"] / rec[f"{peak}_max"],
        "rss_growth_max": big[f"{peak}_max"] / small[f"{peak}_max"],
        "throughput_ratio_best": rec["transcripts_per_s_best"] / cache["transcripts_per_s_best"],
        # Load-independent speed: transcripts per CPU second (one thread), medians.
        "throughput_ratio_cpu": rec["transcripts_per_cpu_s"] / cache["transcripts_per_cpu_s"],
        # Memory against the RSS right after loading the model (the warm-up's leftovers,
        # library code pages and allocator arenas included): the conservative reading.
        "peak_rss_ratio_vs_model_loaded": cache[strict] / rec[strict],
        "rss_growth_vs_model_loaded": big[strict] / small[strict],
        # Identical forward batches (no sorting, micro-batching or truncation): hooks alone.
        "throughput_ratio_same_batches": same["transcripts_per_s"] / cache_tps,
        "peak_rss_ratio_same_batches": cache_mb / same[peak],
        "max_abs_diff": diff,
        "runs": {"recorder": rec, "cache": cache, "recorder_same_batches": same,
                 f"recorder_{small_n}": small, f"recorder_{big_n}": big},
    }  # fmt: skip


def _default_batch_size() -> int:
    """``record_store``'s own default ``batch_size``: the batch a user gets without choosing."""
    import inspect

    from kdgap.hooks.record import record_store

    return int(inspect.signature(record_store).parameters["batch_size"].default)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--n", type=int, default=2000, help="transcripts for the two ratios")
    p.add_argument("--growth", type=str, default="500,4000", help="recorder sizes for rss_growth")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: record_store's default batch_size"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per variant and size (best speed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--organism", type=str, default="faithful", help="a shipped organism")
    p.add_argument("--records", type=Path, help="reuse these step records (JSONL)")
    p.add_argument(
        "--malloc", choices=["both", *MALLOC_CONFIGS], default="both",
        help="glibc allocator setting of the children: pinned mmap threshold (top-level keys), "
        "glibc's default (under 'default_malloc'), or both",
    )  # fmt: skip
    p.add_argument(
        "--child", choices=["recorder", "recorder_same_batches", "cache"], help=argparse.SUPPRESS
    )
    p.add_argument("--sample-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = _default_batch_size()
    if args.child:
        args.variant = args.child
        print(json.dumps(child(args)))
        return {}
    small_n, big_n = (int(x) for x in args.growth.split(","))
    configs = MALLOC_CONFIGS if args.malloc == "both" else (args.malloc,)
    summaries = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        played = {}
        if args.records is None:
            args.records = tmp / "records.jsonl"
            played = play_records(args.organism, max(args.n, big_n), args.seed, args.records)
        runs = {(m, v): [] for m in configs for v in ("rec", "cache", "same", "small", "big")}
        for _ in range(args.repeats):  # interleaved, so load on the machine hits all alike
            for m in configs:
                runs[m, "rec"].append(_spawn(args, "recorder", args.n, tmp, m))
                runs[m, "cache"].append(_spawn(args, "cache", args.n, tmp, m))
                runs[m, "same"].append(_spawn(args, "recorder_same_batches", args.n, tmp, m))
                runs[m, "small"].append(_spawn(args, "recorder", small_n, tmp, m))
                runs[m, "big"].append(_spawn(args, "recorder", big_n, tmp, m))
        for m in configs:
            summaries[m] = _summarise({v: _best(runs[m, v]) for v in
                                       ("rec", "cache", "same", "small", "big")},
                                      small_n, big_n)  # fmt: skip
    # Top level: the pinned allocator (peak RSS = live memory, both variants alike); the
    # default allocator's readings sit beside them under "default_malloc".
    result = dict(summaries[configs[0]])
    if len(configs) > 1:
        result["default_malloc"] = summaries["default"]
    result["malloc"] = (
        f"MALLOC_MMAP_THRESHOLD_={PINNED_MMAP_THRESHOLD} (glibc's dynamic threshold off)"
        if configs[0] == "pinned" else "glibc default (dynamic mmap threshold)"
    )  # fmt: skip
    result["config"] = {"n": args.n, "batch_size": args.batch_size, "threads": args.threads,
                        "repeats": args.repeats, "load_average": os.getloadavg(),
                        "hooks": "resid_post (all layers)", "sites": SITES,
                        "model": f"organism:{args.organism}", "malloc": list(configs),
                        "transcripts": "forced-mode play, random driver", **played}  # fmt: skip
    if args.json:  # written first: a closed stdout must not lose the results
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
