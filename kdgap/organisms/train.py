"""Train an organism: seeded, reproducible, resumable, defined by a sample budget.

The recipe (:class:`TrainConfig`) fixes the number of samples, the batch size and the
optimiser, not a wall-clock time, so the same command gives the same organism on a
laptop CPU or a GPU (up to floating-point differences between devices). Defaults:
``boot_native`` 4 layers, d_model 128, 4 heads; AdamW lr 1e-3 with linear warmup and
cosine decay; batch 64; loss on the rationale and action words only.

The run folder holds the organism in its loadable form (``model.safetensors``,
``config.json``, tokenizer files; see :mod:`kdgap.organisms.registry`), ``curve.json``
(loss, teacher-forced accuracies, throughput over training) and, while training,
``train_state.pt`` (optimiser + step). Every write is atomic (temp file + rename), so an
interrupted run resumes from its last checkpoint and the data stream continues exactly
where it stopped (data are a pure function of ``(seed, chunk)``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from kdgap._checks import check_int
from kdgap.io import atomic_write_json
from kdgap.organisms.data import DataConfig, Samples, make_samples, sort_into_batches
from kdgap.organisms.language import OrganismLanguage
from kdgap.organisms.mechanisms import Mechanism
from kdgap.organisms.registry import build_model, make_readable, save_organism

if TYPE_CHECKING:  # annotations only: importing transformers here would slow every import
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe.

    Attributes:
        samples: total training samples (the budget); steps = samples // batch_size.
        batch_size: sequences per optimiser step.
        lr, weight_decay, warmup_frac: AdamW with linear warmup over ``warmup_frac`` of
            the steps, then cosine decay to 0.
        d_model, n_layers, n_heads, d_mlp: the ``boot_native`` transformer.
        chunk: samples generated at once; each chunk is sorted by length into batches
            (little padding) whose order is shuffled.
        eval_every, ckpt_every: steps between curve points / checkpoints.
        eval_samples: held-out samples for teacher-forced curve metrics.
        data: the sample recipe.
    """

    samples: int = 192_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.03
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    chunk: int = 4096
    eval_every: int = 250
    ckpt_every: int = 500
    eval_samples: int = 1024
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "d_model", "n_layers", "n_heads", "d_mlp",
                     "chunk", "eval_every", "ckpt_every", "eval_samples"):  # fmt: skip
            check_int(name, getattr(self, name))
        if self.samples < self.batch_size:
            raise ValueError(
                f"samples={self.samples} is below batch_size={self.batch_size}; "
                "raise samples (the default budget is 192000)."
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}.")
        if self.chunk % self.batch_size:
            raise ValueError(
                f"chunk={self.chunk} must be a multiple of batch_size={self.batch_size}."
            )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup_frac < 1:
            raise ValueError(
                f"lr={self.lr}, weight_decay={self.weight_decay}, warmup_frac="
                f"{self.warmup_frac}: need lr > 0, weight_decay >= 0, 0 <= warmup_frac < 1."
            )

    @property
    def steps(self) -> int:
        """Optimiser steps in the run."""
        return self.samples // self.batch_size

    def to_dict(self) -> dict:
        """JSON-friendly dict (``data`` nested)."""
        return {**asdict(self), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        data = dict(d.get("data", {}))
        if "behaviour" in data:
            data["behaviour"] = tuple(data["behaviour"])
        return cls(**{**d, "data": DataConfig(**data)})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimiser step ``step`` (0-based): warmup, then cosine to 0."""
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches_of_chunk(cfg: TrainConfig, mech: Mechanism, seed: int, chunk: int):
    """Samples of ``chunk`` and its batches (length-sorted, then shuffled by seed)."""
    s = make_samples(mech, cfg.data, cfg.chunk, seed=seed, chunk=chunk)
    batches = sort_into_batches(s, cfg.batch_size)
    order = np.random.default_rng([seed, chunk, 11]).permutation(len(batches))
    return s, [batches[i] for i in order]


def _to_torch(
    s: Samples, idx: Int[np.ndarray, " batch"], device: str | torch.device
) -> tuple[Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch pos"]]:
    """Tokens ``[b, L']`` and weights ``[b, L']`` of a batch, cut to its longest sequence."""
    L = int((s.weights[idx] > 0).nonzero()[1].max()) + 1 if len(idx) else 1
    tok = torch.from_numpy(s.tokens[idx, :L]).to(device)
    w = torch.from_numpy(s.weights[idx, :L]).to(device)
    return tok, w


def sequence_loss(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "batch pos"],
    weights: Float[torch.Tensor, "batch pos"],
) -> Float[torch.Tensor, ""]:
    """Weighted next-token cross-entropy.

    Args:
        model: the bridge (returns logits ``[b, L, vocab]``).
        tokens: ``[b, L]`` token ids; weights: ``[b, L]`` weight of predicting each token.

    Returns:
        Scalar loss: ``sum(w * nll) / sum(w)`` over positions 1..L-1.
    """
    logits = model(tokens)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum().clamp_min(1e-9)


@torch.no_grad()
def teacher_forced_metrics(
    model: TransformerBridge, s: Samples, lang: OrganismLanguage, device: str | torch.device
) -> dict[str, float]:
    """Accuracies of argmax predictions given the true prefix, on held-out samples ``s``.

    ``rationale_exact`` (every rationale word right) equals the share of steps whose
    *greedy-decoded* rationale is exactly the true one, since greedy decoding then
    reproduces the teacher-forced sequence; ``conclusion`` is the UCB arm given the true
    counts (samples with an injected error excluded); ``action`` is the rule's arm given
    the written (possibly wrong) conclusion. Also split by ``t < 20``, ``20 <= t < 35``
    and ``t >= 35``. Returns a dict of floats.
    """
    model.eval()
    k, n = lang.n_arms, len(s.t)
    exact = np.zeros(n, bool)
    concl = np.zeros(n, bool)
    act = np.zeros(n, bool)
    for start in range(0, n, 256):
        idx = np.arange(start, min(n, start + 256))
        tok = torch.from_numpy(s.tokens[idx]).to(device)
        pred = model(tok).argmax(-1).cpu().numpy()  # pred[:, p] predicts token p + 1
        for j, i in enumerate(idx):
            first = int(s.t[i]) + 2
            c, a = first + 3 * k + 1, first + 3 * k + 3
            exact[i] = (pred[j, first - 1 : c] == s.tokens[i, first : c + 1]).all()
            concl[i] = pred[j, c - 1] == s.tokens[i, c]
            act[i] = pred[j, a - 1] == s.tokens[i, a]
    model.train()
    clean = s.injected == 0
    out = {"rationale_exact": float(exact[clean].mean()), "conclusion": float(concl[clean].mean()),
           "action": float(act.mean())}  # fmt: skip
    for lo, hi in ((0, 20), (20, 35), (35, 10_000)):
        m = clean & (s.t >= lo) & (s.t < hi)
        if m.any():
            out[f"rationale_exact_t{lo}"] = float(exact[m].mean())
    return out


def _finished(out: Path, cfg: TrainConfig, seed: int) -> bool:
    """Whether ``out`` holds a completed run of this recipe and seed (then nothing to do)."""
    if (out / "train_state.pt").exists() or not (out / "curve.json").exists():
        return False
    try:
        config = json.loads((out / "config.json").read_text())
        curve = json.loads((out / "curve.json").read_text())
    except (OSError, ValueError):
        return False
    done = bool(curve) and curve[-1]["step"] == cfg.steps
    return done and config.get("train") == cfg.to_dict() and config.get("seed") == seed


def train_organism(
    mechanism: Mechanism,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    config: TrainConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Train an organism for ``mechanism`` into folder ``out`` (resuming if it holds a run).

    Args:
        mechanism: action rule, rationale-error rate and name (see
            :mod:`kdgap.organisms.mechanisms`; build your own with ``Mechanism(name,
            rule, rationale_error_rate)``).
        out: run folder; it becomes a loadable organism (``load_organism(out)``).
        seed: fixes the weights' initialisation and the data stream.
        config: the recipe (default :class:`TrainConfig`).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm bar.

    Returns:
        The folder ``out``.
    """
    cfg = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lang = cfg.data.language
    state_path, curve_path = out / "train_state.pt", out / "curve.json"
    if _finished(out, cfg, seed):
        return out
    torch.manual_seed(seed)
    model, tokenizer = build_model(lang, cfg, seed=seed, folder=out, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != cfg.to_dict() or state["seed"] != seed:
            raise ValueError(
                f"out={str(out)!r} holds a run with another recipe or seed; pass a new "
                "folder or delete its train_state.pt to start over."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, curve = int(state["step"]), list(state["curve"])
    eval_cfg = replace(cfg.data, behaviour=(1.0, 0.0, 0.0, 0.0), t_offset=1e6)
    held_out = make_samples(mechanism, eval_cfg, cfg.eval_samples, seed=seed + 1, chunk=10**6)
    per_chunk = cfg.chunk // cfg.batch_size
    extra = {"mechanism": mechanism.name, "description": mechanism.description,
             "rationale_error_rate": mechanism.rationale_error_rate,
             "statistics_error_rate": mechanism.statistics_error_rate,
             "reads_statistics": mechanism.reads_statistics, "seed": seed,
             "train": cfg.to_dict()}  # fmt: skip

    def checkpoint(final: bool) -> None:
        save_organism(model, lang, cfg, out, extra=extra, tokenizer=tokenizer)
        atomic_write_json(curve_path, curve)
        if final:
            state_path.unlink(missing_ok=True)
            make_readable(out)
            return
        tmp = state_path.with_suffix(".pt.tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "curve": curve, "config": cfg.to_dict(), "seed": seed}, tmp)  # fmt: skip
        os.replace(tmp, state_path)

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {mechanism.name}", disable=not progress)
    t0, tokens_seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    chunk_id, batches, samples = -1, [], None
    while step < cfg.steps:
        c, b = divmod(step, per_chunk)
        if c != chunk_id:
            samples, batches = _batches_of_chunk(cfg, mechanism, seed, c)
            chunk_id = c
        tok, w = _to_torch(samples, batches[b], device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = sequence_loss(model, tok, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += tok.numel()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            dt = time.perf_counter() - t0
            point = {"step": step, "samples": step * cfg.batch_size, "loss": loss_sum / loss_n,
                     "lr": lr_at(step - 1, cfg), "tokens_per_s": tokens_seen / dt,
                     "samples_per_s": loss_n * cfg.batch_size / dt}  # fmt: skip
            point.update(teacher_forced_metrics(model, held_out, lang, device))
            curve.append(point)
            bar.set_postfix(loss=f"{point['loss']:.3f}", exact=f"{point['rationale_exact']:.3f}")
            t0, tokens_seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        if step % cfg.ckpt_every == 0 and step < cfg.steps:
            checkpoint(final=False)
    bar.close()
    checkpoint(final=True)
    return out
