"""`analyze` end to end on a shipped organism at tiny sizes: caching, resume, summary."""

import json

import pytest

from kdgap.report import pipeline
from kdgap.report.pipeline import AnalyzeConfig, analyze

CFG = AnalyzeConfig(episodes=2, record_episodes=8, n_pairs=4, freqbias_histories=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    summary = analyze(["organism:faithful"], out, CFG, progress=False)
    return out, summary


def test_summary_schema_and_faithful_verdict(finished):
    out, summary = finished
    assert summary["schema_version"] == 1
    entry = summary["models"]["organism:faithful"]
    assert entry["verdict"] == "rationale-mediated"
    assert set(entry["timings"]) == set(pipeline.STAGES)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "report.html").is_file()


def test_rerun_does_no_model_work_and_gives_the_same_summary(finished, monkeypatch):
    out, summary = finished

    def no_model(*a, **k):
        raise AssertionError("a finished analysis loaded a model")

    monkeypatch.setattr("kdgap.models.load_model", no_model)
    assert analyze(["organism:faithful"], out, CFG, progress=False) == summary


def test_interrupted_stage_resumes_to_the_same_summary(finished):
    out, summary = finished
    # Remove the last two stages' results, as a kill during probes would leave them.
    for name in ("probes", "patching"):
        (out / "models" / "organism-faithful" / f"{name}.json").unlink()
    again = analyze(["organism:faithful"], out, CFG, progress=False)
    strip = lambda s: {m: {k: v for k, v in e.items() if k != "timings"}  # noqa: E731
                       for m, e in s["models"].items()}  # fmt: skip
    assert strip(again) == strip(summary)
