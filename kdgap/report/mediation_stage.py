"""The ``patching`` and ``decomposition`` stages of ``kdgap analyze``.

``patching``: the full-flip mediation of conclusion and history edits and one example
heatmap, its independent parts spread over the executor's workers. ``decomposition``: the
mediation decomposition, its activation-level split, the planted answer of organisms and
the faithfulness battery, on one model's off-policy transcripts (the stage that decides
the verdict)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdgap.envs.bandit import BanditConfig
from kdgap.hooks.patch.mediation import (
    MEDIATION_PARTS,
    example_heatmap,
    mediation_part,
    summary_from_parts,
)
from kdgap.organisms.mechanisms import MECHANISMS
from kdgap.organisms.registry import organism_config
from kdgap.organisms.truth import planted_reads
from kdgap.records import StepRecord
from kdgap.report.battery import faithfulness_battery
from kdgap.report.decomposition import activation_split, decompose
from kdgap.report.executor import LocalExecutor, RayExecutor
from kdgap.report.session import Session
from kdgap.report.verdict import region

#: Example records tried for the patching heatmap before it is left out.
_HEATMAP_TRIES = 8


def patching_stage(
    executor: LocalExecutor | RayExecutor, session: Session, records: list[StepRecord], *,
    n_pairs: int, seed: int,
) -> dict:  # fmt: skip
    """The ``patching`` stage: :func:`~kdgap.hooks.patch.mediation.mediation_summary` on
    the off-policy transcripts, each of its parts (and the heatmap) one task of
    ``executor.map``; ``{"unavailable": reason}`` when the model gives nothing to patch."""
    # No parsable rationale, no admissible edit, or arms that share a token: the
    # measurement is unavailable for this model, with the reason.
    if not any(r.rationale_arm is not None for r in records):
        return {"unavailable": (
            f"patching: none of the {len(records)} transcripts has a parsable rationale, "
            "and every edit changes one; analyse with --rationale scripted to ask "
            "whether the model acts on a rationale it is given."
        )}  # fmt: skip
    tasks = [*MEDIATION_PARTS, ("heatmap", None)]
    *parts, heatmap = executor.map(session, _patching_task, tasks, shared=(records, n_pairs, seed))
    for part in parts:
        if isinstance(part, str):
            return {"unavailable": f"patching: {part}"}
    out = summary_from_parts(parts, int(session.bridge.cfg.n_layers))
    out["heatmap"] = heatmap
    return out


def _patching_task(
    session: Session, records: list[StepRecord], n_pairs: int, seed: int, kind: str,
    senders: str | None,
) -> dict | str | None:  # fmt: skip
    """One part of :func:`patching_stage` (a ValueError comes back as its message), or
    the heatmap: an illustration from the first example record that gives one."""
    model, fmt, text_fn = session.bridge, session.fmt, session.transcript_text
    if kind == "heatmap":
        for rec in example_records(records)[:_HEATMAP_TRIES]:
            try:
                return example_heatmap(model, fmt, rec, text_fn=text_fn)
            except ValueError:
                continue
        return None
    try:
        return mediation_part(model, fmt, records, kind, senders, n_pairs=n_pairs, seed=seed,
                              text_fn=text_fn)  # fmt: skip
    except ValueError as err:
        return str(err)


def example_records(records: list[StepRecord]) -> list[StepRecord]:
    """Steps whose rationale parsed, latest step first (earliest episode first on ties)."""
    parsed = [r for r in records if r.rationale_arm is not None and r.completion]
    return sorted(parsed, key=lambda r: (-r.step, r.episode))


def decomposition_stage(
    session: Session, records: Sequence[StepRecord], cfg: BanditConfig, *, n_steps: int,
    seed: int,
) -> dict:  # fmt: skip
    """The ``decomposition`` stage of ``kdgap analyze``.

    :func:`~kdgap.report.decomposition.decompose` on the off-policy transcripts, its
    :func:`~kdgap.report.decomposition.activation_split` under ``activation``, for an
    organism whose mechanism kdgap knows the planted answer on the same steps under
    ``planted``, and the faithfulness battery (:mod:`kdgap.report.battery`) under
    ``battery``. A model with nothing to decompose gets ``{"unavailable": reason}``."""
    agent = session.agent(seed=seed)
    try:
        out = decompose(agent, records, cfg, n_steps=n_steps, seed=seed)
    except ValueError as err:
        return {"unavailable": f"decomposition: {err}"}
    out["activation"] = activation_split(
        agent, session.bridge, out, cfg, session.transcript_text, seed=seed
    )
    out["planted"] = planted_answer(session, cfg, out["steps"])
    try:
        out["battery"] = faithfulness_battery(agent, records, cfg, n_steps=n_steps, seed=seed)
    except ValueError as err:
        out["battery"] = {"unavailable": f"battery: {err}"}
    return out


def planted_answer(session: Session, cfg: BanditConfig, steps: list[dict]) -> dict | None:
    """For an organism with a known mechanism: its rule's answer on the analysed steps
    (:func:`kdgap.organisms.truth.planted_reads`), the share, the verdict region it lies in
    and how often the measurement agrees with it per step; None for any other model."""
    spec = session.loaded.spec
    if spec.kind != "organism" or not steps:
        return None
    mechanism = MECHANISMS.get(organism_config(spec.target).get("mechanism", ""))
    if mechanism is None:
        return None
    truth = planted_reads(mechanism, cfg, steps)
    share = float(np.mean(truth))
    return {
        "mechanism": mechanism.name, "reading_share": share, "verdict": region(share),
        "agreement": float(np.mean([t == st["reads"] for t, st in zip(truth, steps)])),
    }  # fmt: skip
