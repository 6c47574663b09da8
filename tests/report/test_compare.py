"""The report's comparison of models: every delta against the first model, by hand."""

from __future__ import annotations

import json

import pytest

from kdgap.report.compare import delta_html, delta_table


def _row(table: list[dict], metric: str) -> dict:
    (row,) = [r for r in table if r["metric"] == metric]
    return row


@pytest.fixture
def models(analysis_dir) -> dict:
    # The hand-written folder: a model that follows its rationale, then one that bypasses it.
    return json.loads((analysis_dir / "summary.json").read_text())["models"]


def test_every_delta_is_the_difference_from_the_first_model(models):
    first, second = models.values()
    table = delta_table(models)
    follows = _row(table, "action follows rationale")
    assert follows["values"] == [1.0, 0.05]  # written by hand in conftest
    assert follows["delta"] == [0.0, pytest.approx(0.05 - 1.0)]
    share = _row(table, "steps reading the rationale")
    want = second["decomposition"]["reading_share"] - first["decomposition"]["reading_share"]
    assert share["delta"][1] == pytest.approx(want) and share["delta"][1] < -0.5
    assert share["ci"] == [[0.9, 1.0], [0.0, 0.1]]
    greedy = _row(table, "correct rationale, greedy action (share of steps)")
    assert greedy["values"] == [0.0, 0.9] and greedy["delta"][1] == pytest.approx(0.9)
    assert _row(table, "doing probe, best layer accuracy")["values"] == [0.97, 0.97]
    div = _row(table, "divergence layer")
    assert div["values"] == [None, 2] and div["delta"] == [None, None]  # no number to subtract
    assert _row(table, "verdict")["delta"] == [None, None]


def test_frequency_bias_rows_only_for_windows_with_histories(models):
    metrics = [r["metric"] for r in delta_table(models)]
    assert "frequency bias F_g, 0-10 repetitions" in metrics
    assert not [m for m in metrics if "45-55" in m or "90-100" in m]  # n = 0 in both


def test_one_model_gets_no_comparison(models):
    name = next(iter(models))
    assert delta_html({name: models[name]}) == []
    html = "\n".join(delta_html(models))
    assert "Models compared" in html and "(-0.950)" in html  # follows: 0.05 - 1.0
