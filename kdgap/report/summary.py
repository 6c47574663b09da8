"""``summary.json``: the versioned, documented result of ``kdgap analyze`` / ``kdgap demo``.

Schema (``schema_version`` 1)::

    {
      "schema": "kdgap.summary", "schema_version": 1,
      "models": {                                   # keyed by model spec
        "organism:faithful": {
          "behavior": {                             # the model's own play (kdgap play)
            "rationale_correct", "action_follows_rationale", "invalid_rate",
            "counterfactual_flip_rate", "action_coverage", "cumulative_regret",
            "action_matches": {"rationale", "optimal", "greedy", "most_frequent"},
            "kd_matrix": {"correct"|"incorrect": {"optimal", "greedy", "other"}},
            "frequency_bias": {"0-10"|"45-55"|"90-100": {"F_f", "F_g", "F_o", "n"},
                               "entropy_repetition_corr"}
          },
          "probes": {                               # off-policy transcripts, action site
            "layers", "knowing_acc", "knowing_ci", "doing_acc", "doing_ci",
            "knowing_acc_disagree", "doing_acc_disagree", (their "_ci"), "chance",
            "divergence_layer", "n_disagree", "tracking", "definition"
          },
          "patching": {                             # conclusion-edit pairs
            "mediated_fraction", "mediated_fraction_ci", "total_effect_fraction",
            "history_effect_fraction", "layers", "layer_profile", "layer_profile_ci",
            "n_pairs", "definition"
          },
          "verdict": "rationale-mediated" | "bypass" | "mixed",
          "verdict_rule": "...",
          "timings": {"behavior": s, ...}
        }
      },
      "config": {...AnalyzeConfig...}, "versions": {"kdgap", "torch", ...}
    }

Shares are in [0, 1]; ``None`` marks a value that does not exist for the model (e.g. the
frequency-bias windows beyond an organism's 50-step context).
"""

from __future__ import annotations

import platform
from dataclasses import asdict

from kdgap.report.verdict import RULE, verdict

SCHEMA_VERSION = 1
BEHAVIOR_KEYS = (
    "rationale_correct", "action_follows_rationale", "invalid_rate", "counterfactual_flip_rate",
    "action_coverage", "cumulative_regret", "suffix_failure_rate", "action_matches", "kd_matrix",
)  # fmt: skip
PROBE_KEYS = (
    "layers", "knowing_acc", "knowing_ci", "doing_acc", "doing_ci", "knowing_acc_disagree",
    "knowing_ci_disagree", "doing_acc_disagree", "doing_ci_disagree", "chance",
    "divergence_layer", "n_disagree", "tracking", "definition",
)  # fmt: skip
PATCHING_KEYS = (
    "mediated_fraction", "mediated_fraction_ci", "total_effect_fraction",
    "history_effect_fraction", "history_effect_fraction_ci", "layers", "layer_profile",
    "layer_profile_ci", "n_pairs", "definition",
)  # fmt: skip


def model_entry(spec: str, results: dict, cfg, timings: dict) -> dict:
    """One model's entry from its stage results (see the schema above)."""
    beh = results["behavior"]
    fb = results["freqbias"]
    behavior = {k: beh.get(k) for k in BEHAVIOR_KEYS}
    behavior["frequency_bias"] = {
        **fb["windows"],
        "entropy_repetition_corr": fb["entropy_repetition_corr"],
    }
    probes = {k: results["probes"].get(k) for k in PROBE_KEYS}
    patching = {k: results["patching"].get(k) for k in PATCHING_KEYS}
    return {
        "behavior": behavior,
        "probes": probes,
        "patching": patching,
        "verdict": verdict(behavior["counterfactual_flip_rate"], patching["mediated_fraction"]),
        "verdict_rule": RULE,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def versions() -> dict:
    """Versions of kdgap and the libraries whose numerics matter."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("kdgap", "torch", "transformer-lens", "transformers", "scikit-learn", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def build_summary(entries: dict, cfg) -> dict:
    """The whole ``summary.json`` object."""
    return {
        "schema": "kdgap.summary",
        "schema_version": SCHEMA_VERSION,
        "models": entries,
        "config": asdict(cfg),
        "versions": versions(),
    }
