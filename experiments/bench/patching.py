"""Benchmark: kdgap batched patching vs transformer_lens.patching, and attribution vs exact.

Everything runs in one process on the same model, prompts and metric. With ``--organism
NAME`` the model is that shipped organism and the prompts are ``--batch`` off-policy episodes
(random driver) at step ``--step``, edited once per pair type (``--pair-types``; see
:func:`kdgap.hooks.patch.pairs.pairs_from_records`):

- ``conclusion`` (pair a): the rationale's concluding arm is swapped. The edit sits near
  the end of the prompt (position 67 of 69 on ``faithful``), so almost every cell of a sweep
  patches an activation that equals the base run's.
- ``history`` (pair c): the greedy arm is swapped throughout the history. The first edited
  token is early (positions 1-8), so almost every cell patches something that differs.

Without ``--organism``: a ``boot_native`` model of organism size (4 layers, d_model 128,
4 heads) on random tokens whose corrupt version differs at one position 2/3 of the way in
(pair type ``mid_edit``).

    python experiments/bench/patching.py --json OUT [--organism faithful] [--device cuda]

What each number compares (per pair type under ``pair_types``; the top-level copies are
those of the first pair type, ``conclusion`` on an organism, and say so in
``top_level_pair_type``):

- ``speedup_vs_transformer_lens``: full layer x position ``resid_pre`` sweep, denoising;
  ``transformer_lens.patching.get_act_patch_resid_pre`` time / ``patch_sweep`` time (kdgap's
  default, ``skip_identical=True``: a cell whose source activation equals the base's bit for
  bit, e.g. every position before the first edited token, takes the base metric without a
  forward; exact). ``max_abs_diff``: the two sweeps' largest per-prompt difference.
  Both run kdgap's default engine (``engine="auto"``: the native suffix engine on an
  organism, :mod:`kdgap.hooks.patch.suffix`).
- ``speedup_no_skip``: the same with ``skip_identical=False`` (every cell recomputed).
- ``speedup_bridge_engine``: the same with ``engine="bridge"`` (batched hooked forwards of
  the whole prompt through the TransformerBridge), to show what the engine contributes.
- ``attribution_speedup``: exact patching / attribution patching of *the same cells*: every
  layer x position of ``resid_pre``, ``attn_out`` and ``mlp_out``, noising, all prompts.
  Exact = three ``patch_sweep`` calls with kdgap's default ``skip_identical=True``;
  attribution = one ``attribution_sweep`` (2 forwards + 1 backward).
- ``attribution_speedup_vs_exact_no_skip``: the same with exact at ``skip_identical=False``.
- ``attribution_spearman``: Spearman over all those cells of the prompt-mean effect
  (``LD_patched - LD_clean``), attribution estimate vs exact. Cells whose source activation
  equals the base's in every prompt are exactly 0 in both methods, so on a late edit this
  is dominated by ties; ``attribution_spearman_changed_cells`` is the same over the other
  cells only (``changed_cells`` of ``cells``).

Times are medians over up to ``--repeats`` runs (a measurement stops repeating once its runs
add up to ``--repeat-budget`` seconds), after one warm-up of every method on a small slice.
``--clock`` picks what a time is: ``cpu`` (default on CPU) is this process's CPU time, which
other processes on a shared host do not inflate (with several threads it sums them, so a
ratio compares work, not latency; ``setup.threads`` says how many); ``wall`` (default on
CUDA, where CPU time means nothing) is elapsed time with the device synchronised.
``--threads`` (default 1 on CPU) sets torch's intra-op threads: with more threads than free
cores, OpenMP's spinning workers add CPU time that is neither method's work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

#: The components attribution screens and exact patching re-runs, cell for cell.
SITES = ("resid_pre", "attn_out", "mlp_out")


def build(n_pos: int, batch: int, device: str, seed: int = 0):
    """Random organism-size model; ``{"mid_edit": (model-independent pair)}``."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from kdgap.hooks.patch.core import LogitDiff

    cfg = TransformerBridgeConfig(
        d_model=128, d_head=32, n_layers=4, n_ctx=max(512, n_pos), n_heads=4, d_mlp=512,
        d_vocab=128, act_fn="gelu", normalization_type="LN", seed=seed, device=device,
    )  # fmt: skip
    model = TransformerBridge.boot_native(cfg).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 128, (batch, n_pos), generator=g)
    corrupt = clean.clone()
    edit = n_pos * 2 // 3  # a "rationale" position
    corrupt[:, edit] = (clean[:, edit] + 1 + torch.randint(0, 126, (batch,), generator=g)) % 128
    metric = LogitDiff.of(torch.full((batch,), 5), torch.full((batch,), 6))
    return model, {"mid_edit": (clean.to(device), corrupt.to(device), metric)}


def build_organism(name: str, step: int, batch: int, device: str, kinds, seed: int = 0):
    """A shipped organism and, per pair kind, ``batch`` edits at ``step`` (equal lengths)."""
    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.hooks.patch.pairs import pairs_from_records, tokenize_pairs
    from kdgap.organisms import OrganismFormat, load_organism
    from kdgap.policies.play import play
    from kdgap.policies.reference import make_policy

    fmt = OrganismFormat()
    model, tok = load_organism(name)
    model = model.to(device)
    recs = play(
        TextAgent(model, fmt, mode="forced", tokenizer=tok), BanditConfig(horizon=step + 1),
        n_episodes=batch, seed=seed, driver=make_policy("random"), progress=False,
    )  # fmt: skip
    at = [r for r in recs if r.step == step]
    out = {}
    for kind in kinds:
        pairs = pairs_from_records(at, fmt, kind, n_pairs=batch, seed=seed)
        # The largest equal-length group (patching needs equal lengths).
        group = max(tokenize_pairs([p.pair for p in pairs], tok, fmt), key=lambda g: len(g.index))
        out[kind] = (group.clean_tokens.to(device), group.corrupt_tokens.to(device), group.metric)
    return model, out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, budget_s: float, clock: str = "wall"):
    """``(median seconds, last result)`` over up to ``repeats`` runs within ``budget_s``.

    ``clock="cpu"`` counts this process's CPU time (all its threads) instead of wall time.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    times, out = [], None
    while len(times) < max(1, repeats) and (not times or sum(times) < budget_s):
        sync(device)
        t0 = now()
        out = fn()
        sync(device)
        times.append(now() - t0)
    return statistics.median(times), out


def sub_metric(metric, n: int):
    """The metric of the first ``n`` prompts (for warm-ups)."""
    from kdgap.hooks.patch.core import LogitDiff

    return LogitDiff(metric.token_a[:n], metric.token_b[:n], metric.position[:n])


def changed_cells(model, clean, corrupt) -> torch.Tensor:
    """``[site*layer*pos]`` True where the corrupt activation differs from the clean one in
    at least one prompt (flattened like the effects below: site, layer, pos)."""
    from kdgap.hooks.patch.core import capture, hook_name

    names = [hook_name(s, layer) for s in SITES for layer in range(int(model.cfg.n_layers))]
    a, _ = capture(model, clean, names, logits=False)
    b, _ = capture(model, corrupt, names, logits=False)
    return torch.stack([(a[n] != b[n]).any(-1).any(0) for n in names]).flatten().cpu()


def bench_pairs(model, clean, corrupt, metric, args) -> dict:
    """Every measurement for one pair type."""
    from scipy.stats import spearmanr
    from transformer_lens import patching as tlp

    from kdgap.hooks.patch.attribution import attribution_sweep
    from kdgap.hooks.patch.sweep import patch_sweep

    dev, mem = args.device, args.memory_mb
    batch, n_pos = clean.shape
    idx = torch.arange(batch)

    def run(fn):
        return timed(fn, dev, args.repeats, args.repeat_budget, args.clock)

    # Warm-up of every method on a small slice (first calls pay one-off costs).
    c2, x2, m2 = clean[:2, :8], corrupt[:2, :8], sub_metric(metric, 2)
    m2 = type(m2)(m2.token_a, m2.token_b, torch.full((2,), -1))
    patch_sweep(model, c2, x2, m2, skip_identical=False)
    attribution_sweep(model, c2, x2, m2, SITES, direction="noise")
    _, cache2 = model.run_with_cache(c2)
    tlp.get_act_patch_resid_pre(
        model, x2, cache2, lambda lg: m2.at(lg, torch.arange(2)), reduce="none"
    )

    # 1. Full resid_pre sweep (denoising) against transformer-lens.
    t_ours, ours = run(lambda: patch_sweep(model, clean, corrupt, metric, memory_mb=mem))
    t_no_skip, no_skip = run(
        lambda: patch_sweep(model, clean, corrupt, metric, memory_mb=mem, skip_identical=False)
    )
    t_bridge, bridge = run(
        lambda: patch_sweep(model, clean, corrupt, metric, memory_mb=mem, engine="bridge")
    )
    _, cache = model.run_with_cache(clean)
    t_tl, ref = run(
        lambda: tlp.get_act_patch_resid_pre(
            model, corrupt, cache, lambda lg: metric.at(lg, idx), reduce="none"
        ).values.movedim(-1, 0)
    )
    max_abs_diff = float((ours.values - ref.cpu()).abs().max())

    # 2. Attribution vs exact patching of the same cells (SITES x layer x pos, noising).
    def exact(skip: bool):
        return {
            s: patch_sweep(model, clean, corrupt, metric, s, direction="noise",
                           memory_mb=mem, skip_identical=skip)
            for s in SITES
        }  # fmt: skip

    t_exact, ex = run(lambda: exact(True))
    t_exact_ns, ex_ns = run(lambda: exact(False))
    t_attr, attr = run(lambda: attribution_sweep(model, clean, corrupt, metric, SITES,
                                                 direction="noise"))  # fmt: skip

    def effects(res):
        return torch.cat([(res[s].values - res[s].ld_clean[:, None, None]).mean(0).flatten()
                          for s in SITES])  # fmt: skip

    est = torch.cat([attr.effects[s].mean(0).flatten() for s in SITES])
    tru = effects(ex)
    moved = changed_cells(model, clean, corrupt)
    edited = clean != corrupt
    first_edit = edited.float().argmax(1)
    return {
        "speedup_vs_transformer_lens": t_tl / t_ours,
        "speedup_no_skip": t_tl / t_no_skip,
        "speedup_bridge_engine": t_tl / t_bridge,
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_no_skip": float((no_skip.values - ref.cpu()).abs().max()),
        "max_abs_diff_bridge_engine": float((bridge.values - ref.cpu()).abs().max()),
        "attribution_speedup": t_exact / t_attr,
        "attribution_speedup_vs_exact_no_skip": t_exact_ns / t_attr,
        "attribution_spearman": float(spearmanr(est.numpy(), tru.numpy()).statistic),
        "attribution_spearman_changed_cells": float(
            spearmanr(est[moved].numpy(), tru[moved].numpy()).statistic
        ),
        "cells": int(est.numel()),
        "changed_cells": int(moved.sum()),
        "exact_skip_vs_no_skip_max_abs_diff": float((tru - effects(ex_ns)).abs().max()),
        "edit": {
            "first_edited_position": [int(first_edit.min()), int(first_edit.max())],
            "edited_tokens_per_prompt": float(edited.sum(1).float().mean()),
        },
        "seconds": {
            "kdgap_resid_pre": t_ours,
            "kdgap_resid_pre_no_skip": t_no_skip,
            "kdgap_resid_pre_bridge_engine": t_bridge,
            "transformer_lens_resid_pre": t_tl,
            "kdgap_exact_3_sites": t_exact,
            "kdgap_exact_3_sites_no_skip": t_exact_ns,
            "attribution_3_sites": t_attr,
        },
        "batch": int(batch),
        "n_pos": int(n_pos),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--n-pos", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-mb", type=float, default=256.0)
    ap.add_argument("--organism", default=None, help="shipped organism name (e.g. faithful)")
    ap.add_argument("--step", type=int, default=49, help="organism: bandit step of the prompts")
    ap.add_argument(
        "--pair-types",
        default="conclusion,history",
        help="organism: comma-separated pair kinds; the first fills the top level",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument(
        "--repeat-budget",
        type=float,
        default=5.0,
        help="stop repeating a measurement once its runs took this many seconds",
    )
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default=None,
        help="what a time is: process CPU time or wall time (default: cpu on CPU, else wall)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, torch's own on CUDA)",
    )
    args = ap.parse_args(argv)
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")

    if args.organism:
        kinds = [k.strip() for k in args.pair_types.split(",") if k.strip()]
        model, pairs = build_organism(args.organism, args.step, args.batch, args.device, kinds)
    else:
        model, pairs = build(args.n_pos, args.batch, args.device)
    per_kind = {k: bench_pairs(model, *p, args) for k, p in pairs.items()}
    first = next(iter(per_kind))
    top = per_kind[first]
    out = {
        "speedup_vs_transformer_lens": top["speedup_vs_transformer_lens"],
        "max_abs_diff": top["max_abs_diff"],
        "attribution_speedup": top["attribution_speedup"],
        "attribution_spearman": top["attribution_spearman"],
        "speedup_no_skip": top["speedup_no_skip"],
        "attribution_speedup_vs_exact_no_skip": top["attribution_speedup_vs_exact_no_skip"],
        "attribution_spearman_changed_cells": top["attribution_spearman_changed_cells"],
        "top_level_pair_type": first,
        "pair_types": per_kind,
        "setup": {"model": f"organism {args.organism}" if args.organism
                  else "boot_native 4L d128 4 heads", "batch": top["batch"],
                  "n_pos": top["n_pos"], "n_layers": int(model.cfg.n_layers),
                  "attribution_sites": list(SITES), "device": args.device,
                  "step": args.step if args.organism else None,
                  "threads": torch.get_num_threads(), "host": platform.node(),
                  "memory_mb": args.memory_mb, "repeats": args.repeats,
                  "repeat_budget_s": args.repeat_budget, "clock": args.clock,
                  "torch": torch.__version__},
    }  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
