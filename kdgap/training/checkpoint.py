"""Training checkpoints: weights and optimiser state in safetensors, counters and curves in
JSON, each file written atomically and listed with its sha256 (no pickle anywhere).

Layout of ``folder``::

    checkpoint.json          step, curves, config, sha256 of the two tensor files
    weights.safetensors      the model's state dict
    optimizer.safetensors    AdamW's per-parameter state (``<index>.<name>``)

``checkpoint.json`` is written last: a checkpoint exists once it is there, and a run killed
while writing leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdgap.io import atomic_write, atomic_write_json, file_sha256

STATE = "checkpoint.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, altered or belongs to another run."""


def save_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """``model``'s state dict as one safetensors file at ``path``, written atomically."""
    weights, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied embeddings, the bridge's aliases
        # of one module); a copy of each repeat loads back into every alias.
        ptr = v.untyped_storage().data_ptr()
        weights[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    atomic_write(path, lambda tmp: save_file(weights, tmp))


def save_checkpoint(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``model``'s weights, ``optimizer``'s state and ``state`` (JSON-ready: step,
    curves, config) to ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, model)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per in opt["state"].items():
        for name, value in per.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    atomic_write(folder / OPTIMIZER, lambda tmp: save_file(tensors, tmp))
    meta = {
        **state,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "sha256": {name: file_sha256(folder / name) for name in (WEIGHTS, OPTIMIZER)},
    }
    atomic_write_json(folder / STATE, meta)
    return folder


def load_checkpoint(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore ``model`` and ``optimizer`` from ``folder``; its state dict, or None when the
    folder holds no checkpoint.

    Raises:
        CheckpointError: a file is missing, unreadable or altered (sha256 mismatch), or the
            tensors do not fit ``model``.
    """
    folder = Path(folder)
    if not (folder / STATE).exists():
        return None
    try:
        meta = json.loads((folder / STATE).read_text())
        for name, digest in meta["sha256"].items():
            if file_sha256(folder / name) != digest:
                raise CheckpointError(
                    f"checkpoint {folder}: {name} does not match its sha256 (altered or "
                    "truncated); delete the folder to start over."
                )
        model.load_state_dict(load_file(folder / WEIGHTS))
        opt_tensors = load_file(folder / OPTIMIZER)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {folder} cannot be read ({first}); delete the folder to start over."
        ) from None
    per: dict[int, dict[str, Any]] = {}
    for key, value in [*opt_tensors.items(), *meta["optimizer_scalars"].items()]:
        index, name = key.split(".", 1)
        per.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per, "param_groups": meta["optimizer_groups"]})
    return {k: v for k, v in meta.items()
            if k not in ("optimizer_groups", "optimizer_scalars", "sha256")}  # fmt: skip
