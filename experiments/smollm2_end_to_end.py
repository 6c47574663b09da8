"""SmolLM2-135M-Instruct end to end: behaviour, recording, probes, patching, AIW (issue 8).

Stages (each timed; a stage that cannot run on this model's outputs records why):

1. **Behaviour, forced**: ``--episodes`` Bernoulli 5-arm bandits x ``--steps`` steps, the
   knowing-doing prompt (``PaperFormat(knowing_doing=True)``, chat template), forced
   choice after the model's own rationale, with the conclusion-edit counterfactual.
2. **Behaviour, free**: a smaller run in free mode for the invalid-action rate.
3. **Recording**: ``resid_post`` of every layer at the ``action`` site of stage 1.
4. **Probes**: ``kdgap.probes.knowing_doing`` (rationale arm vs action) and a ``sweep``.
5. **Patching**: conclusion-edit pairs (``kdgap.hooks.patch.pairs``) from the model's own
   parsable rationales; when it writes fewer than ``--min-pairs``, from *scripted*
   rationales (the true ``<ucb_values>`` block written into its mouth) instead, and the
   summary says which. Mediated fraction via ``kdgap.hooks.patch.mediation``, a behavioural
   flip rate on the same pairs, and one ``resid_pre`` noising heatmap.
6. **Alice in Wonderland**: ``kdgap.report.aiw.aiw_study``.

Writes ``OUT/summary.json`` (every number), ``OUT/records_{forced,free}.jsonl``,
``OUT/aiw.json`` (all samples), ``OUT/store/`` and ``OUT/figures/*.png|pdf``::

    python experiments/smollm2_end_to_end.py --out runs/smollm2

Threads: ``--threads auto`` (default) uses every core when the machine is idle and one
thread when other processes keep it busy (``/proc/stat`` over one second): on a shared 2-core
machine, two OpenMP threads that keep losing their core to other processes ran 3-4x
*slower* than one thread (measured: one SmolLM2 prompt pass + 16 tokens, 17-24 s vs
5-6 s; ``OMP_WAIT_POLICY=PASSIVE`` narrowed that to 1.4x). The summary records the
threads used and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
import traceback
from pathlib import Path

# Before torch starts OpenMP: idle threads sleep instead of spinning, which is what hurts
# when the cores are shared (see the module docstring). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def busy_cores(seconds: float = 1.0) -> float:
    """Cores other processes keep busy now: ``/proc/stat`` sampled ``seconds`` apart (the
    1-minute load average lags: right after another job it still reads ~1 on an idle
    machine); the load average where ``/proc/stat`` is missing."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v) - idle, sum(v)

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except OSError:
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


def auto_threads() -> int:
    """Every core when the machine is idle, fewer as other processes load it (>= 1)."""
    n = os.cpu_count() or 1
    return max(1, min(n, int(n - busy_cores() + 0.5)))


def _call(fn, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts."""
    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _history(records, rec):
    """``(actions, rewards)`` shown in ``rec``'s prompt (its episode's earlier steps)."""
    ep = [r for r in records if r.episode == rec.episode and r.step < rec.step]
    ep.sort(key=lambda r: r.step)
    return [r.action for r in ep], [r.reward for r in ep]


def scripted_rationale(cfg, actions, rewards) -> str:
    """The correct knowing-doing rationale for a history: the true UCB value of each arm."""
    from kdgap.envs.stats import ucb_values

    counts = np.bincount(np.asarray(actions, int), minlength=cfg.n_arms)
    sums = np.bincount(np.asarray(actions, int), weights=np.asarray(rewards, float),
                       minlength=cfg.n_arms)  # fmt: skip
    vals = ucb_values(counts, sums, c=cfg.ucb_c, bonus=cfg.ucb_bonus)
    lines = [f"{n}: {'inf' if np.isinf(v) else f'{v:.2f}'}" for n, v in zip(cfg.arm_names, vals)]
    return "<ucb_values>\n" + "\n".join(lines) + "\n</ucb_values>\n"


def swap_names(rationale: str, arm_x: int, arm_y: int, names) -> str:
    """Swap the names of two arms' ``name: value`` lines (values stay in place), so the
    arm holding the top value changes while every number keeps its tokens."""
    import re

    a, b = names[arm_x], names[arm_y]
    pat = re.compile(rf"^({re.escape(a)}|{re.escape(b)})(?=\s*:)", re.MULTILINE)
    return pat.sub(lambda m: b if m.group(1) == a else a, rationale)


def _pair_from(prompt, clean_rat, corrupt_rat, top, new, names, marker, text_fn):
    from kdgap.hooks.patch.pairs import CounterfactualPair

    head = text_fn(prompt, "")
    clean, corrupt = text_fn(prompt, clean_rat) + marker, text_fn(prompt, corrupt_rat) + marker
    return CounterfactualPair("conclusion", clean, corrupt, int(top), int(new), tuple(names),
                              (0, len(head)), (len(head), len(head) + len(clean_rat)))  # fmt: skip


def build_pairs(records, cfg, fmt, tok, text_fn, *, scripted: bool, limit: int):
    """Conclusion-edit pairs whose clean and corrupt texts have equal token counts.

    The edit is ``fmt.edit_conclusion`` (value strings swapped, via ``make_pair``); for
    scripted rationales, where an untried arm's ``inf`` and a number tokenise to different
    lengths, the two arms' names are swapped instead (:func:`swap_names`), which moves the
    top value to the new arm just the same.
    """
    from kdgap.hooks.patch.pairs import arm_token, make_pair

    pairs, names = [], list(cfg.arm_names)
    ntok = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
    for rec in records:
        if len(pairs) >= limit:
            break
        actions, rewards = _history(records, rec)
        if scripted:
            completion = scripted_rationale(cfg, actions, rewards) + fmt.action_marker
        elif rec.rationale_arm is not None:
            completion = rec.completion
        else:
            continue
        rat = fmt.strip_action(completion)
        top = fmt.parse_rationale(rat, names)
        if top is None:
            continue
        for new in [a for a in range(cfg.n_arms) if a != top]:
            if arm_token(tok, fmt, names[top]) == arm_token(tok, fmt, names[new]):
                continue
            cands = []
            try:
                cands.append(make_pair("conclusion", fmt, cfg, actions, rewards, completion,
                                       new, text_fn=text_fn))  # fmt: skip
            except ValueError:
                pass
            edited = swap_names(rat, top, new, names)
            if scripted and fmt.parse_rationale(edited, names) == new:
                prompt = fmt.render_prompt(cfg, actions, rewards)
                cands.append(_pair_from(prompt, rat, edited, top, new, names,
                                        fmt.action_marker, text_fn))  # fmt: skip
            ok = [p for p in cands if ntok(p.clean) == ntok(p.corrupt)]
            if ok:
                pairs.append(ok[0])
                break
    return pairs


def stage(summary, name, fn):
    """Run one stage, store its seconds, and its error instead of crashing the run."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(-3)}
        print(f"[{name}] FAILED: {e}", flush=True)
    summary["seconds"][name] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {summary['seconds'][name]} s", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--free-episodes", type=int, default=8)
    ap.add_argument("--free-steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=8, help="most conclusion-edit pairs")
    ap.add_argument("--min-pairs", type=int, default=4)
    ap.add_argument("--heatmap-positions", type=int, default=12)
    ap.add_argument("--aiw-samples", type=int, default=8)
    ap.add_argument("--aiw-tokens", type=int, nargs=3, default=[128, 160, 16],
                    metavar=("STANDARD", "THINKING", "RESTRICTED"))  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads, or auto (all cores if idle, 1 if busy)")  # fmt: skip
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    threads = auto_threads() if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(threads)

    from kdgap.agent.prompts import PaperFormat
    from kdgap.agent.text_agent import TextAgent
    from kdgap.envs.bandit import BanditConfig
    from kdgap.models import load_model
    from kdgap.policies.play import play
    from kdgap.records import write_records
    from kdgap.report import figures
    from kdgap.report.behavior import behavior_metrics
    from kdgap.report.verdict import RULE, verdict

    t_start = time.perf_counter()
    out, figs = args.out, args.out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    summary: dict = {"command": vars(args) | {"out": str(args.out)}, "seconds": {},
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "load_average": {"start": list(load_start)}}  # fmt: skip
    loaded = stage(summary, "load", lambda: load_model(args.model, device=args.device,
                                                       dtype=args.dtype))  # fmt: skip
    if isinstance(loaded, dict):
        raise SystemExit(f"could not load {args.model!r}: {loaded['error']}")
    bridge, tok = loaded.bridge, loaded.tokenizer
    summary["model"] = {k: v for k, v in loaded.identity.items() if k != "hash"}
    fmt = PaperFormat(knowing_doing=True)
    raw_fmt = PaperFormat(knowing_doing=True, use_chat_template=False)  # texts are templated
    cfg = BanditConfig(horizon=args.steps)
    state: dict = {}

    def chat(prompt: str, rationale: str) -> str:
        msg = [{"role": "user", "content": prompt}]
        return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) + rationale

    def forced():
        agent = TextAgent(bridge, fmt, mode="forced", max_new_tokens=args.max_new_tokens,
                          seed=args.seed, counterfactual=True)  # fmt: skip
        recs = play(agent, cfg, n_episodes=args.episodes, seed=args.seed, progress=True)
        write_records(out / "records_forced.jsonl", recs)
        state["records"] = recs
        m = behavior_metrics(recs)
        m["rationale_parsed_rate"] = float(np.mean([r.rationale_arm is not None for r in recs]))
        return m

    def free():
        free_cfg = BanditConfig(horizon=args.free_steps)
        agent = TextAgent(bridge, fmt, mode="free", max_new_tokens=args.max_new_tokens,
                          seed=args.seed)  # fmt: skip
        recs = play(agent, free_cfg, n_episodes=args.free_episodes, seed=args.seed,
                    progress=True)  # fmt: skip
        write_records(out / "records_free.jsonl", recs)
        m = behavior_metrics(recs)
        return {k: m[k] for k in ("invalid_rate", "rationale_correct", "action_matches",
                                  "action_coverage")} | {"n_steps": len(recs)}  # fmt: skip

    def record():
        from kdgap.hooks import record_store

        store = record_store(bridge, raw_fmt, state["records"], "resid_post", "action",
                             out / "store", batch_size=8, model_id=args.model, seed=args.seed,
                             progress=True)  # fmt: skip
        state["store"] = store
        return {"path": str(out / "store"), "n_examples": len(state["records"]),
                "hooks": len(store.hooks)}  # fmt: skip

    def probes():
        from kdgap.probes import knowing_doing, sweep

        res: dict = {}
        try:
            kd = _call(knowing_doing, state["store"], n_boot=200, rare_classes="drop")
            pl = kd.per_layer
            res["knowing_doing"] = {
                "summary": kd.summary(), "divergence_layer": kd.divergence_layer,
                "per_layer": json.loads(pl.to_json(orient="records")),
            }  # fmt: skip
            fig = {"layers": pl["layer"].tolist(), "chance": float(pl["doing_chance"].iloc[-1]),
                   "divergence_layer": kd.divergence_layer}  # fmt: skip
            for who in ("knowing", "doing"):
                fig[f"{who}_acc"] = pl[f"{who}_acc"].tolist()
                fig[f"{who}_ci"] = pl[[f"{who}_acc_low", f"{who}_acc_high"]].values.tolist()
                fig[f"{who}_acc_disagree"] = fig[f"{who}_ci_disagree"] = None
            figures.probe_layers(fig, figs / "probes", title="SmolLM2-135M: probes at ACTION=")
        except Exception as e:  # noqa: BLE001
            res["knowing_doing"] = {"error": f"{type(e).__name__}: {e}"}
        labels = ["action", "rationale_arm", "greedy_arm", "ucb_arm"]
        res["sweep_best_layer"] = {}
        for lab in labels:  # one label at a time: a single-class label must not stop the rest
            try:
                df = _call(sweep, state["store"], labels=[lab], probes=["logistic"], n_boot=200,
                           rare_classes="drop", out=out / f"probe_sweep_{lab}.csv")  # fmt: skip
                best = df.sort_values("accuracy").iloc[-1]
                res["sweep_best_layer"][lab] = {
                    k: (None if best[k] != best[k] else float(best[k]))
                    for k in ("layer", "accuracy", "chance", "selectivity", "n_test")
                }  # fmt: skip
            except Exception as e:  # noqa: BLE001
                res["sweep_best_layer"][lab] = {"error": f"{type(e).__name__}: {e}"}
        return res

    def patching():
        from kdgap.hooks.patch.mediation import mediation
        from kdgap.hooks.patch.pairs import tokenize_pairs
        from kdgap.hooks.patch.sweep import patch_sweep

        recs, res = state["records"], {}
        pairs = build_pairs(recs, cfg, raw_fmt, tok, chat, scripted=False, limit=args.pairs)
        res["pairs_source"], res["n_model_pairs"] = "model", len(pairs)
        if len(pairs) < args.min_pairs:
            pairs = build_pairs(recs, cfg, raw_fmt, tok, chat, scripted=True, limit=args.pairs)
            res["pairs_source"] = "scripted"
        res["n_pairs"] = len(pairs)
        if not pairs:
            raise ValueError("no conclusion-edit pair could be built")
        # behaviour on the same pairs: does forced choice move with the edited conclusion?
        agent = TextAgent(bridge, fmt, mode="forced")
        agent.reset(cfg, 0)
        lp = agent.arm_logprobs([p.clean for p in pairs] + [p.corrupt for p in pairs])
        a_clean, a_corrupt = lp[: len(pairs)].argmax(1), lp[len(pairs) :].argmax(1)
        res["pair_flip_rate"] = float((a_clean != a_corrupt).float().mean())
        res["pair_follows_edit"] = float(np.mean(
            [int(a) == p.arm_b for a, p in zip(a_corrupt, pairs)]))  # fmt: skip
        res["pair_clean_follows_rationale"] = float(np.mean(
            [int(a) == p.arm_a for a, p in zip(a_clean, pairs)]))  # fmt: skip
        med = mediation(bridge, pairs, tok, raw_fmt, prepend_bos=False, n_boot=500)
        res |= {"mediated_fraction": med.fraction, "mediated_fraction_ci": med.fraction_ci,
                "total_effect_mean": float(med.total_effect.mean()),
                "path_effect_mean": float(med.path_effect.mean()),
                "layer_profile": med.layer_fraction.tolist(), "summary": med.summary()}  # fmt: skip
        figures.mediation_profile(
            {"layers": list(range(len(med.layer_fraction))), "layer_profile":
             med.layer_fraction.tolist(), "layer_profile_ci": med.layer_ci.tolist(),
             "mediated_fraction": med.fraction, "mediated_fraction_ci": med.fraction_ci},
            figs / "mediation", title=f"SmolLM2-135M ({res['pairs_source']} rationales)",
        )  # fmt: skip
        g = tokenize_pairs(pairs[:1], tok, raw_fmt, prepend_bos=False)[0]
        n_pos = g.clean_tokens.shape[1]
        positions = list(range(max(0, n_pos - args.heatmap_positions), n_pos))
        layers = list(range(0, int(bridge.cfg.n_layers), 3))
        pr = patch_sweep(bridge, g.clean_tokens, g.corrupt_tokens, g.metric, "resid_pre",
                         direction="noise", layers=layers, positions=positions)  # fmt: skip
        norm = pr.normalised()  # [layer pos]
        res["heatmap"] = {"layers": layers, "positions": positions, "values": norm.tolist()}
        toks = [tok.decode([t]) for t in g.clean_tokens[0, positions].tolist()]
        figures.patching_heatmap(
            norm.tolist(),
            toks,
            figs / "patching",
            title="resid_pre noising, one conclusion edit (every 3rd layer)",
        )
        return res

    def aiw():
        from kdgap.report.aiw import PROMPT_TYPES, aiw_study

        res = aiw_study(bridge, n_samples=args.aiw_samples, temperature=0.7, seed=args.seed,
                        max_new_tokens=dict(zip(PROMPT_TYPES, args.aiw_tokens)))  # fmt: skip
        (out / "aiw.json").write_text(json.dumps(res.to_dict(), indent=1))
        return res.to_dict(with_samples=False)

    summary["forced"] = stage(summary, "forced", forced)
    summary["free"] = stage(summary, "free", free)
    if "records" in state:
        summary["recording"] = stage(summary, "record", record)
        if "store" in state:
            summary["probes"] = stage(summary, "probes", probes)
        summary["patching"] = stage(summary, "patching", patching)
    summary["aiw"] = stage(summary, "aiw", aiw)

    f, p = summary["forced"], summary.get("patching", {})
    flip = f.get("counterfactual_flip_rate")
    flip_src = "model rationales (agent counterfactual)"
    if flip is None and "pair_flip_rate" in p:
        flip, flip_src = p["pair_flip_rate"], f"{p['pairs_source']} conclusion-edit pairs"
    med = p.get("mediated_fraction")
    summary["verdict"] = {"verdict": verdict(flip, med), "flip_rate": flip,
                          "flip_rate_source": flip_src, "mediated_fraction": med,
                          "rule": RULE}  # fmt: skip
    if "kd_matrix" in f and f["kd_matrix"]:
        figures.kd_matrix(f["kd_matrix"], figs / "kd_matrix", title="SmolLM2-135M")
    if "coverage_curve" in f:
        figures.behavior_curves({"SmolLM2 forced": f}, figs / "behavior", title="SmolLM2-135M")
    summary["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    summary["load_average"]["end"] = list(os.getloadavg())
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(headline(summary), indent=1), flush=True)
    return summary


def headline(s: dict) -> dict:
    """The numbers the README quotes."""
    f, fr, a = s.get("forced", {}), s.get("free", {}), s.get("aiw", {}).get("summary", {})
    return {
        "rationale_correct": f.get("rationale_correct"),
        "rationale_parsed_rate": f.get("rationale_parsed_rate"),
        "action_matches": f.get("action_matches"),
        "free_invalid_rate": fr.get("invalid_rate"),
        "aiw_correct_rate": {k: (v["correct_rate"], v["se"]) for k, v in a.items()},
        "verdict": s.get("verdict"),
        "seconds": s.get("seconds"),
    }


if __name__ == "__main__":
    main()
