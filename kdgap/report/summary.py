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
import platform
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from kdgap.report.verdict import RULE, verdict

SCHEMA = "kdgap.summary"
SCHEMA_VERSION = 2
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


def model_entry(
    spec: str, results: Mapping[str, Any], cfg: Any, timings: Mapping[str, float]
) -> dict[str, Any]:
    """One model's entry of ``summary.json`` from its stage results.

    Args:
        spec: the model spec (the entry's key in ``models``).
        results: every stage's result by stage name: ``behavior``, ``baselines``,
            ``freqbias``, ``probes``, ``patching`` (``record`` is not read) and optionally
            ``aiw`` (None or absent when that stage did not run).
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
    return {
        "behavior": behavior,
        "baselines": baselines,
        "probes": probes,
        "patching": patching,
        "aiw": _aiw(results.get("aiw")),
        "config": asdict(cfg),
        "verdict": verdict(behavior["counterfactual_flip_rate"], patching["mediated_fraction"]),
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
