"""Benchmark: kdgap batched patching vs transformer_lens.patching, and attribution vs exact.

Both run in one process on the same model, prompts and metric: a full layer x position
``resid_pre`` sweep (denoising). With ``--organism NAME`` the model is that shipped organism
and the prompts are ``--batch`` conclusion edits at step ``--step`` of off-policy episodes
(random driver; :func:`kdgap.hooks.pairs.pairs_from_records`); without it, a
``boot_native`` model of organism size (4 layers, d_model 128, 4 heads) on random tokens
whose corrupt version differs at one position (2/3 of the way in).

    python experiments/bench/patching.py --json OUT [--organism faithful] [--device cuda]

``speedup_no_skip`` times kdgap with ``skip_identical=False``: cells before the first
edited token are then recomputed instead of read off the base run (both are exact).

Writes ``speedup_vs_transformer_lens``, ``max_abs_diff`` (kdgap vs TL, per prompt),
``attribution_speedup`` (exact kdgap sweep of resid_pre+attn_out+mlp_out / attribution of
the same three) and ``attribution_spearman`` (over all cells, prompt means, noising).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build(n_pos: int, batch: int, device: str, seed: int = 0):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from kdgap.hooks.patching import LogitDiff

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
    return model, clean.to(device), corrupt.to(device), metric


def build_organism(name: str, step: int, batch: int, device: str, seed: int = 0):
    """A shipped organism and ``batch`` conclusion edits at ``step`` (equal lengths)."""
    from kdgap.agent.runner import play
    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.hooks.pairs import pairs_from_records, tokenize_pairs
    from kdgap.organisms import OrganismFormat, load_organism
    from kdgap.policies import make_policy

    fmt = OrganismFormat()
    model, tok = load_organism(name)
    model = model.to(device)
    recs = play(
        TextAgent(model, fmt, mode="forced", tokenizer=tok), BanditConfig(horizon=step + 1),
        n_episodes=batch, seed=seed, driver=make_policy("random"), progress=False,
    )  # fmt: skip
    at = [r for r in recs if r.step == step]
    pairs = pairs_from_records(at, fmt, "conclusion", n_pairs=batch, seed=seed)
    (group,) = tokenize_pairs([p.pair for p in pairs], tok, fmt)
    return model, group.clean_tokens.to(device), group.corrupt_tokens.to(device), group.metric


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--n-pos", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-mb", type=float, default=256.0)
    ap.add_argument("--organism", default=None, help="shipped organism name (e.g. faithful)")
    ap.add_argument("--step", type=int, default=49, help="organism: bandit step of the prompts")
    args = ap.parse_args(argv)

    from scipy.stats import spearmanr
    from transformer_lens import patching as tlp

    from kdgap.hooks.attribution import attribution_sweep
    from kdgap.hooks.patching import patch_sweep

    if args.organism:
        model, clean, corrupt, metric = build_organism(
            args.organism, args.step, args.batch, args.device
        )
        args.batch, args.n_pos = clean.shape
    else:
        model, clean, corrupt, metric = build(args.n_pos, args.batch, args.device)
    idx = torch.arange(args.batch)
    patch_sweep(model, clean[:2, :8], corrupt[:2, :8], LogitDiff_small(metric))  # warm up
    sync(args.device)
    t0 = time.perf_counter()
    ours = patch_sweep(model, clean, corrupt, metric, "resid_pre", memory_mb=args.memory_mb)
    sync(args.device)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    patch_sweep(model, clean, corrupt, metric, "resid_pre", memory_mb=args.memory_mb,
                skip_identical=False)  # fmt: skip
    sync(args.device)
    t_no_skip = time.perf_counter() - t0

    _, cache = model.run_with_cache(clean)
    t0 = time.perf_counter()
    ref = tlp.get_act_patch_resid_pre(
        model, corrupt, cache, lambda lg: metric.at(lg, idx), reduce="none"
    ).values.movedim(-1, 0)
    sync(args.device)
    t_tl = time.perf_counter() - t0
    max_abs_diff = float((ours.values - ref.cpu()).abs().max())

    sites = ("resid_pre", "attn_out", "mlp_out")
    t0 = time.perf_counter()
    exact = {
        s: patch_sweep(model, clean, corrupt, metric, s, direction="noise",
                       memory_mb=args.memory_mb)
        for s in sites
    }  # fmt: skip
    sync(args.device)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    attr = attribution_sweep(model, clean, corrupt, metric, sites, direction="noise")
    sync(args.device)
    t_attr = time.perf_counter() - t0
    est = torch.cat([attr.effects[s].mean(0).flatten() for s in sites])
    tru = torch.cat([(exact[s].values - exact[s].ld_clean[:, None, None]).mean(0).flatten()
                     for s in sites])  # fmt: skip
    rho = float(spearmanr(est.numpy(), tru.numpy()).statistic)

    out = {
        "speedup_vs_transformer_lens": t_tl / t_ours,
        "speedup_no_skip": t_tl / t_no_skip,
        "max_abs_diff": max_abs_diff,
        "attribution_speedup": t_exact / t_attr,
        "attribution_spearman": rho,
        "seconds": {"kdgap_resid_pre": t_ours, "transformer_lens_resid_pre": t_tl,
                    "kdgap_resid_pre_no_skip": t_no_skip,
                    "kdgap_exact_3_sites": t_exact, "attribution_3_sites": t_attr},
        "setup": {"model": f"organism {args.organism}" if args.organism
                  else "boot_native 4L d128 4 heads", "batch": args.batch,
                  "n_pos": args.n_pos, "cells": int(model.cfg.n_layers) * args.n_pos,
                  "device": args.device, "step": args.step if args.organism else None,
                  "threads": torch.get_num_threads(), "host": platform.node(),
                  "memory_mb": args.memory_mb},
    }  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    return out


def LogitDiff_small(metric):  # noqa: N802 - a two-prompt copy of the metric for warm-up
    from kdgap.hooks.patching import LogitDiff

    return LogitDiff(metric.token_a[:2], metric.token_b[:2], metric.position[:2])


if __name__ == "__main__":
    main()
