"""A finished analysis folder written by hand (stage files + summary), no model work.

It follows the stage-file layout of :mod:`kdgap.report.stages` and the schema of
``docs/summary-schema.md``, with every stage result shaped as the real stage writes it (so
the summary built from it has every documented key); rendering and the browser test run in
seconds.
"""

import json

import pytest

from kdgap.report.aiw import PROMPT_TYPES, VARIATIONS, score_completion, summarise
from kdgap.report.pipeline import AnalyzeConfig
from kdgap.report.stages import model_slug
from kdgap.report.summary import build_summary, model_entry

L = [0, 1, 2, 3]


def _results(follow: bool) -> dict:
    kd = {"correct": {"optimal": 0.9 if follow else 0.0, "greedy": 0.0 if follow else 0.9,
                      "other": 0.0},
          "incorrect": {"optimal": 0.0, "greedy": 0.08, "other": 0.02}}  # fmt: skip
    behavior = {
        "rationale_correct": 0.9, "action_follows_rationale": 1.0 if follow else 0.05,
        "invalid_rate": 0.0, "counterfactual_flip_rate": 1.0 if follow else 0.0,
        "action_coverage": 0.8, "cumulative_regret": 5.0, "suffix_failure_rate": 0.1,
        "action_matches": {"rationale": 1.0, "optimal": 0.9, "greedy": 0.7, "most_frequent": 0.6},
        "kd_matrix": kd, "coverage_curve": [0.2, 0.4, 0.6, 0.8],
        "regret_curve": [0.1, 0.2, 0.3, 0.4],
    }  # fmt: skip
    freqbias = {
        "windows": {"0-10": {"F_f": 0.1, "F_g": 0.6, "F_o": 0.3, "n": 8},
                    "45-55": {"F_f": None, "F_g": None, "F_o": None, "n": 0},
                    "90-100": {"F_f": None, "F_g": None, "F_o": None, "n": 0}},
        "repetitions": [0, 5, 10], "entropy": [1.0, 0.9, 0.8], "F_f_curve": [0.1, 0.1, 0.2],
        "F_g_curve": [0.6, 0.6, 0.5], "F_o_curve": [0.3, 0.3, 0.3], "entropy_repetition_corr": -0.5,
    }  # fmt: skip
    probes = {
        "layers": L, "knowing_acc": [0.5, 0.7, 0.9, 0.95], "knowing_ci": [[0.4, 0.6]] * 4,
        "doing_acc": [0.4, 0.6, 0.9, 0.97], "doing_ci": [[0.3, 0.5]] * 4,
        "knowing_acc_disagree": [0.3, 0.3, 0.2, 0.1], "knowing_ci_disagree": [[0.2, 0.4]] * 4,
        "doing_acc_disagree": [0.3, 0.5, 0.8, 0.9], "doing_ci_disagree": [[0.2, 0.4]] * 4,
        "chance": {"knowing": 0.25, "doing": 0.3, "disagree": 0.4},
        "divergence_layer": None if follow else 2, "n_disagree": 40,
        "tracking": {"layer": 3, "tracks": "greedy_arm",
                     "shares": {"rationale_arm": 0.1, "ucb_arm": 0.2, "greedy_arm": 0.9,
                                "frequent_arm": 0.5},
                     "per_layer": {"rationale_arm": [0.3, 0.2, 0.1, 0.1],
                                   "ucb_arm": [0.3, 0.2, 0.2, 0.2],
                                   "greedy_arm": [0.4, 0.6, 0.8, 0.9],
                                   "frequent_arm": [0.4, 0.5, 0.5, 0.5]},
                     "tracks_per_layer": ["greedy_arm"] * 4},
        "definition": "first layer ...", "n_test": 120, "agreement": [0.5, 0.6, 0.7, 0.8],
        "latent": {"site": "action", "layers": L,
                   "labels": ["ucb_arm", "greedy_arm", "frequent_arm"],
                   "accuracy": {"ucb_arm": [0.5, 0.6, 0.8, 0.9], "greedy_arm": [0.6] * 4,
                                "frequent_arm": None},
                   "ci": {"ucb_arm": [[0.4, 0.6]] * 4, "greedy_arm": [[0.5, 0.7]] * 4,
                          "frequent_arm": None},
                   "chance": {"ucb_arm": 0.3, "greedy_arm": 0.35, "frequent_arm": None},
                   "unavailable": {"ucb_arm": None, "greedy_arm": None,
                                   "frequent_arm": "label='frequent_arm' has 1 class(es)"},
                   "definition": "accuracy of a logistic probe ..."},
    }  # fmt: skip
    patching = {
        "mediated_fraction": 0.95 if follow else 0.02,
        "mediated_fraction_ci": [0.9, 1.0] if follow else [0.0, 0.05],
        "total_effect_fraction": 0.97 if follow else 0.03, "history_effect_fraction": 0.1,
        "history_effect_fraction_ci": [0.05, 0.15], "layers": L,
        "layer_profile": [0.1, 0.2, 0.5, 0.15],
        "layer_profile_ci": [[0, 0.2], [0.1, 0.3], [0.4, 0.6], [0.1, 0.2]],
        "n_pairs": 16, "definition": "path effect / full flip",
        "heatmap": {"values": [[0.1 * i + 0.01 * j for j in range(6)] for i in range(4)],
                    "tokens": ["<bos>", "red1", "think", "ucb", "red", "act"],
                    "edited_tokens": ["<bos>", "red1", "think", "ucb", "blue", "act"],
                    "ld_clean": 2.5, "ld_corrupt": -2.0, "arms": ["red", "blue"], "layers": L,
                    "definition": "(LD_clean - LD_patched) / (2 * LD_clean), noising resid_pre"},
    }  # fmt: skip
    baselines = {
        "ucb": {"coverage_curve": [0.2, 0.4, 0.6, 0.8], "regret_curve": [0.1, 0.2, 0.25, 0.3],
                "action_coverage": 0.8, "cumulative_regret": 0.3, "suffix_failure_rate": 0.0},
        "random": {"coverage_curve": [0.2, 0.4, 0.6, 0.8], "regret_curve": [0.2, 0.4, 0.6, 0.8],
                   "action_coverage": 0.8, "cumulative_regret": 0.8, "suffix_failure_rate": 0.5},
    }  # fmt: skip
    return {"behavior": behavior, "freqbias": freqbias, "probes": probes, "patching": patching,
            "baselines": baselines, "decomposition": _decomposition(follow),
            "aiw": _aiw() if follow else None}  # fmt: skip


def _decomposition(follow: bool) -> dict:
    """A decomposition stage result as :func:`kdgap.report.decomposition.decomposition_stage`
    writes it (20 steps, one unit each)."""
    reads = [follow or i == 0 for i in range(20)]
    unit = {"kind": "ucb", "arm_from": 0, "arm_to": 1, "actions": [1, 0], "rationale": "r' ",
            "mediator_changed": True, "total_tv": 1.0, "direct_tv": 0.0 if follow else 1.0,
            "indirect_tv": 1.0 if follow else 0.0, "total_flip": True,
            "direct_flip": not follow, "indirect_flip": follow, "total_action": 1,
            "direct_action": 0 if follow else 1, "indirect_action": 1 if follow else 0}  # fmt: skip
    steps = [{"episode": i // 4, "step": 2 + i % 4, "actions": [0, 1], "rewards": [1.0, 0.0],
              "rationale": "r ", "action": 0, "units": [unit], "reads": r}
             for i, r in enumerate(reads)]  # fmt: skip
    eff = {"n_units": 20, "mediator_changed": 1.0, "total_tv": 1.0, "total_flip": 1.0,
           "direct_tv": 1.0 - follow, "direct_flip": 1.0 - follow, "indirect_tv": float(follow),
           "indirect_flip": float(follow)}  # fmt: skip
    via = {"layer_profile": [0.0, 0.1, 0.0, 0.0], "layer_profile_ci": [[0.0, 0.1]] * 4}
    direct = {"layer_profile": [0.5, 0.3, 0.1, 0.0], "layer_profile_ci": [[0.3, 0.6]] * 4}
    read = {"fraction": 0.9 if follow else 0.02, "fraction_ci": [0.8, 1.0] if follow else [0, 0.05],
            "layer_profile": [0.0, 0.6, 0.3, 0.0] if follow else [0.01, 0.0, 0.01, 0.0],
            "layer_profile_ci": [[0.0, 0.7]] * 4}  # fmt: skip
    activation = {"read": read, "n_read_units": 20, "layers": L, "definition": "path patch ..."}
    if follow:
        activation["split_unavailable"] = "activation split: no unit's direct effect ..."
    else:
        activation |= {"indirect_share": 0.05, "indirect_share_ci": [0.0, 0.1],
                       "via_rationale": via, "direct": direct, "n_units": 20}  # fmt: skip
    share = sum(reads) / len(reads)
    return {
        "indirect_share": float(follow), "indirect_share_ci": [0.95, 1.0] if follow else [0, 0.05],
        "reading_share": share, "reading_share_ci": [0.9, 1.0] if follow else [0.0, 0.1],
        "n_steps": 20, "n_steps_unchanged": 1, "n_units": 20,
        "effects": {k: eff for k in ("ucb", "greedy", "frequent", "all")}, "steps": steps,
        "definition": "TE, NDE, NIE ...", "activation": activation,
        "battery": {
            "early_answering": {"fractions": [0.0, 0.25, 0.5, 0.75, 1.0],
                                "same_action": [0.2, 0.2, 0.3, 0.3, 1.0] if follow else [1.0] * 5,
                                "area": 0.6 if follow else 0.0},
            "filler": {"same_action": 0.2 if follow else 1.0},
            "mistakes": {"conclusion": {"changed": float(follow), "follows_edit": float(follow),
                                        "n": 20},
                         "statistics": {"changed": 0.0, "n": 20}},
            "n_steps": 20, "definition": "early answering ...",
        },
        "planted": {"mechanism": "faithful" if follow else "greedy-bypass",
                    "reading_share": float(follow), "agreement": 0.95,
                    "verdict": "rationale-mediated" if follow else "bypass"},
    }  # fmt: skip


def _aiw() -> dict:
    """An AIW result as ``AiwResult.to_dict(with_samples=False)`` writes it, canned texts."""
    texts = [
        "So 6 + 1 = 7.\n### Answer: 7",
        "She has 6 sisters.\n### Answer: 6",
        "Count 2.\n### Answer: 3",
    ]
    samples = [
        score_completion(n, m, pt, s, text)
        for pt in PROMPT_TYPES for n, m in VARIATIONS for s, text in enumerate(texts)
    ]  # fmt: skip
    config = {"variations": [list(v) for v in VARIATIONS], "prompt_types": list(PROMPT_TYPES),
              "n_samples": len(texts), "temperature": 0.7,
              "max_new_tokens": {"STANDARD": 192, "THINKING": 256, "RESTRICTED": 24},
              "seed": 0, "chat_template": True}  # fmt: skip
    return {"summary": summarise(samples), "config": config}


@pytest.fixture
def analysis_dir(tmp_path):
    cfg = AnalyzeConfig()
    entries = {}
    for model, follow in (("organism:faithful", True), ("organism:greedy-bypass", False)):
        res = _results(follow)
        d = tmp_path / "models" / model_slug(model)
        d.mkdir(parents=True)
        for name, result in res.items():
            if result is None:  # a stage that did not run leaves no file
                continue
            (d / f"{name}.json").write_text(
                json.dumps({"key": {}, "seconds": 1.0, "result": result})
            )
        entries[model] = model_entry(model, res, cfg.for_model(model), {"behavior": 1.0})
    (tmp_path / "summary.json").write_text(json.dumps(build_summary(entries, cfg)))
    return tmp_path
