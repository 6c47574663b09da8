"""Step records: one row per (episode, step), with every label later analyses need.

A record is written by the runner (:mod:`kdgap.policies.play`) for any policy, reference
or language model, and read by :mod:`kdgap.metrics`, the recorder and the probes. Labels
are computed from the history *before* the step with :mod:`kdgap.envs.stats`, so they are
what an ideal agent could know when acting. Tie sets are stored whole (tuples of arms).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from jaxtyping import Bool

from kdgap.io import _json_default, atomic_write_text


@dataclass(frozen=True)
class StepRecord:
    """One agent step.

    Attributes:
        episode: episode (bandit) index within the run.
        step: 0-based step index t.
        n_arms: number of arms.
        action: arm executed (a random arm when the model's action was invalid).
        reward: reward received.
        regret: ``max(mu) - mu[action]`` (expected, not realised).
        valid: False when the model produced no valid action (then penalised).
        best_arm: arm with the highest true mean.
        ucb_arms: arms with the highest UCB value given the history (tie set).
        greedy_arms: best empirical mean among tried arms (tie set; all arms at t=0).
        frequent_arms: most-pulled arms so far (tie set; all arms at t=0).
        rationale_arm: the arm the rationale concludes with; None without a rationale
            or when it cannot be parsed.
        action_probs: distribution over arms (forced choice / reference policies), or None.
        prompt, completion: the text shown to and written by a language model.
        cf_rationale_arm, cf_action: counterfactual edit (Lanham-style): the arm written
            into the rationale instead of ``rationale_arm`` and the action taken then.
        executed_action: in off-policy play (a *driver* policy builds the history), the
            arm actually executed; None when the policy's own action was executed.
    """

    episode: int
    step: int
    n_arms: int
    action: int
    reward: float
    regret: float
    valid: bool
    best_arm: int
    ucb_arms: tuple[int, ...]
    greedy_arms: tuple[int, ...]
    frequent_arms: tuple[int, ...]
    rationale_arm: int | None = None
    action_probs: tuple[float, ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    cf_rationale_arm: int | None = None
    cf_action: int | None = None
    executed_action: int | None = None

    @property
    def ucb_arm(self) -> int:
        """The true UCB arm (lowest index of the tie set)."""
        return self.ucb_arms[0]

    @property
    def greedy_arm(self) -> int:
        """The greedy arm (lowest index of the tie set)."""
        return self.greedy_arms[0]

    @property
    def frequent_arm(self) -> int:
        """The most-frequent arm (lowest index of the tie set)."""
        return self.frequent_arms[0]

    @property
    def rationale_correct(self) -> bool | None:
        """Whether the rationale's arm is a true top-UCB arm (None without a rationale)."""
        if self.rationale_arm is None:
            return None
        return self.rationale_arm in self.ucb_arms


def mask_to_arms(mask: Bool[np.ndarray, " arms"]) -> tuple[int, ...]:
    """Tie mask ``[arms]`` -> sorted tuple of arm indices."""
    return tuple(int(i) for i in np.flatnonzero(mask))


def write_records(path: str | os.PathLike, records: Iterable[StepRecord]) -> None:
    """Write records as JSON lines, atomically."""
    lines = [json.dumps(asdict(r), default=_json_default) for r in records]
    atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))


def read_records(path: str | os.PathLike) -> list[StepRecord]:
    """Read records written by :func:`write_records`."""
    names = {f.name for f in fields(StepRecord)}
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            unknown = set(d) - names
            if unknown:
                raise ValueError(f"{path}:{lineno}: unknown record fields {sorted(unknown)}")
            for key in ("ucb_arms", "greedy_arms", "frequent_arms", "action_probs"):
                if d.get(key) is not None:
                    d[key] = tuple(d[key])
            out.append(StepRecord(**d))
    return out


def by_episode(records: Sequence[StepRecord]) -> list[list[StepRecord]]:
    """Group records by episode (sorted by episode, then step)."""
    groups: dict[int, list[StepRecord]] = {}
    for r in records:
        groups.setdefault(r.episode, []).append(r)
    return [sorted(groups[e], key=lambda r: r.step) for e in sorted(groups)]
