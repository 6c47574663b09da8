"""`analyze` end to end on a shipped organism at tiny sizes: caching, resume, summary, and
the optional Alice-in-Wonderland stage."""

import json
import shutil
from dataclasses import replace

import pytest

from kdgap.report import pipeline
from kdgap.report.aiw import PROMPT_TYPES, VARIATIONS, AiwResult, score_completion, summarise
from kdgap.report.pipeline import Analysis, AnalyzeConfig, analyze
from kdgap.report.stages import STAGES, model_slug
from kdgap.report.summary import SCHEMA_VERSION
from kdgap.report.verdict import verdict

CFG = AnalyzeConfig(episodes=2, record_episodes=8, n_pairs=4, freqbias_histories=1,
                    decomposition_steps=48)  # fmt: skip
SLUG = model_slug("organism:faithful")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    summary = analyze(["organism:faithful"], out, CFG, progress=False)
    return out, summary


def _strip(summary: dict) -> dict:
    return {m: _measured(e) for m, e in summary["models"].items()}


def _measured(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("timings", "aiw", "config")}


def test_summary_schema_and_faithful_verdict(finished):
    out, summary = finished
    assert summary["schema_version"] == SCHEMA_VERSION
    entry = summary["models"]["organism:faithful"]
    dec = entry["decomposition"]
    # The verdict is the rule applied to the decomposition, and matches the planted answer.
    assert (entry["verdict"], entry["verdict_reason"]) == verdict(
        dec["reading_share"], dec["reading_share_ci"], dec["n_steps"]
    )
    assert entry["verdict"] == dec["planted"]["verdict"] == "rationale-mediated"
    assert set(entry["timings"]) == set(STAGES)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "report.html").is_file()


def test_rerun_does_no_model_work_and_gives_the_same_summary(finished, monkeypatch):
    out, summary = finished

    def no_model(*a, **k):
        raise AssertionError("a finished analysis loaded a model")

    monkeypatch.setattr("kdgap.report.session.load_model", no_model)
    assert analyze(["organism:faithful"], out, CFG, progress=False) == summary


def test_interrupted_stage_resumes_to_the_same_summary(finished):
    out, summary = finished
    # Remove the last two stages' results, as a kill during probes would leave them.
    for name in ("probes", "patching"):
        (out / "models" / SLUG / f"{name}.json").unlink()
    again = analyze(["organism:faithful"], out, CFG, progress=False)
    assert _strip(again) == _strip(summary)


def test_aiw_is_an_optional_stage(finished, tmp_path, monkeypatch):
    out, summary = finished
    assert not (out / "models" / SLUG / "aiw.json").exists()
    assert summary["models"]["organism:faithful"].get("aiw") is None
    calls = []

    def fake_study(model, *, tokenizer, n_samples, seed, chat_template):
        calls.append((n_samples, seed, chat_template))
        samples = [score_completion(n, m, pt, s, f"{m} + 1 = {m + 1}\n### Answer: {m + 1}")
                   for pt in PROMPT_TYPES for n, m in VARIATIONS
                   for s in range(n_samples)]  # fmt: skip
        return AiwResult(samples, summarise(samples), {"n_samples": n_samples})

    monkeypatch.setattr(pipeline, "aiw_study", fake_study)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    analysis = Analysis("organism:faithful", copy, replace(CFG, aiw=True, aiw_samples=2))
    entry = analysis.run(progress=False)
    # only the AIW stage ran; the organism has no chat template, so the raw question is sent
    assert analysis.ran == {"aiw"} and calls == [(2, 0, False)]
    assert set(analysis.timings) == {*STAGES, "aiw"}
    saved = json.loads((copy / "models" / SLUG / "aiw.json").read_text())["result"]
    assert len(saved["samples"]) == 2 * len(PROMPT_TYPES) * len(VARIATIONS)
    assert entry["aiw"]["summary"] == saved["summary"]
    assert entry["aiw"]["summary"]["STANDARD"]["correct_rate"] == 1.0
    assert _measured(entry) == _measured(summary["models"]["organism:faithful"])


def test_aiw_stage_on_a_real_model(tiny_hf_dir, tmp_path):
    cfg = AnalyzeConfig(aiw=True, aiw_samples=1)
    result = Analysis(str(tiny_hf_dir), tmp_path, cfg).aiw()
    assert set(result["summary"]) == set(PROMPT_TYPES)
    assert result["summary"]["STANDARD"]["n"] == len(VARIATIONS)
    assert result["config"]["n_samples"] == 1 and result["config"]["chat_template"] is False
    assert len(result["samples"]) == len(PROMPT_TYPES) * len(VARIATIONS)


def test_config_counts_are_checked():
    with pytest.raises(ValueError, match="aiw_samples=0 must be an integer >= 1"):
        AnalyzeConfig(aiw_samples=0)
    with pytest.raises(ValueError, match="episodes=1.5"):
        AnalyzeConfig(episodes=1.5)


def test_a_bad_hook_spec_fails_when_the_model_loads_before_any_stage(tmp_path):
    with pytest.raises(ValueError, match="resid_postt"):
        analyze(["organism:faithful"], tmp_path, AnalyzeConfig(hooks="resid_postt"),
                progress=False)  # fmt: skip
    assert not list(tmp_path.rglob("*.json"))  # nothing was played or written
