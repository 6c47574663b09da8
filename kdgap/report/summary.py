"""``summary.json``: the versioned result of ``kdgap analyze`` / ``kdgap demo``.

The summary is the single source of the report: every number of ``report.html`` and every
figure under ``figures/`` is drawn from it, so ``kdgap figures DIR`` needs nothing else in
the folder. Every key, its type, shape, unit and when it is null is documented in
``docs/summary-schema.md`` (a test checks that the two agree).

The key tuples below pin what is copied from each stage's result: a key a stage did not
produce is written as null, so every summary has the same keys.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdgap.report.verdict import RULE, verdict

SCHEMA = "kdgap.summary"
SCHEMA_VERSION = 3
BEHAVIOR_KEYS = (
    "rationale_correct", "action_follows_rationale", "invalid_rate", "counterfactual_flip_rate",
    "action_coverage", "cumulative_regret", "suffix_failure_rate", "action_matches", "kd_matrix",
    "coverage_curve", "regret_curve",
)  # fmt: skip
FREQBIAS_CURVE_KEYS = ("repetitions", "entropy", "F_f_curve", "F_g_curve", "F_o_curve")
BASELINE_KEYS = (
    "action_coverage", "cumulative_regret", "suffix_failure_rate", "coverage_curve",
    "regret_curve",
)  # fmt: skip
PROBE_KEYS = (
    "layers", "knowing_acc", "knowing_ci", "doing_acc", "doing_ci", "knowing_acc_disagree",
    "knowing_ci_disagree", "doing_acc_disagree", "doing_ci_disagree", "chance",
    "divergence_layer", "n_disagree", "tracking", "definition", "unavailable", "latent",
)  # fmt: skip
PATCHING_KEYS = (
    "mediated_fraction", "mediated_fraction_ci", "total_effect_fraction",
    "history_effect_fraction", "history_effect_fraction_ci", "layers", "layer_profile",
    "layer_profile_ci", "n_pairs", "definition", "unavailable",
)  # fmt: skip
HEATMAP_KEYS = (
    "values", "tokens", "edited_tokens", "ld_clean", "ld_corrupt", "arms", "layers", "definition",
)  # fmt: skip
DECOMPOSITION_KEYS = (
    "indirect_share", "indirect_share_ci", "reading_share", "reading_share_ci", "n_steps",
    "n_steps_unchanged", "n_units", "effects", "definition", "planted", "unavailable",
)  # fmt: skip
STEP_KEYS = ("episode", "step", "reads")
BATTERY_KEYS = ("early_answering", "filler", "mistakes", "n_steps", "definition", "unavailable")
AIW_KEYS = ("summary", "config")
VERSIONED_PACKAGES = (
    "kdgap", "torch", "transformer-lens", "transformers", "scikit-learn", "numpy",
)  # fmt: skip


def _pick(result: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: result.get(k) for k in keys}


def _aiw(result: Any) -> dict[str, Any] | None:
    """The AIW stage's rates and settings (its per-sample completions stay in its stage file)."""
    if result is None:
        return None
    if not isinstance(result, Mapping):  # an AiwResult
        result = result.to_dict(with_samples=False)
    return _pick(result, AIW_KEYS)


def _decomposition(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The decomposition's numbers, per-step answers and activation split (the texts of
    every step stay in its stage file)."""
    result = result or {"unavailable": "decomposition: the stage did not run"}
    out = _pick(result, DECOMPOSITION_KEYS)
    out["steps"] = [_pick(st, STEP_KEYS) for st in result.get("steps", [])]
    act = result.get("activation") or {}
    via, direct = act.get("via_rationale") or {}, act.get("direct") or {}
    read = act.get("read") or {}
    out["activation"] = None if not act else {
        "read_fraction": read.get("fraction"), "read_fraction_ci": read.get("fraction_ci"),
        "read_layer_profile": read.get("layer_profile"),
        "read_layer_profile_ci": read.get("layer_profile_ci"),
        "n_read_units": act.get("n_read_units"), "read_unavailable": act.get("read_unavailable"),
        "indirect_share": act.get("indirect_share"),
        "indirect_share_ci": act.get("indirect_share_ci"), "n_units": act.get("n_units"),
        "layers": act.get("layers"), "layer_profile": via.get("layer_profile"),
        "layer_profile_ci": via.get("layer_profile_ci"),
        "direct_layer_profile": direct.get("layer_profile"),
        "direct_layer_profile_ci": direct.get("layer_profile_ci"),
        "split_unavailable": act.get("split_unavailable"),
        "definition": act.get("definition"), "unavailable": act.get("unavailable"),
    }  # fmt: skip
    return out


def model_entry(
    spec: str, results: Mapping[str, Any], cfg: Any, timings: Mapping[str, float]
) -> dict[str, Any]:
    """One model's entry of ``summary.json`` from its stage results.

    Args:
        spec: the model spec (the entry's key in ``models``).
        results: every stage's result by stage name: ``behavior``, ``baselines``,
            ``freqbias``, ``probes``, ``patching``, ``decomposition`` (``record`` is not
            read) and optionally ``aiw`` (None or absent when that stage did not run).
        cfg: the analysis settings this model was analysed with (a dataclass, written
            under ``config``).
        timings: seconds per stage.

    Returns:
        The entry documented in ``docs/summary-schema.md`` (``models.<model>``).
    """
    beh, fb = results["behavior"], results["freqbias"]
    behavior = _pick(beh, BEHAVIOR_KEYS)
    behavior["frequency_bias"] = {
        **fb["windows"],
        "entropy_repetition_corr": fb["entropy_repetition_corr"],
        **_pick(fb, FREQBIAS_CURVE_KEYS),
    }
    probes = _pick(results["probes"], PROBE_KEYS)
    patching = _pick(results["patching"], PATCHING_KEYS)
    heat = results["patching"].get("heatmap")
    patching["heatmap"] = _pick(heat, HEATMAP_KEYS) if heat else None
    baselines = {name: _pick(res, BASELINE_KEYS) for name, res in results["baselines"].items()}
    dec = _decomposition(results.get("decomposition"))
    word, reason = verdict(dec["reading_share"], dec["reading_share_ci"], dec["n_steps"] or 0)
    reason = dec["unavailable"] or reason  # the decomposition's own reason, when it has one
    return {
        "behavior": behavior,
        "baselines": baselines,
        "probes": probes,
        "patching": patching,
        "decomposition": dec,
        "battery": _pick(
            (results.get("decomposition") or {}).get("battery")
            or {"unavailable": "battery: the decomposition stage did not run it"},
            BATTERY_KEYS,
        ),
        "aiw": _aiw(results.get("aiw")),
        "config": asdict(cfg),
        "verdict": word,
        "verdict_reason": reason,
        "verdict_rule": RULE,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def versions() -> dict[str, str | None]:
    """Versions of Python, kdgap and the libraries whose numerics matter (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_summary(entries: Mapping[str, Mapping[str, Any]], cfg: Any) -> dict[str, Any]:
    """The whole ``summary.json`` object from :func:`model_entry`'s entries.

    Args:
        entries: ``{model spec: model_entry(...)}`` in report order.
        cfg: the analysis settings (a dataclass, written under ``config``).

    Returns:
        The summary documented in ``docs/summary-schema.md``.
    """
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "models": dict(entries),
        "config": asdict(cfg),
        "versions": versions(),
    }


def previous_entries(path: Path, *, exclude: list[str]) -> dict:
    """The entries of models analysed into this folder before (other than ``exclude``), so a
    second ``analyze`` into one folder adds its models to the summary and the report."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it to start the folder's summary anew."
        ) from err
    if old.get("schema_version") != SCHEMA_VERSION:  # an older layout: start anew
        return {}
    return {m: e for m, e in old.get("models", {}).items() if m not in exclude}
