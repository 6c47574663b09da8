"""The HTML report: every number comes from ``summary.json``, every figure from ``figures/``.

The page is static (no scripts, no network): figures are relative ``<img>`` links next to
the report, so the folder can be zipped, served or opened from disk.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

from kdgap.io import atomic_write_text
from kdgap.report.compare import delta_html
from kdgap.report.figures import CAPTIONS

CSS = """
body { font-family: Georgia, serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #111; line-height: 1.4; }
h1, h2, h3 { font-family: Helvetica, Arial, sans-serif; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #999; padding: 0.2rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5rem 1rem 1rem 0; vertical-align: top;
         max-width: 34rem; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8rem; color: #333; }
.verdict { font-weight: bold; font-family: Helvetica, Arial, sans-serif; }
code { font-size: 0.85rem; }
.row { display: flex; flex-wrap: wrap; gap: 0.5rem; align-items: flex-start; }
figure.small { max-width: 23rem; }
.cell { margin-right: 1.5rem; }
"""


def _fmt(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _figure(src: str, caption_key: str, n: int, label: str = "") -> str:
    cap = html.escape(CAPTIONS[caption_key])
    who = f" <i>{html.escape(label)}</i>." if label else ""
    cls = " class='small'" if label else ""
    return (
        f'<figure{cls}><img src="{html.escape(src)}" alt="Figure {n}: {caption_key}">'
        f"<figcaption><b>Figure {n}.</b>{who} {cap}</figcaption></figure>"
    )


SECTIONS = (
    ("kd_matrix", "Knowing-doing matrices (figures)"),
    ("probes", "Probes: knowing vs doing by layer"),
    ("patching", "Activation patching: layer x position"),
    ("mediation", "Mediation by the rationale, by layer"),
    ("indirect", "The history's route to the action, by layer"),
)


def render_report(summary: Mapping, figures: Mapping[str, Mapping[str, str]], out: Path) -> Path:
    """Write ``out`` (``report.html``) from a summary and the figure paths.

    Args:
        summary: the ``summary.json`` object (schema in ``docs/summary-schema.md``).
        figures: ``{model_name: {figure_key: path relative to out's folder}}`` plus an
            optional ``"_all"`` entry for figures comparing models.
        out: the report path.

    Returns:
        ``out``.
    """
    models = summary["models"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>kdgap report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>kdgap: does the action read the rationale?</h1>",
        "<p>Knowing-doing diagnosis of each model: behaviour on text bandits, a causal "
        "mediation analysis (history -> rationale -> action: does the action move with the "
        "rationale the model writes, the history held?), linear probes at the action token, "
        "and activation patching. Numbers below are "
        "read from <code>summary.json</code> (schema version "
        f"{_fmt(summary.get('schema_version'))}).</p>",
        "<h2>Verdicts</h2><table><tr><th>model</th><th>verdict</th>"
        "<th>steps reading the rationale [95% CI]</th><th>indirect share [95% CI]</th>"
        "<th>planted (organisms)</th><th>rationale correct</th>"
        "<th>action follows rationale</th><th>conclusion-edit flip rate</th>"
        "<th>divergence layer</th></tr>",
    ]
    for name, m in models.items():
        b, p, d = m.get("behavior", {}), m.get("probes", {}), m.get("decomposition") or {}
        planted = d.get("planted") or {}
        why = f" ({m['verdict_reason']})" if m.get("verdict_reason") else ""
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td class='verdict'>{_fmt(m.get('verdict'))}"
            f"{html.escape(why)}</td>"
            f"<td>{_ci(d, 'reading_share')}</td><td>{_ci(d, 'indirect_share')}</td>"
            f"<td>{_planted(planted)}</td>"
            f"<td>{_fmt(b.get('rationale_correct'))}</td>"
            f"<td>{_fmt(b.get('action_follows_rationale'))}</td>"
            f"<td>{_fmt(b.get('counterfactual_flip_rate'))}</td>"
            f"<td>{_fmt(p.get('divergence_layer'))}</td></tr>"
        )
    parts.append("</table>")
    parts.extend(_sizes(models))
    parts.extend(delta_html(models))
    n = 0
    if figures.get("_all", {}).get("overlay"):
        n += 1
        parts.append(_figure(figures["_all"]["overlay"], "overlay", n))
    parts.extend(_battery_table(models))
    missing = [
        (name, m[part]["unavailable"]) for name, m in models.items()
        for part in ("probes", "patching", "decomposition", "battery")
        if (m.get(part) or {}).get("unavailable")
    ]  # fmt: skip
    if missing:
        parts.append("<p>Not measured:</p><ul>")
        parts += [f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in missing]
        parts.append("</ul>")
    rule = next((m.get("verdict_rule") for m in models.values() if m.get("verdict_rule")), None)
    if rule:
        parts.append(f"<p>Verdict rule: {html.escape(rule)}</p>")
    for key in ("behavior", "freqbias"):
        src = figures.get("_all", {}).get(key)
        if src:
            n += 1
            parts.append(_figure(src, key, n))
    # One section per figure kind, the models side by side so they compare at a glance.
    parts.append("<h2>Knowing-doing matrices</h2><div class='row'>")
    for name, m in models.items():
        parts.append(f"<div class='cell'><h3>{html.escape(name)}</h3>")
        parts.append(_kd_table(m.get("behavior", {}).get("kd_matrix")) + "</div>")
    parts.append("</div>")
    for key, heading in SECTIONS:
        row = [(name, figures.get(name, {}).get(key)) for name in models]
        if not any(src for _, src in row):
            continue
        parts.append(f"<h2>{heading}</h2><div class='row'>")
        for name, src in row:
            if src:
                n += 1
                parts.append(_figure(src, key, n, label=name))
        parts.append("</div>")
    parts.extend(_aiw_section(models))
    parts.append("</body></html>\n")
    atomic_write_text(Path(out), "\n".join(parts))
    return Path(out)


def _sizes(models: dict) -> list[str]:
    """One line per model: the sizes it was analysed at (the preset may differ by model)."""
    rows = []
    for name, m in models.items():
        c = m.get("config") or {}
        if c.get("episodes") is None:
            continue
        rows.append(
            f"<li>{html.escape(name)}: {c['episodes']} bandits x {c['horizon']} steps of own "
            f"play, {c['record_episodes']} off-policy bandits, {c['n_pairs']} pairs, "
            f"{c['decomposition_steps']} decomposition steps, {c['freqbias_histories']} "
            f"frequency-bias histories per repetition count ({_fmt(c.get('sizes'))} sizes)</li>"
        )
    return ["<p>Sizes:</p><ul>", *rows, "</ul>"] if rows else []


def _battery_table(models: Mapping) -> list[str]:
    """Lanham et al.'s tests, one row per model (``battery`` of each entry)."""
    rows = [(name, m.get("battery") or {}) for name, m in models.items()]
    if not any(b.get("n_steps") for _, b in rows):
        return []
    out = [
        "<h2>Faithfulness battery</h2><p>The model's rationale cut short, replaced by filler "
        "or edited, then the action chosen again (Lanham et al. 2023): the share of steps "
        "whose choice is unchanged, or changes.</p><table><tr><th>model</th>"
        "<th>early answering: area over the curve</th><th>same choice with no rationale</th>"
        "<th>same choice with filler</th><th>conclusion edit: changed / follows</th>"
        "<th>statistics edit: changed</th></tr>"
    ]
    for name, b in rows:
        early, mis = b.get("early_answering") or {}, b.get("mistakes") or {}
        conc, stats = mis.get("conclusion") or {}, mis.get("statistics") or {}
        first = (early.get("same_action") or [None])[0]
        out.append(
            f"<tr><td>{html.escape(name)}</td><td>{_fmt(early.get('area'))}</td>"
            f"<td>{_fmt(first)}</td><td>{_fmt((b.get('filler') or {}).get('same_action'))}</td>"
            f"<td>{_fmt(conc.get('changed'))} / {_fmt(conc.get('follows_edit'))}</td>"
            f"<td>{_fmt(stats.get('changed'))}</td></tr>"
        )
    out.append("</table>")
    return out


def _planted(planted: Mapping) -> str:
    """The planted answer of an organism, or ``none`` (no planted mechanism: a real or a
    fine-tuned model)."""
    if not planted:
        return "none"
    return f"{_fmt(planted.get('verdict'))} {_fmt(planted.get('reading_share'))}"


def _ci(block: Mapping, key: str) -> str:
    lo, hi = block.get(f"{key}_ci") or (None, None)
    return f"{_fmt(block.get(key))} [{_fmt(lo)}, {_fmt(hi)}]"


def _kd_table(kd: Mapping | None) -> str:
    if not kd:
        return "<p>No rationales: no knowing-doing matrix.</p>"
    rows = ["<table><tr><th>rationale</th><th>optimal</th><th>greedy</th><th>other</th></tr>"]
    for r in ("correct", "incorrect"):
        cells = "".join(f"<td>{_fmt(kd[r][c])}</td>" for c in ("optimal", "greedy", "other"))
        rows.append(f"<tr><td>{r}</td>{cells}</tr>")
    rows.append("</table>")
    return "".join(rows)


AIW_COLUMNS = (
    ("n", "samples"),
    ("correct_rate", "correct rate"),
    ("se", "standard error"),
    ("parsed_rate", "answer line parsed"),
    ("rationale_matches_answer", "reasoning ends on the answer"),
    ("confabulated", "confabulated"),
    ("disconnected", "disconnected"),
)


def _aiw_section(models: Mapping[str, Mapping]) -> list[str]:
    """One table of Alice-in-Wonderland rates per model that ran the study (none: nothing)."""
    ran = {name: m["aiw"] for name, m in models.items() if m.get("aiw")}
    if not ran:
        return []
    head = "".join(f"<th>{label}</th>" for _, label in AIW_COLUMNS)
    parts = ["<h2>Alice in Wonderland: correct-response rate by prompt type</h2>"]
    parts.append("<div class='row'>")
    for name, aiw in ran.items():
        parts.append(f"<div class='cell'><h3>{html.escape(name)}</h3>")
        parts.append(f"<table><tr><th>prompt type</th>{head}</tr>")
        for prompt_type, rates in (aiw.get("summary") or {}).items():
            cells = "".join(f"<td>{_fmt(rates.get(k))}</td>" for k, _ in AIW_COLUMNS)
            parts.append(f"<tr><td>{html.escape(prompt_type)}</td>{cells}</tr>")
        parts.append("</table></div>")
    parts.append("</div>")
    return parts
