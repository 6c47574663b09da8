"""Caching that cannot lie: a stage's cached result is reused exactly when the model's
files, how it runs, and the settings the stage depends on are unchanged."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

from kdgap.models import files_fingerprint
from kdgap.organisms.registry import resolve_organism
from kdgap.report.pipeline import Analysis, AnalyzeConfig, analyze
from kdgap.report.stages import STAGES, model_slug

CFG = AnalyzeConfig(episodes=2, horizon=12, record_episodes=6, n_pairs=4, freqbias_histories=1,
                    decomposition_steps=16)  # fmt: skip


def test_distinct_specs_get_distinct_readable_folders():
    a, b = model_slug("/m/a-b"), model_slug("/m/a/b")
    assert a != b and a.startswith("m-a-b-") and b.startswith("m-a-b-")
    assert model_slug("organism:faithful") == model_slug("organism:faithful")


@pytest.fixture
def organism_copy(tmp_path):
    folder = tmp_path / "org"
    shutil.copytree(resolve_organism("faithful"), folder)
    return folder


def test_fingerprint_follows_the_weight_files(organism_copy):
    spec = f"organism:{organism_copy}"
    before = files_fingerprint(spec)
    assert files_fingerprint(spec) == before  # reading changes nothing
    weights = next(organism_copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten
    assert files_fingerprint(spec) != before
    assert files_fingerprint("organism:faithful") != files_fingerprint("organism:greedy-bypass")


def _run(spec, out, cfg) -> set[str]:
    """The stages that ran (were not read from the cache) in one analysis."""
    analysis = Analysis(spec, out, cfg)
    analysis.run(progress=False)
    return analysis.ran


def test_a_changed_setting_reruns_exactly_the_stages_that_depend_on_it(organism_copy, tmp_path):
    spec, out = f"organism:{organism_copy}", tmp_path / "run"
    assert _run(spec, out, CFG) == set(STAGES)
    assert _run(spec, out, CFG) == set()  # all cached
    assert _run(spec, out, replace(CFG, n_pairs=5)) == {"patching"}
    assert _run(spec, out, replace(CFG, n_pairs=5, decomposition_steps=12)) == {"decomposition"}
    assert _run(spec, out, replace(CFG, n_pairs=5)) == {"decomposition"}  # its own key again
    # The generation budget: every stage that generates or reads generated transcripts.
    wrote = set(STAGES) - {"baselines"}
    assert _run(spec, out, replace(CFG, n_pairs=5, max_new_tokens=12)) == wrote
    assert _run(spec, out, replace(CFG, n_pairs=5)) == wrote  # the default budget again
    acts = out / "models" / model_slug(spec) / "acts"
    (first,) = acts.iterdir()
    assert _run(spec, out, replace(CFG, n_pairs=5, dtype="bfloat16")) == set(STAGES)
    weights = next(organism_copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _run(spec, out, replace(CFG, n_pairs=5, dtype="bfloat16")) == set(STAGES)
    (last,) = acts.iterdir()  # recorded afresh into its own store; the old ones removed
    assert last.name != first.name


def test_a_second_model_analysed_into_the_folder_joins_the_summary(tmp_path):
    first = analyze(["organism:faithful"], tmp_path, CFG, progress=False)
    other = replace(CFG, n_pairs=5)
    both = analyze(["organism:greedy-bypass"], tmp_path, other, progress=False)
    assert list(both["models"]) == ["organism:faithful", "organism:greedy-bypass"]
    assert both["models"]["organism:faithful"] == first["models"]["organism:faithful"]
    assert both["models"]["organism:faithful"]["config"]["n_pairs"] == 4
    assert both["models"]["organism:greedy-bypass"]["config"]["n_pairs"] == 5
    assert both["config"]["n_pairs"] == 5  # the latest call's settings
    page = (tmp_path / "report.html").read_text()
    assert "organism:faithful" in page and "organism:greedy-bypass" in page
    (tmp_path / "summary.json").write_text("{truncated")
    with pytest.raises(ValueError, match="summary.json is not valid JSON"):
        analyze(["organism:greedy-bypass"], tmp_path, other, progress=False)
