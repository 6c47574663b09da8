"""`kdgap figures DIR` needs summary.json alone, and draws what the stage files hold."""

import json
import shutil

import pytest

from kdgap.report import figures as F
from kdgap.report.render import render_all
from kdgap.report.stages import model_slug


def _rendered(out):
    """Every figure file and the report, by path relative to ``out``."""
    files = [*(out / "figures").rglob("*.*"), out / "report.html"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_summary_alone_renders_byte_identical_figures_and_report(analysis_dir, tmp_path):
    render_all(analysis_dir)
    full = _rendered(analysis_dir)
    alone = tmp_path / "alone"
    shutil.copytree(analysis_dir, alone)
    for path in alone.iterdir():
        if path.name != "summary.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert [p.name for p in alone.rglob("*")] == ["summary.json"]
    render_all(alone)
    again = _rendered(alone)
    assert sorted(again) == sorted(full)
    # 3 shared (the last: the layer profiles overlaid) + 5 per model.
    assert len([p for p in full if p.endswith(".png")]) == 13
    assert len([p for p in full if p.endswith(".pdf")]) == 13
    different = [p for p in full if full[p] != again[p]]
    assert different == []


def test_figures_from_the_summary_equal_figures_from_the_stage_files(analysis_dir, tmp_path):
    """The summary carries the same data the stage files hold: same inputs, same pictures."""
    render_all(analysis_dir)
    summary = json.loads((analysis_dir / "summary.json").read_text())
    models = list(summary["models"])

    def stage(model, name):
        path = analysis_dir / "models" / model_slug(model) / f"{name}.json"
        return json.loads(path.read_text())["result"]

    ref = tmp_path / "from_stages"
    curves = {m: stage(m, "behavior") for m in models}
    curves |= {f"{n} (baseline)": r for n, r in stage(models[0], "baselines").items()}
    drawn = F.behavior_curves(curves, ref / "behavior")
    drawn += F.frequency_bias({m: stage(m, "freqbias") for m in models}, ref / "frequency_bias")
    for m in models:
        heat, slug = stage(m, "patching")["heatmap"], model_slug(m)
        drawn += F.patching_heatmap(heat["values"], heat["tokens"], ref / slug / "patching",
                                    title=m)  # fmt: skip
        drawn += F.mediation_profile(stage(m, "patching"), ref / slug / "mediation", title=m)
        drawn += F.probe_layers(stage(m, "probes"), ref / slug / "probes", title=m)
        drawn += F.kd_matrix(stage(m, "behavior")["kd_matrix"], ref / slug / "kd_matrix",
                             title=m)  # fmt: skip
    assert len(drawn) == 20
    for path in drawn:
        rendered = analysis_dir / "figures" / path.relative_to(ref)
        assert rendered.read_bytes() == path.read_bytes(), path.relative_to(ref)


def test_render_refuses_a_version_1_summary_and_names_the_fix(analysis_dir):
    spath = analysis_dir / "summary.json"
    spath.write_text(json.dumps({**json.loads(spath.read_text()), "schema_version": 1}))
    with pytest.raises(ValueError, match=r"schema_version=1.*re-run the same `kdgap analyze"):
        render_all(analysis_dir)


def test_render_without_a_summary_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="kdgap analyze"):
        render_all(tmp_path)


def test_aiw_table_only_for_models_that_ran_it(analysis_dir):
    html = render_all(analysis_dir).read_text()
    summary = json.loads((analysis_dir / "summary.json").read_text())
    rates = summary["models"]["organism:faithful"]["aiw"]["summary"]
    assert html.count("Alice in Wonderland") == 1
    section = html[html.index("Alice in Wonderland") :]
    assert "organism:faithful" in section and "organism:greedy-bypass" not in section
    for prompt_type, r in rates.items():
        assert f"<td>{prompt_type}</td><td>{r['n']}</td><td>{r['correct_rate']:.3f}</td>" in section
