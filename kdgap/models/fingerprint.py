"""A cheap fingerprint of the files behind a model spec, read without loading the model.

The analysis caches a stage's result under a key; the key must change when the model's
weights do, or a re-analysis of a retrained ``organism:PATH`` or an updated Hugging Face
folder would serve the old model's results. Hashing the weights' bytes would cost a full
read of every checkpoint (tens of GB for a large model) on every run, so the fingerprint
hashes each file's relative path, size and modification time instead, as ``make`` does:
any rewrite of a weight file changes it.

:func:`model_fingerprint` is the other identity, of the loaded weights themselves (the
activation store refuses to mix two models in one store by it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from kdgap.models.spec import parse_model_spec
from kdgap.organisms.registry import resolve_organism


def spec_files(spec: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """``(root, files)``: the folder (or single file) a spec loads from and its files,
    sorted; ``(None, [])`` for a hub name, which has no local files."""
    parsed = parse_model_spec(spec)
    if parsed.kind == "organism":
        root = resolve_organism(parsed.target)
    elif parsed.kind in ("hf_folder", "gguf", "preset"):
        root = Path(parsed.target)
    else:
        return None, []
    if root.is_file():
        return root.parent, [root]
    return root, sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def files_fingerprint(spec: str | os.PathLike) -> str:
    """16 hex digits over the spec and ``(relative path, size, mtime_ns)`` of every file of
    :func:`spec_files` (for a hub name, over the name alone)."""
    root, files = spec_files(spec)
    h = hashlib.sha256(os.fspath(spec).encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(model: torch.nn.Module) -> str:
    """An identity of a model's weights: names, shapes, dtypes, sampled values, checksums.

    Hashes every parameter's name, shape and dtype, the bytes of up to 4,096 evenly spaced
    values (first and last included) and an exact integer checksum of all its values (the
    sum of their bit patterns read as integers), so two models differing in architecture,
    seed, training or a single edited weight disagree. Only integers are hashed, never a
    float reduction: a float sum depends on the number of torch threads, and a store
    recorded with 2 threads must reopen with 1 (tested). Used to refuse mixing two models
    in one store.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            if n == 0:
                continue
            k = min(n, 4096)
            # Integer index arithmetic: float linspace rounds past n - 1 above 2**24 values.
            idx = torch.arange(k, dtype=torch.int64, device=flat.device) * (n - 1) // max(k - 1, 1)
            sample = flat[idx].cpu().contiguous()
            h.update(sample.view(torch.uint8).numpy().tobytes())
            ints = flat.contiguous().view(_INT_VIEW[flat.element_size()])
            h.update(str(int(ints.sum(dtype=torch.int64))).encode())  # integer: exact
    return h.hexdigest()
