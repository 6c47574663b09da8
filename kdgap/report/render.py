"""Render figures and ``report.html`` from a finished analysis folder (no model work).

This is all ``kdgap figures DIR`` does, and the last step of ``kdgap analyze``: the
figures are functions of the saved JSON only, so re-rendering gives identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdgap.report import figures as F
from kdgap.report.html import render_report
from kdgap.report.stages import model_slug


def _stage(out: Path, model: str, name: str) -> dict | None:
    path = out / "models" / model_slug(model) / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["result"]


def render_all(out: str | Path) -> Path:
    """Write ``out/figures/**`` (PNG + PDF) and ``out/report.html``; returns the report path.

    Raises:
        FileNotFoundError: ``out`` holds no ``summary.json`` (run ``kdgap analyze`` first).
    """
    out = Path(out)
    spath = out / "summary.json"
    if not spath.exists():
        raise FileNotFoundError(
            f"{spath} does not exist: run `kdgap analyze --out {out}` (or `kdgap demo`) first."
        )
    summary = json.loads(spath.read_text())
    figs: dict[str, dict[str, str]] = {"_all": {}}
    fdir = out / "figures"

    def rel(paths) -> str:
        return str(paths[0].relative_to(out))

    curves, fb_curves = {}, {}
    for model in summary["models"]:
        beh = _stage(out, model, "behavior")
        if beh:
            curves[model] = beh
        fb = _stage(out, model, "freqbias")
        if fb:
            fb_curves[model] = fb
    first = next(iter(summary["models"]), None)
    baselines = _stage(out, first, "baselines") if first else None
    for name, res in (baselines or {}).items():
        curves[f"{name} (baseline)"] = res
    if curves:
        figs["_all"]["behavior"] = rel(F.behavior_curves(curves, fdir / "behavior"))
    if fb_curves:
        figs["_all"]["freqbias"] = rel(F.frequency_bias(fb_curves, fdir / "frequency_bias"))

    for model, entry in summary["models"].items():
        slug, mine = model_slug(model), {}
        kd = entry["behavior"].get("kd_matrix")
        if kd:
            mine["kd_matrix"] = rel(F.kd_matrix(kd, fdir / slug / "kd_matrix", title=model))
        probes = entry.get("probes") or {}
        if probes.get("layers"):
            mine["probes"] = rel(F.probe_layers(probes, fdir / slug / "probes", title=model))
        patching = _stage(out, model, "patching") or {}
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
        figs[model] = mine
    return render_report(summary, figs, out / "report.html")
