"""Confirm kdgap's real-model path on a GPU in a few minutes and print a short table.

Stages: load (bfloat16 by default), batched generation (and greedy bridge generation vs
plain Hugging Face, token for token), forced choice (a short forced-mode play), recording
(``resid_post`` of every layer at the action site) and a small patching sweep (one
scripted conclusion-edit pair, ``resid_pre`` noising over every layer x the last
positions). Run through ``experiments/gpu_check.sh``::

    experiments/gpu_check.sh                      # smollm2 preset on cuda, bfloat16
    experiments/gpu_check.sh /path/to/hf_folder   # any spec load_model accepts
    experiments/gpu_check.sh smollm2 --device cpu --dtype float32 --batch 2 --tokens 8

Exit status: 0 when every stage passed, 1 when one failed, 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="kdgap GPU check")
    ap.add_argument("model", nargs="?", default="smollm2", help="a kdgap model spec")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke test)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=8, help="prompts / episodes per batch")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--positions", type=int, default=8, help="positions in the patch sweep")
    return ap.parse_args(argv)


def check_device(device: str) -> str | None:
    """None when ``device`` is usable, else the reason (checked before anything loads)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (
                f"--device {device}: torch {torch.__version__} sees no CUDA device "
                f"(torch.version.cuda={torch.version.cuda}). Install a CUDA build of torch on "
                "a GPU machine, or pass --device cpu --dtype float32 for a CPU smoke test."
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist."
    elif device != "cpu":
        return f"--device {device!r} is unknown; use cuda, cuda:N or cpu."
    return None


def main(argv=None) -> int:
    args = parse(argv)
    reason = check_device(args.device)
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2_end_to_end import build_pairs

    from kdgap.agent.generation import generate
    from kdgap.agent.prompts import PaperFormat
    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.hooks import record_store
    from kdgap.hooks.patch.pairs import tokenize_pairs
    from kdgap.hooks.patch.sweep import patch_sweep
    from kdgap.models import load_model
    from kdgap.models.tokens import encode
    from kdgap.policies.play import play

    rows: list[tuple[str, float, str, bool]] = []
    state: dict = {}

    def run(name, fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            result, ok = fn()
        except Exception as e:  # noqa: BLE001 - one failed stage is a table row, not a crash
            result, ok = f"{type(e).__name__}: {str(e)[:120]}", False
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - t0, result, ok))
        print(f"  {name}: {'ok' if ok else 'FAILED'} ({rows[-1][1]:.1f} s)", flush=True)

    def load():
        m = load_model(args.model, device=args.device, dtype=args.dtype)
        state["m"] = m
        dt = {str(p.dtype) for p in m.bridge.parameters()}
        ident = m.identity
        return f"{ident.get('architecture')} {ident.get('n_params', 0) / 1e6:.0f}M {dt}", True

    def gen():
        b, tok = state["m"].bridge, state["m"].tokenizer
        qs = [f"Count from {i} to {i + 20}, separated by commas." for i in range(args.batch)]
        if getattr(tok, "chat_template", None):
            qs = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in qs]  # fmt: skip
        t0 = time.perf_counter()
        g = generate(b, qs, max_new_tokens=args.tokens)
        tps = int(g.n_tokens.sum()) / (time.perf_counter() - t0)
        ids = torch.tensor([encode(b, qs[:1])[0]], device=b.cfg.device)
        with torch.no_grad():
            want = b.original_model.generate(
                ids, max_new_tokens=args.tokens, do_sample=False, use_cache=True,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )[0, ids.shape[1] :].tolist()  # fmt: skip
        got = g.token_ids[0]
        n = min(len(got), len(want))
        same = sum(a == b_ for a, b_ in zip(got[:n], want[:n]))
        return f"{tps:.0f} tok/s (batch {args.batch}); vs HF greedy {same}/{n} tokens", same == n

    def forced():
        b = state["m"].bridge
        agent = TextAgent(b, PaperFormat(knowing_doing=True), mode="forced",
                          max_new_tokens=args.tokens)  # fmt: skip
        cfg = BanditConfig(horizon=2)
        recs = play(agent, cfg, n_episodes=args.batch, seed=0, progress=False)
        state["recs"], state["cfg"] = recs, cfg
        sums = np.array([sum(r.action_probs) for r in recs])
        ok = all(r.valid for r in recs) and np.allclose(sums, 1, atol=1e-3)
        acts = np.bincount([r.action for r in recs], minlength=cfg.n_arms).tolist()
        return f"{len(recs)} steps, probs sum to 1: {ok}, action counts {acts}", ok

    def record():
        b = state["m"].bridge
        with tempfile.TemporaryDirectory() as d:
            fmt = PaperFormat(knowing_doing=True, use_chat_template=False)
            store = record_store(b, fmt, state["recs"], "resid_post", "action", Path(d) / "s",
                                 progress=False)  # fmt: skip
            hook = store.hooks[-1]
            acts, _ = store.load(hook=hook, site="action")
            acts = torch.as_tensor(acts).float()
            ok = bool(torch.isfinite(acts).all()) and acts.shape[0] == len(state["recs"])
        return f"{len(store.hooks)} hooks, {hook}: {tuple(acts.shape)} finite={ok}", ok

    def patch():
        b, tok, cfg = state["m"].bridge, state["m"].tokenizer, state["cfg"]
        fmt = PaperFormat(knowing_doing=True, use_chat_template=False)

        def text_fn(p, r):
            if not getattr(tok, "chat_template", None):
                return p + r
            msg = [{"role": "user", "content": p}]
            return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) + r

        pairs = build_pairs(state["recs"], cfg, fmt, tok, text_fn, scripted=True, limit=1)
        if not pairs:
            return "no scripted pair with equal token counts", False
        bos = pairs[0].clean.startswith(tok.bos_token or "\0")
        g = tokenize_pairs(pairs, tok, fmt, prepend_bos=not bos)[0]
        n_pos = g.clean_tokens.shape[1]
        pos = list(range(n_pos - min(args.positions, n_pos), n_pos))
        res = patch_sweep(b, g.clean_tokens, g.corrupt_tokens, g.metric, "resid_pre",
                          direction="noise", positions=pos)  # fmt: skip
        v = res.values[0]  # [layer pos]
        ok = bool(torch.isfinite(v).all())
        ld = (float(res.ld_clean[0]), float(res.ld_corrupt[0]))
        return f"{v.numel()} cells; LD clean {ld[0]:.2f}, corrupt {ld[1]:.2f}", ok

    print(f"gpu_check: {args.model} on {args.device} ({args.dtype})", flush=True)
    for name, fn in (("load", load), ("generate", gen), ("forced choice", forced),
                     ("record", record), ("patch sweep", patch)):  # fmt: skip
        run(name, fn)
        if not rows[-1][3] and name in ("load", "forced choice"):
            break
    print()
    print(f"| {'stage':<14}| {'seconds':>8} | {'ok':<3}| result")
    print(f"|{'-' * 15}|{'-' * 10}|{'-' * 4}|{'-' * 40}")
    for name, secs, result, ok in rows:
        print(f"| {name:<14}| {secs:8.1f} | {'yes' if ok else 'NO':<3}| {result}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name()})")  # fmt: skip
    return 0 if len(rows) == 5 and all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
