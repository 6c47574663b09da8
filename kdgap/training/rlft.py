"""RL fine-tuning (RLFT) on the model's own bandit play: GRPO advantages, PPO clipping, a
KL penalty to the starting model.

One update (Schmied et al. 2025's RLFT, with a group-relative baseline):

1. **Rollouts**, on-policy and seeded: ``episodes`` bandits of the family, each played
   ``group`` times by the model in free mode at ``temperature`` (rationale and action are
   the model's own text; the group's rollouts differ by the agent's sampling seed only).
   Reward of a step: the bandit reward, or ``invalid_penalty`` (the paper's -5) when the
   model wrote no valid action (the environment then executes a random arm, uncredited).
2. **Advantages** (GRPO): the return-to-go ``G_t = sum_{k >= t} gamma^(k - t) r_k`` of
   each step minus the mean of ``G_t`` over the group's rollouts of the same bandit at
   the same step, divided by the std over the update's steps. The baseline of a step is
   computed from *other* rollouts' choices at that step index as well as its own, which
   keeps it (nearly) independent of the action being credited, with no value network to
   train. A learned value baseline (PPO's critic) needs a head on the model and its own
   fitting schedule; on bandit episodes the group already gives a low-variance baseline
   per bandit and step.
3. **PPO-style update**: ``epochs`` passes over shuffled minibatches of the update's
   steps. Every completion token (rationale and action) carries its step's advantage;
   the loss per token is ``-min(rho * A, clip(rho, 1 - clip, 1 + clip) * A) + kl_coef *
   k3``, with ``rho = pi / pi_old`` (``pi_old``: the rollout policy) and ``k3 =
   exp(ref - logp) - (ref - logp) - 1`` (Schulman's non-negative estimator of
   ``KL(pi || pi_ref)``, ``pi_ref`` the frozen starting model), averaged over tokens.

Why not TRL's ``GRPOTrainer``: it scores one completion per prompt with a reward
function; a bandit episode is ``horizon`` dependent turns whose prompts are built from the
model's own earlier actions, and kdgap's organisms are native bridges, not Hugging Face
``PreTrainedModel`` s. This compact loop runs on any :class:`~kdgap.agent.text_agent.TextAgent`.

Curves per update: mean bandit reward, invalid share, regret, action follows rationale,
rationale correct (concludes with a true UCB arm), KL to the start, loss, clip fraction,
and ``no_signal``: the share of steps whose advantage is 0 because every rollout of the
group earned the same return there (a policy without entropy gives no gradient).
Checkpoints as in :mod:`kdgap.training.checkpoint`; a resumed run replays the same
rollouts (seeded by ``(seed, update)``) and reaches the same curves.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from tqdm.auto import tqdm

from kdgap._checks import check_int
from kdgap.agent.text_agent import TextAgent
from kdgap.envs.bandit import BanditConfig
from kdgap.models.tokens import _pad_id
from kdgap.policies.play import play
from kdgap.records import StepRecord
from kdgap.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from kdgap.training.cloning import _batch, _tokens
from kdgap.training.lora import add_lora, merge_lora

#: The starting weights (the KL reference), saved beside the checkpoint.
START = "start.safetensors"

#: Curves :func:`rlft` writes, one value per update.
CURVES = ("reward", "invalid", "regret", "follows_rationale", "rationale_correct", "kl",
          "loss", "clip_fraction", "no_signal")  # fmt: skip


@dataclass(frozen=True)
class RlftConfig:
    """An RLFT run.

    Attributes:
        n_arms, horizon, gap: the Bernoulli bandit family played (``gap``: see
            :class:`~kdgap.envs.bandit.BanditConfig`).
        episodes: bandits per update; group: rollouts per bandit (the GRPO group).
        updates: rollout-and-train rounds; epochs: passes over each round's steps;
            minibatch: steps per optimiser step.
        lr: AdamW learning rate; clip: PPO clip range; kl_coef: weight of the KL to the
            start; gamma: discount of the return-to-go.
        invalid_penalty: reward of a step without a valid action (paper: -5).
        temperature: sampling temperature of the rollouts (paper: 1).
        max_new_tokens: most tokens per completion (None: the agent's).
        ckpt_every: updates between checkpoints.
        seed: rollouts (bandits, rewards, sampling) and minibatch order.
        lora_rank, lora_targets: LoRA adapters instead of every weight (as
            :class:`~kdgap.training.cloning.CloneConfig`).
    """

    n_arms: int = 5
    horizon: int = 50
    gap: float | None = None
    episodes: int = 8
    group: int = 4
    updates: int = 20
    epochs: int = 2
    minibatch: int = 64
    lr: float = 2e-5
    clip: float = 0.2
    kl_coef: float = 0.05
    gamma: float = 0.9
    invalid_penalty: float = -5.0
    temperature: float = 1.0
    max_new_tokens: int | None = None
    ckpt_every: int = 10
    seed: int = 0
    lora_rank: int = 0
    lora_targets: str = ""

    def __post_init__(self) -> None:
        check_int("lora_rank", self.lora_rank, minimum=0, hint="(0: train every weight)")
        for name in ("episodes", "group", "updates", "epochs", "minibatch", "ckpt_every"):
            check_int(name, getattr(self, name))
        check_int("group", self.group, minimum=2, hint="(a group-relative baseline needs 2)")
        check_int("max_new_tokens", self.max_new_tokens, optional=True)
        for name, ok in (("lr", self.lr > 0), ("clip", 0 < self.clip < 1),
                         ("kl_coef", self.kl_coef >= 0), ("gamma", 0 <= self.gamma <= 1),
                         ("temperature", self.temperature > 0)):  # fmt: skip
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; see "
                                 "RlftConfig's docstring for each setting's range.")  # fmt: skip
        self.bandit  # noqa: B018 - n_arms, horizon and gap are checked here

    @property
    def bandit(self) -> BanditConfig:
        """The bandit family the rollouts play."""
        return BanditConfig(n_arms=self.n_arms, horizon=self.horizon, gap=self.gap)


def rollouts(
    agent: TextAgent, cfg: RlftConfig, update: int
) -> tuple[list[StepRecord], Float[np.ndarray, " steps"]]:
    """Update ``update``'s on-policy rollouts and their credited rewards.

    Returns ``(records, rewards)``: ``group * episodes * horizon`` records, rollout ``g``
    of bandit ``e`` at ``[(g * episodes + e) * horizon : ... + horizon]``; ``rewards``
    is the bandit reward, or ``invalid_penalty`` where the action was invalid.
    """
    # The same seed for every member: same bandits and reward draws, own sampling.
    seed = int(np.random.SeedSequence([cfg.seed, update]).generate_state(1)[0])
    records = []
    for g in range(cfg.group):
        sampler = TextAgent(
            agent.model, agent.fmt, mode="free", temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens or agent.max_new_tokens,
            seed=g, tokenizer=agent.tokenizer, batch_size=agent.batch_size,
        )  # fmt: skip
        records += play(sampler, cfg.bandit, n_episodes=cfg.episodes, seed=seed, progress=False)
    rewards = np.array([r.reward if r.valid else cfg.invalid_penalty for r in records])
    return records, rewards


def grpo_advantages(
    rewards: Float[np.ndarray, " steps"], group: int, episodes: int, horizon: int,
    gamma: float,
) -> Float[np.ndarray, " steps"]:  # fmt: skip
    """Group-relative advantages of :func:`rollouts`' rewards (module docstring, step 2)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(group, episodes, horizon)
    ret = np.zeros_like(r)
    acc = np.zeros(r.shape[:2])
    for t in range(horizon - 1, -1, -1):
        acc = r[:, :, t] + gamma * acc
        ret[:, :, t] = acc
    adv = ret - ret.mean(axis=0, keepdims=True)
    return (adv / (adv.std() + 1e-6)).reshape(-1)


def token_logprobs(
    model: torch.nn.Module, tokens: Int[torch.Tensor, "batch pos"], temperature: float = 1.0
) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """``log p(tokens[:, i + 1] | tokens[:, : i + 1])`` for every position, under the
    sampling distribution ``softmax(logits / temperature)`` the rollouts drew from."""
    logp = torch.log_softmax(model(tokens)[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def ppo_loss(
    logp: Float[torch.Tensor, "b n"], old: Float[torch.Tensor, "b n"],
    ref: Float[torch.Tensor, "b n"], adv: Float[torch.Tensor, " b"],
    weights: Float[torch.Tensor, "b n"], clip: float, kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The clipped objective with the k3 KL penalty, averaged over weighted tokens; and
    ``{"kl", "clip_fraction"}`` of the batch."""
    rho = torch.exp(logp - old)
    a = adv[:, None]
    surrogate = torch.minimum(rho * a, torch.clamp(rho, 1 - clip, 1 + clip) * a)
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    w = weights / weights.sum().clamp_min(1e-9)
    loss = (w * (-surrogate + kl_coef * k3)).sum()
    clipped = ((rho - 1).abs() > clip).float()
    return loss, {"kl": float((w * k3).sum().detach()),
                  "clip_fraction": float((w * clipped).sum().detach())}  # fmt: skip


def rlft(
    agent: TextAgent, cfg: RlftConfig, out: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Fine-tune ``agent.model`` by RLFT (in place; ends in eval mode, LoRA adapters
    merged) with checkpoints in ``out/checkpoint``; resumes from one.

    Returns:
        ``{"config", "step", "curves": {"update", *CURVES}}`` (also in the checkpoint).
    """
    model = agent.model
    model.eval()  # no dropout: the first epoch's ratio is exactly 1
    if cfg.lora_rank:  # before the copy: the reference's adapters start at zero too
        add_lora(model, cfg.lora_rank, targets=cfg.lora_targets)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = Path(out) / "checkpoint"
    state = load_checkpoint(ckpt, model, opt)
    if state is not None and state["config"] != asdict(cfg):
        raise ValueError(f"out={str(out)!r} holds a run with other settings; use a new --out.")
    if state is not None:  # the reference is the start, not the resumed weights
        reference.load_state_dict(_start_weights(ckpt))
    else:
        _save_start(ckpt, model)
    state = state or {"config": asdict(cfg), "step": 0,
                      "curves": {"update": [], **{k: [] for k in CURVES}}}  # fmt: skip
    pad, device = _pad_id(agent.tokenizer), model.cfg.device
    bar = tqdm(total=cfg.updates, initial=state["step"], desc="rlft", disable=not progress)
    for update in range(state["step"], cfg.updates):
        with torch.no_grad():
            records, rewards = rollouts(agent, cfg, update)
        adv = torch.tensor(grpo_advantages(rewards, cfg.group, cfg.episodes, cfg.horizon,
                                           cfg.gamma), dtype=torch.float32)  # fmt: skip
        examples = [(r.prompt or "", r.completion or "") for r in records]  # as played
        ids, starts = _tokens(agent, examples)
        old = _logprobs(model, ids, starts, pad, device, cfg.temperature)  # rollout policy
        ref = _logprobs(reference, ids, starts, pad, device, cfg.temperature)
        rng = np.random.default_rng([cfg.seed, update, 1])
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": []}
        for _ in range(cfg.epochs):
            order = rng.permutation(len(ids))
            for lo in range(0, len(ids), cfg.minibatch):
                rows = order[lo : lo + cfg.minibatch].tolist()
                tokens, weights = _batch(ids, starts, rows, pad)
                logp = token_logprobs(model, tokens.to(device), cfg.temperature)
                n = logp.shape[1]
                loss, s = ppo_loss(logp, _rows(old, rows, n), _rows(ref, rows, n), adv[rows],
                                   weights[:, 1:].to(device), cfg.clip, cfg.kl_coef)  # fmt: skip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                stats["loss"].append(float(loss.detach()))
                stats["kl"].append(s["kl"])
                stats["clip_fraction"].append(s["clip_fraction"])
        stats["no_signal"] = [float(np.mean(np.abs(adv.numpy()) < 1e-6))]
        _append(state["curves"], update + 1, records, stats)
        state["step"] = update + 1
        if state["step"] % cfg.ckpt_every == 0 or state["step"] == cfg.updates:
            save_checkpoint(ckpt, model, opt, state)
        bar.update(1)
    bar.close()
    merge_lora(model)
    model.eval()
    return state


@torch.no_grad()
def _logprobs(
    model, ids: list[list[int]], starts: list[int], pad: int, device, temperature: float
) -> list:
    """Per example, the token log-probs of its whole sequence (positions 1..L-1)."""
    out = []
    for lo in range(0, len(ids), 64):
        rows = list(range(lo, min(lo + 64, len(ids))))
        tokens, _ = _batch(ids, starts, rows, pad)
        lp = token_logprobs(model, tokens.to(device), temperature)
        out += [lp[j, : len(ids[i]) - 1] for j, i in enumerate(rows)]
    return out


def _rows(per_example: list, rows: list[int], n: int) -> torch.Tensor:
    """Right-padded ``[len(rows), n]`` stack of per-example log-probs (padding weighs 0)."""
    out = torch.zeros(len(rows), n, device=per_example[0].device)
    for j, i in enumerate(rows):
        out[j, : len(per_example[i])] = per_example[i]
    return out


def _append(curves: dict, update: int, records: list[StepRecord], stats: dict) -> None:
    ucb = [r.rationale_arm is not None and r.rationale_arm in r.ucb_arms for r in records]
    curves["update"].append(update)
    curves["reward"].append(float(np.mean([r.reward for r in records])))
    curves["invalid"].append(float(np.mean([not r.valid for r in records])))
    curves["regret"].append(float(np.mean([r.regret for r in records])))
    curves["follows_rationale"].append(
        float(np.mean([r.valid and r.action == r.rationale_arm for r in records]))
    )
    curves["rationale_correct"].append(float(np.mean(ucb)))
    for k in ("loss", "kl", "clip_fraction", "no_signal"):
        curves[k].append(float(np.mean(stats[k])))


def _save_start(ckpt: Path, model: torch.nn.Module) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_weights(ckpt / START, model)


def _start_weights(ckpt: Path) -> dict:
    path = ckpt / START
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's starting weights (the KL "
                              "reference) are gone; start a new run in a new folder.")  # fmt: skip
    return load_file(str(path))
