"""docs/summary-schema.md documents exactly the keys that summary.json holds."""

import itertools
import json
import re
from pathlib import Path

from kdgap.report.pipeline import AnalyzeConfig
from kdgap.report.stages import model_slug
from kdgap.report.summary import BASELINE_KEYS, SCHEMA_VERSION, build_summary, model_entry

DOC = Path(__file__).resolve().parents[2] / "docs" / "summary-schema.md"

# Maps whose keys are data (model specs, policy names, ...), by their path with placeholders:
# their keys are written as the doc's placeholder.
MAPS = {
    "models": "<model>",
    "models.<model>.baselines": "<policy>",
    "models.<model>.timings": "<stage>",
    "models.<model>.aiw.summary": "<prompt_type>",
    "models.<model>.aiw.summary.<prompt_type>.by_variation": "<variation>",
    "models.<model>.aiw.config.max_new_tokens": "<prompt_type>",
}
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)
BRACES = re.compile(r"\{([^{}]*)\}")


def written_paths(summary: dict) -> set[str]:
    """Every key path of ``summary`` (objects only, not list items), map keys as placeholders."""
    out: set[str] = set()

    def walk(node: object, path: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            child = f"{path}.{MAPS.get(path, key)}" if path else MAPS.get(path, key)
            out.add(child)
            walk(value, child)

    walk(summary, "")
    return out


def expand(pattern: str) -> list[str]:
    """``a.{b,c}.d`` -> ``["a.b.d", "a.c.d"]`` (every brace group, all combinations)."""
    parts = BRACES.split(pattern)  # literal, alternatives, literal, alternatives, ...
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def documented_paths(text: str) -> set[str]:
    """The key paths of every table row whose first cell is a backticked path."""
    return {path for pattern in ROW.findall(text) for path in expand(pattern)}


def test_expand_braces():
    assert expand("a.{b,c}.d{,.e}") == ["a.b.d", "a.b.d.e", "a.c.d", "a.c.d.e"]
    assert documented_paths("| key |\n|---|\n| `x.{y,z}` | t |\n| `w` | u |\n") == {
        "x.y", "x.z", "w",
    }  # fmt: skip


def test_every_written_key_is_documented_and_every_documented_key_is_written(analysis_dir):
    summary = json.loads((analysis_dir / "summary.json").read_text())
    assert summary["schema_version"] == SCHEMA_VERSION
    written, documented = written_paths(summary), documented_paths(DOC.read_text())
    assert written - documented == set(), "keys summary.json holds but the doc does not list"
    assert documented - written == set(), "keys the doc lists but summary.json does not hold"


def test_doc_names_the_current_schema_version():
    assert f"# `summary.json` (schema version {SCHEMA_VERSION})" in DOC.read_text()


def test_a_stage_that_did_not_run_leaves_its_key_null(analysis_dir):
    """Without the AIW stage and without a heatmap the keys stay, with null values."""
    stage_dir = analysis_dir / "models" / model_slug("organism:faithful")
    results = {p.stem: json.loads(p.read_text())["result"] for p in stage_dir.glob("*.json")}
    del results["aiw"], results["patching"]["heatmap"]
    entry = model_entry("organism:faithful", results, AnalyzeConfig(), {"behavior": 1.0})
    assert entry["aiw"] is None and entry["patching"]["heatmap"] is None
    summary = json.loads(json.dumps(build_summary({"organism:faithful": entry}, AnalyzeConfig())))
    documented = documented_paths(DOC.read_text())
    assert written_paths(summary) <= documented
    assert summary["models"]["organism:faithful"]["baselines"] == {
        name: {k: res[k] for k in BASELINE_KEYS} for name, res in results["baselines"].items()
    }
