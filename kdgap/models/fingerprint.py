"""A cheap fingerprint of the files behind a model spec, read without loading the model.

The analysis caches a stage's result under a key; the key must change when the model's
weights do, or a re-analysis of a retrained ``organism:PATH`` or an updated Hugging Face
folder would serve the old model's results. Hashing the weights' bytes would cost a full
read of every checkpoint (tens of GB for a large model) on every run, so the fingerprint
hashes each file's relative path, size and modification time instead, as ``make`` does:
any rewrite of a weight file changes it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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
