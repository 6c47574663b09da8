"""The stage layout of an analysis folder: one JSON file per model and stage, keyed by settings.

``OUT/models/<model_slug(spec)>/<stage>.json`` holds ``{"key", "seconds", "result"}``: the
settings the stage ran with, how long it took and its result. These files are the
pipeline's cache (a stage whose file has the same key is not run again); the report reads
``OUT/summary.json`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kdgap.io import atomic_write_json

STAGES = ("behavior", "baselines", "freqbias", "record", "probes", "patching", "decomposition")


def model_slug(model: str) -> str:
    """A folder name for a model spec: readable, and distinct for distinct specs
    (``organism:faithful`` -> ``organism-faithful-<8 hex digits of the spec's hash>``), so
    ``/m/a-b`` and ``/m/a/b`` never share a folder."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-60:] or "model"
    return f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


@dataclass
class _Stage:
    """One cached stage: its file, the settings that key it, and how to compute it."""

    path: Path
    key: dict
    compute: Callable[[], dict]
    force: bool = False
    ran: bool = field(default=False, init=False)

    def saved(self) -> dict | None:
        """The stage file's content when it holds this key (and ``force`` is off)."""
        if not self.force and self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("key") == self.key:
                return saved
        return None

    def get(self) -> tuple[dict, float]:
        """The stage's result and the seconds its computation took (when it ran)."""
        if (saved := self.saved()) is not None:
            return saved["result"], saved["seconds"]
        t0 = time.perf_counter()
        result = self.compute()
        seconds = time.perf_counter() - t0
        atomic_write_json(self.path, {"key": self.key, "seconds": seconds, "result": result})
        self.ran = True
        return result, seconds
