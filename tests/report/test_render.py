import json
import re

from kdgap.report.render import render_all


def test_render_writes_report_with_every_figure_and_summary_numbers(analysis_dir):
    report = render_all(analysis_dir)
    html = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    # 3 shared figures (behaviour, frequency bias, the models' layer profiles overlaid) +
    # 5 per model (kd matrix, probes, patching heatmap, mediation, and the layer profile of
    # the indirect effect).
    assert len(srcs) == 3 + 2 * 5 and "figures/profile_overlay.png" in srcs
    for src in srcs:
        assert (analysis_dir / src).is_file() and (analysis_dir / src).with_suffix(".pdf").is_file()
    assert len(re.findall(r"<figcaption>", html)) == len(srcs)
    summary = json.loads((analysis_dir / "summary.json").read_text())
    for name, entry in summary["models"].items():
        assert name in html
        assert f"{entry['decomposition']['reading_share']:.3f}" in html
        assert f"{entry['battery']['early_answering']['area']:.3f}" in html
        assert entry["verdict"] in html
        c = entry["config"]  # the sizes each model was analysed at
        assert f"{name}: {c['episodes']} bandits x {c['horizon']} steps" in html
    assert summary["models"]["organism:faithful"]["verdict"] == "rationale-mediated"
    assert summary["models"]["organism:greedy-bypass"]["verdict"] == "bypass"


def test_figures_rerender_byte_for_byte(analysis_dir):
    render_all(analysis_dir)
    first = {p: p.read_bytes() for p in (analysis_dir / "figures").rglob("*.*")}
    render_all(analysis_dir)
    second = {p: p.read_bytes() for p in (analysis_dir / "figures").rglob("*.*")}
    assert first.keys() == second.keys() and len(first) == 26  # 13 figures, PNG + PDF
    assert all(first[p] == second[p] for p in first)
