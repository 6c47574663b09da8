"""The ``decomposition`` stage of ``kdgap analyze``: the mediation decomposition, its
activation-level split, the planted answer of organisms and the faithfulness battery, on
one model's off-policy transcripts (the stage that decides the verdict)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdgap.envs.bandit import BanditConfig
from kdgap.organisms.mechanisms import MECHANISMS
from kdgap.organisms.registry import organism_config
from kdgap.organisms.truth import planted_reads
from kdgap.records import StepRecord
from kdgap.report.battery import faithfulness_battery
from kdgap.report.decomposition import activation_split, decompose
from kdgap.report.session import Session
from kdgap.report.verdict import region


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
