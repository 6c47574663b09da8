"""Thought cloning and behaviour cloning: supervised fine-tuning on a UCB expert's play, in
the model's own transcript format.

The expert is the UCB reference policy (:mod:`kdgap.policies.reference`), the teacher of
the paper's SFT baselines. For each step of its seeded play the prompt is what the agent
would see (the format's prompt, chat-templated as the agent does) and the target is

- *thought cloning*: the correct UCB rationale (``fmt.write_rationale``), the action
  marker and the UCB arm: the model learns to reason and to act on its reasoning;
- *behaviour cloning*: the action marker and the UCB arm only.

The loss is the next-token cross-entropy of the target tokens (prompt tokens weigh 0),
AdamW, seeded batches. The curve records the loss per update and, every ``eval_every``
updates, how often the model's forced-choice action after its own generated rationale is
the expert's on the training histories (``action_matches_expert``). Checkpoints
(:mod:`kdgap.training.checkpoint`) are written every ``ckpt_every`` updates; a run resumed
from one continues with the same batches and reaches the same curves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kdgap._checks import check_int
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.models.tokens import _pad_id, encode
from kdgap.organisms.train import sequence_loss
from kdgap.policies.play import play
from kdgap.policies.reference import make_policy
from kdgap.training.checkpoint import load_checkpoint, save_checkpoint
from kdgap.training.lora import add_lora, merge_lora

#: Supervised methods: what the target holds.
CLONING = ("thought-cloning", "behavior-cloning")


@dataclass(frozen=True)
class CloneConfig:
    """A cloning run.

    Attributes:
        method: one of :data:`CLONING`.
        episodes, horizon: the expert's play (training histories: every step of it).
        updates: optimiser steps; batch_size: examples per step.
        lr, weight_decay: AdamW.
        eval_every, eval_episodes: the action-matches-expert curve (on the first
            ``eval_episodes`` training episodes); ckpt_every: updates between checkpoints.
        seed: expert bandits and batch order.
        lora_rank, lora_targets: LoRA adapters (Hugging Face models) of this rank on these
            comma-separated modules instead of training every weight (0: every weight;
            "": peft's default modules for the architecture); see
            :mod:`kdgap.training.lora`.
    """

    method: str = "thought-cloning"
    episodes: int = 32
    horizon: int = 50
    updates: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    eval_every: int = 100
    eval_episodes: int = 4
    ckpt_every: int = 100
    seed: int = 0
    lora_rank: int = 0
    lora_targets: str = ""

    def __post_init__(self) -> None:
        check_int("lora_rank", self.lora_rank, minimum=0, hint="(0: train every weight)")
        if self.method not in CLONING:
            raise ValueError(f"method={self.method!r} is not one of {CLONING}.")
        for name in ("episodes", "updates", "batch_size", "eval_every", "eval_episodes",
                     "ckpt_every"):  # fmt: skip
            check_int(name, getattr(self, name))
        check_int("horizon", self.horizon, minimum=2)
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}: need lr > 0, "
                             "weight_decay >= 0.")  # fmt: skip


def expert_examples(
    agent: TextAgent, cfg: BanditConfig, n_episodes: int, *, seed: int, rationale: bool
) -> list[tuple[str, str]]:
    """``(prompt, target)`` for every step of the UCB expert's seeded play, in the agent's
    format (see the module docstring); the target's arm is the one the correct rationale
    concludes with (lowest index on ties, as ``fmt.write_rationale``)."""
    fmt, names = agent.fmt, list(cfg.arm_names)
    records = play(make_policy("ucb"), cfg, n_episodes=n_episodes, seed=seed, progress=False)
    out, acts, rews = [], [], []
    for r in records:
        if r.step == 0:
            acts, rews = [], []
        thought = fmt.write_rationale(cfg, acts, rews)
        arm = fmt.parse_rationale(thought, names)
        act = fmt.action_marker + fmt.arm_continuations(names[arm])[0]
        prompt = agent.chat_prompt(fmt.render_prompt(cfg, acts, rews))
        out.append((prompt, (thought if rationale else "") + act))
        acts, rews = [*acts, r.action], [*rews, r.reward]
    return out


def _tokens(
    agent: TextAgent, examples: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + target per example, and where each target starts."""
    tok = agent.tokenizer
    prompts = encode(agent.model, [p for p, _ in examples], tokenizer=tok)
    targets = tok([t for _, t in examples], add_special_tokens=False)["input_ids"]
    return [p + list(t) for p, t in zip(prompts, targets)], [len(p) for p in prompts]


def _batch(ids, starts, rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and target weights (causal: padding after a row changes nothing
    before it)."""
    n = max(len(ids[i]) for i in rows)
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    weights = torch.zeros((len(rows), n))
    for j, i in enumerate(rows):
        tokens[j, : len(ids[i])] = torch.tensor(ids[i])
        weights[j, starts[i] : len(ids[i])] = 1.0
    return tokens, weights


def action_match_rate(agent: TextAgent, cfg: BanditConfig, n_episodes: int, seed: int) -> float:
    """Share of steps on the expert's histories (UCB drives, seeded ``seed``) where the
    agent's action is the expert's arm (the UCB arm, lowest index on ties)."""
    recs = play(agent, cfg, n_episodes=n_episodes, seed=seed, driver=make_policy("ucb"),
                progress=False)  # fmt: skip
    return float(np.mean([r.action == r.ucb_arms[0] for r in recs]))


def clone(
    agent: TextAgent, cfg: CloneConfig, out: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Fine-tune ``agent.model`` by :attr:`CloneConfig.method` (in place; the bridge ends
    in eval mode, LoRA adapters merged) with checkpoints in ``out/checkpoint``; resumes
    from one.

    Returns:
        ``{"config", "step", "curves": {"update", "loss", "eval_update",
        "action_matches_expert"}}`` (also in the checkpoint).
    """
    model, bandit = agent.model, BanditConfig(horizon=cfg.horizon)
    examples = expert_examples(agent, bandit, cfg.episodes, seed=cfg.seed,
                               rationale=cfg.method == "thought-cloning")  # fmt: skip
    ids, starts = _tokens(agent, examples)
    pad = _pad_id(agent.tokenizer)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, targets=cfg.lora_targets)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(out) / "checkpoint"
    state = load_checkpoint(ckpt, model, opt)
    if state is not None and state["config"] != asdict(cfg):
        raise ValueError(f"out={str(out)!r} holds a run with other settings; use a new --out.")
    state = state or {"config": asdict(cfg), "step": 0,
                      "curves": {"update": [], "loss": [], "eval_update": [],
                                 "action_matches_expert": []}}  # fmt: skip
    curves = state["curves"]
    if not curves["eval_update"]:  # the start, before any update
        model.eval()
        curves["eval_update"].append(0)
        curves["action_matches_expert"].append(
            action_match_rate(agent, bandit, cfg.eval_episodes, cfg.seed)
        )
    bar = tqdm(total=cfg.updates, initial=state["step"], desc=cfg.method, disable=not progress)
    for step in range(state["step"], cfg.updates):
        # Batch order is a function of (seed, step): a resumed run draws the same batches.
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.choice(len(ids), size=min(cfg.batch_size, len(ids)), replace=False)
        tokens, weights = _batch(ids, starts, rows.tolist(), pad)
        model.train()
        loss = sequence_loss(model, tokens.to(model.cfg.device), weights.to(model.cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves["update"].append(step + 1)
        curves["loss"].append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.updates:
            model.eval()
            curves["eval_update"].append(step + 1)
            curves["action_matches_expert"].append(
                action_match_rate(agent, bandit, cfg.eval_episodes, cfg.seed)
            )
        state["step"] = step + 1
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.updates:
            save_checkpoint(ckpt, model, opt, state)
        bar.update(1)
    bar.close()
    merge_lora(model)  # adapters folded into the weights: the model saves as it loaded
    model.eval()
    return state
