"""Models side by side: the delta table of the report (each model against the first).

When an analysis folder holds two or more models (``kdgap analyze --model A --model B``,
e.g. a model before and after fine-tuning), the report compares every model with the
first one on the measurements of the question: behaviour (regret, coverage, suffix
failures, frequency bias, the knowing-doing matrix given a correct rationale, action
follows rationale, rationale correctness), the mediation decomposition (share of steps
reading the rationale and the indirect share, with intervals; the indirect effect read at
the action, all layers) and the probes (best knowing and doing accuracy, divergence
layer). Everything is read from ``summary.json``; nothing here is stored.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any

#: Frequency-bias windows compared (the repetition counts of the protocol's windows).
_WINDOWS = ("0-10", "45-55", "90-100")


def at_path(entry: Mapping, path: str) -> Any:
    """``entry``'s value at the dotted ``path`` (None where a step is missing or null)."""
    value: Any = entry
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _best(key: str) -> Callable[[Mapping], float | None]:
    def get(entry: Mapping) -> float | None:
        values = [v for v in (at_path(entry, f"probes.{key}") or []) if v is not None]
        return max(values) if values else None

    return get


def metrics(models: Mapping[str, Mapping]) -> list[tuple[str, Callable[[Mapping], Any], str]]:
    """``(label, value of an entry, key of its interval or "")`` of every compared row.

    Frequency-bias windows appear when some model has histories in them.
    """
    rows: list[tuple[str, Callable[[Mapping], Any], str]] = []

    def add(label: str, path: str, ci: str = "") -> None:
        rows.append((label, lambda e, p=path: at_path(e, p), ci))

    add("cumulative regret", "behavior.cumulative_regret")
    add("action coverage", "behavior.action_coverage")
    add("suffix failure rate", "behavior.suffix_failure_rate")
    fb = "behavior.frequency_bias"
    for w in _WINDOWS:
        if any(at_path(m, f"{fb}.{w}.n") for m in models.values()):
            for f in ("F_f", "F_g", "F_o"):
                add(f"frequency bias {f}, {w} repetitions", f"{fb}.{w}.{f}")
    for cls in ("optimal", "greedy", "other"):
        add(f"correct rationale, {cls} action (share of steps)",
            f"behavior.kd_matrix.correct.{cls}")  # fmt: skip
    add("action follows rationale", "behavior.action_follows_rationale")
    add("rationale correct", "behavior.rationale_correct")
    add("steps reading the rationale", "decomposition.reading_share",
        "decomposition.reading_share_ci")  # fmt: skip
    add("indirect share of the history's effect", "decomposition.indirect_share",
        "decomposition.indirect_share_ci")  # fmt: skip
    add("indirect effect read at the action, all layers",
        "decomposition.activation.read_fraction",
        "decomposition.activation.read_fraction_ci")  # fmt: skip
    rows.append(("knowing probe, best layer accuracy", _best("knowing_acc"), ""))
    rows.append(("doing probe, best layer accuracy", _best("doing_acc"), ""))
    add("divergence layer", "probes.divergence_layer")
    add("verdict", "verdict")
    return rows


def delta_table(models: Mapping[str, Mapping]) -> list[dict]:
    """One row per metric: ``{"metric", "values": [per model], "ci": [per model, [2] or
    None], "delta": [per model, value - the first model's, None where either is not a
    number]}``; models in the summary's order."""
    entries = list(models.values())
    out = []
    for label, get, ci in metrics(models):
        values = [get(e) for e in entries]
        base = values[0]
        delta = [v - base if _num(v) and _num(base) else None for v in values]
        out.append({"metric": label, "values": values,
                    "ci": [at_path(e, ci) if ci else None for e in entries],
                    "delta": delta})  # fmt: skip
    return out


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: object, ci: object, delta: object, first: bool) -> str:
    if v is None:
        return "n/a"
    text = f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if not first and delta is not None:
        text += f" ({delta:+.3f})" if isinstance(delta, float) else f" ({delta:+d})"
    return text


def delta_html(models: Mapping[str, Mapping]) -> list[str]:
    """The report's comparison table (empty with fewer than two models)."""
    if len(models) < 2:
        return []
    names = list(models)
    parts = [
        "<h2>Models compared</h2>",
        f"<p>Each model against <b>{html.escape(names[0])}</b> (in brackets: 95% "
        "intervals; in parentheses: the difference from the first model).</p>",
        "<table class='delta'><tr><th>measurement</th>"
        + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>",
    ]  # fmt: skip
    for row in delta_table(models):
        triples = zip(row["values"], row["ci"], row["delta"])
        cells = [_cell(v, c, d, i == 0) for i, (v, c, d) in enumerate(triples)]
        parts.append(f"<tr><td>{html.escape(row['metric'])}</td>"
                     + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")  # fmt: skip
    parts.append("</table>")
    return parts
