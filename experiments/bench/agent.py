"""Generation throughput of the batched text agent vs one episode at a time.

Same model, same bandits, same settings; the only difference is ``play(batch_size=...)``:
all episodes generated together (left-padded batch, KV cache) or one episode per batch.
Throughput = tokens the model generated / wall time of ``play`` (prompt rendering,
tokenisation and parsing included), median over repeats.

Model: ``TransformerBridge.boot_native`` with random weights, 4 layers, d_model 128,
4 heads (the size of kdgap's model organisms), with a byte-level BPE tokenizer trained
here on bandit prompts. Free mode, greedy, EOS disabled by construction (random weights
rarely emit it; the count uses the tokens really produced).

Usage: python experiments/bench/agent.py --json OUT.json [--episodes 8 --steps 3 ...]

``--forced-smollm2`` instead times one *forced* agent step on SmolLM2-135M-Instruct (16
episodes at step 10, knowing-doing prompt, rationale up to 64 tokens, conclusion-edit
counterfactual) on the hook-free fast path (:mod:`kdgap.agent.hf_decoding` on the twin of
:mod:`kdgap.models.twins`) and on the
reference path (``bridge.generate`` + scoring through the bridge forward; selected by
making ``twins.fast_model`` return None), alternating the two, and checks that both
produce the same completions and actions (action probabilities to 1e-4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdgap.agent import PaperFormat, TextAgent  # noqa: E402
from kdgap.envs import BanditConfig, VectorBandit  # noqa: E402
from kdgap.io import atomic_write_json  # noqa: E402
from kdgap.models import load_model, twins  # noqa: E402
from kdgap.policies.play import history_of, play  # noqa: E402


def build_tokenizer(cfg: BanditConfig, vocab_size: int = 1000):
    """A byte-level BPE fast tokenizer trained on rendered bandit prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    fmt = PaperFormat(knowing_doing=True)
    corpus = []
    for t in (0, 5, 20, 49):
        actions = rng.integers(cfg.n_arms, size=t).tolist()
        corpus.append(fmt.render_prompt(cfg, actions, rng.integers(2, size=t).tolist()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    # A saved-and-reloaded tokenizer is what the bridge expects (it re-reads name_or_path),
    # so the folder must outlive this function.
    d = tempfile.mkdtemp(prefix="kdgap_bench_tok_")
    hf.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def build_model(tokenizer):
    """Random-weight boot_native model: 4 layers, d_model 128, 4 heads, eval mode."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=128, d_head=32, n_layers=4, n_ctx=4096, n_heads=4, d_mlp=512,
        d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0,
    )  # fmt: skip
    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer).eval()


class CountingAgent(TextAgent):
    """A TextAgent that adds up the tokens it generated."""

    tokens = 0

    def act(self, history):
        dec = super().act(history)
        self.tokens += int(dec.extras["generated_tokens"].sum())
        return dec


def measure(model, cfg, *, episodes, max_new_tokens, batch_size) -> float:
    """Tokens per second of one ``play`` run."""
    agent = CountingAgent(model, PaperFormat(), mode="free", max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    play(agent, cfg, n_episodes=episodes, seed=0, batch_size=batch_size, progress=False)
    return agent.tokens / (time.perf_counter() - t0)


def forced_smollm2(args) -> dict:
    """Seconds (wall and CPU) of one forced step, fast path vs reference path."""
    loaded = load_model("smollm2")
    cfg = BanditConfig(horizon=20)
    env = VectorBandit(cfg, 16)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        env.step(rng.integers(cfg.n_arms, size=16))
    history = history_of(env, np.arange(16))
    real_fast = twins.fast_model

    def step(fast: bool):
        twins.fast_model = real_fast if fast else (lambda bridge, **kw: None)
        try:
            agent = TextAgent(loaded.bridge, PaperFormat(knowing_doing=True), mode="forced",
                              max_new_tokens=64, counterfactual=True)  # fmt: skip
            agent.reset(cfg, 0)
            w, c = time.perf_counter(), time.process_time()
            dec = agent.act(history)
            return time.perf_counter() - w, time.process_time() - c, dec
        finally:
            twins.fast_model = real_fast

    runs: dict = {"fast": [], "reference": []}
    decs = {}
    for _ in range(args.repeats):
        for name in ("fast", "reference"):
            wall, cpu, decs[name] = step(name == "fast")
            runs[name].append({"wall_s": wall, "cpu_s": cpu})
            print(f"{name}: wall {wall:.1f} s, cpu {cpu:.1f} s", flush=True)
    a, b = decs["fast"], decs["reference"]
    same = {
        "completions": a.completions == b.completions,
        "actions": bool((a.actions == b.actions).all()),
        "action_probs_max_abs_diff": float(np.abs(a.action_probs - b.action_probs).max()),
    }
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    return {
        "runs": runs, "median_wall_s": med, "speedup": med["reference"] / med["fast"],
        "same_decisions": same,
        "config": {"model": "smollm2", "episodes": 16, "step": 10, "max_new_tokens": 64,
                   "counterfactual": True, "torch_threads": torch.get_num_threads(),
                   "load_average": list(os.getloadavg()), "repeats": args.repeats},
    }  # fmt: skip


def main(argv=None) -> dict:
    """Run the benchmark and write ``{batched,sequential}_tokens_per_s`` and ``speedup``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON path")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="horizon of each bandit")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--forced-smollm2", action="store_true",
                    help="time one forced SmolLM2 step, fast vs reference path")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.forced_smollm2:
        out = forced_smollm2(args)
        atomic_write_json(args.json, out)
        print(f"forced step: fast {out['median_wall_s']['fast']:.1f} s, reference "
              f"{out['median_wall_s']['reference']:.1f} s, {out['speedup']:.2f}x; "
              f"same decisions: {out['same_decisions']}")  # fmt: skip
        return out
    cfg = BanditConfig(horizon=args.steps)
    tok = build_tokenizer(BanditConfig())
    model = build_model(tok)
    kw = dict(episodes=args.episodes, max_new_tokens=args.max_new_tokens)
    measure(model, cfg, batch_size=None, **{**kw, "episodes": 2})  # warm-up
    batched = [measure(model, cfg, batch_size=None, **kw) for _ in range(args.repeats)]
    seq = [measure(model, cfg, batch_size=1, **kw) for _ in range(args.repeats)]
    out = {
        "batched_tokens_per_s": statistics.median(batched),
        "sequential_tokens_per_s": statistics.median(seq),
        "speedup": statistics.median(batched) / statistics.median(seq),
        "config": {
            **vars(args),
            "model": "boot_native 4L d128 4H random",
            "vocab": len(tok),
            "torch_threads": torch.get_num_threads(),
        },  # fmt: skip
    }
    atomic_write_json(args.json, out)
    print(f"batched {out['batched_tokens_per_s']:.1f} tok/s, sequential "
          f"{out['sequential_tokens_per_s']:.1f} tok/s, speedup {out['speedup']:.2f}x")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
