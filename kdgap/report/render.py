"""Render figures and ``report.html`` from a folder's ``summary.json`` alone (no model work).

This is all ``kdgap figures DIR`` does, and the last step of ``kdgap analyze``: every
figure is a function of the summary (schema in ``docs/summary-schema.md``), so
re-rendering gives identical files, and a folder holding only ``summary.json`` renders
the same figures and report as the full analysis folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdgap.report import figures as F
from kdgap.report.compare import at_path
from kdgap.report.html import render_report
from kdgap.report.stages import model_slug
from kdgap.report.summary import SCHEMA_VERSION


def load_summary(out: str | Path) -> dict[str, Any]:
    """Read ``out/summary.json`` and check that it is a summary figures can be drawn from.

    Raises:
        FileNotFoundError: ``out`` holds no ``summary.json`` (run ``kdgap analyze`` first).
        ValueError: the summary predates schema version 2 (it lacks the curves, baselines
            and heatmap the figures draw).
    """
    out = Path(out)
    spath = out / "summary.json"
    if not spath.exists():
        raise FileNotFoundError(
            f"{spath} does not exist: run `kdgap analyze --out {out}` (or `kdgap demo`) first."
        )
    summary = json.loads(spath.read_text())
    version = summary.get("schema_version")
    if not isinstance(version, int) or version < SCHEMA_VERSION:
        raise ValueError(
            f"{spath} has schema_version={version!r}, but figures need version "
            f">= {SCHEMA_VERSION}: re-run the same `kdgap analyze --out {out}` command (its "
            "stages are cached, so it does no model work) to rewrite the summary."
        )
    return summary


def _behavior_curves(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Coverage and regret curves: each model's own play, then the reference policies'.

    Every model's baselines play the same bandits with the same seed, so the first model's
    stand for all.
    """
    curves: dict[str, Mapping[str, Any]] = {}
    for model, entry in summary["models"].items():
        if entry["behavior"].get("coverage_curve") is not None:
            curves[model] = entry["behavior"]
    first = next(iter(summary["models"].values()), {})
    for name, res in (first.get("baselines") or {}).items():
        curves[f"{name} (baseline)"] = res
    return curves


def _freqbias_curves(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Frequency-bias curves of every model that has them."""
    return {
        model: entry["behavior"]["frequency_bias"]
        for model, entry in summary["models"].items()
        if (entry["behavior"].get("frequency_bias") or {}).get("repetitions") is not None
    }


def render_all(out: str | Path) -> Path:
    """Write ``out/figures/**`` (PNG + PDF) and ``out/report.html``; returns the report path.

    Only ``out/summary.json`` is read.

    Raises:
        FileNotFoundError: ``out`` holds no ``summary.json`` (run ``kdgap analyze`` first).
        ValueError: the summary's schema version is older than the figures need.
    """
    out = Path(out)
    summary = load_summary(out)
    figs: dict[str, dict[str, str]] = {"_all": {}}
    fdir = out / "figures"

    def rel(paths: Sequence[Path]) -> str:
        return str(paths[0].relative_to(out))

    curves = _behavior_curves(summary)
    if curves:
        figs["_all"]["behavior"] = rel(F.behavior_curves(curves, fdir / "behavior"))
    fb_curves = _freqbias_curves(summary)
    if fb_curves:
        figs["_all"]["freqbias"] = rel(F.frequency_bias(fb_curves, fdir / "frequency_bias"))

    overlay = {model: [at_path(entry, path) for path, _, _ in F.OVERLAY_PANELS]
               for model, entry in summary["models"].items()}  # fmt: skip
    if len(overlay) > 1 and F.overlay_panels(overlay):
        figs["_all"]["overlay"] = rel(F.profile_overlay(overlay, fdir / "profile_overlay"))
    for model, entry in summary["models"].items():
        slug, mine = model_slug(model), {}
        kd = entry["behavior"].get("kd_matrix")
        if kd:
            mine["kd_matrix"] = rel(F.kd_matrix(kd, fdir / slug / "kd_matrix", title=model))
        probes = entry.get("probes") or {}
        if probes.get("layers"):
            mine["probes"] = rel(F.probe_layers(probes, fdir / slug / "probes", title=model))
        patching = entry.get("patching") or {}
        heat = patching.get("heatmap")
        if heat:
            mine["patching"] = rel(
                F.patching_heatmap(
                    heat["values"], heat["tokens"], fdir / slug / "patching", title=model
                )
            )
        if patching.get("layer_profile") is not None:
            mine["mediation"] = rel(F.mediation_profile(patching, fdir / slug / "mediation",
                                                        title=model))  # fmt: skip
        act = (entry.get("decomposition") or {}).get("activation") or {}
        if act.get("read_layer_profile") is not None or act.get("layer_profile") is not None:
            mine["indirect"] = rel(F.indirect_profile(act, fdir / slug / "indirect", title=model))
        figs[model] = mine
    return render_report(summary, figs, out / "report.html")
