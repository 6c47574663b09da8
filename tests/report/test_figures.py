import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest

from kdgap.report import figures as F
from kdgap.report.verdict import verdict

KD = {"correct": {"optimal": 0.2, "greedy": 0.6, "other": 0.1},
      "incorrect": {"optimal": 0.0, "greedy": 0.07, "other": 0.03}}  # fmt: skip
PROBES = {
    "layers": [0, 1, 2, 3], "knowing_acc": [0.5, 0.8, 0.9, 0.95], "knowing_ci": [[0.4, 0.6]] * 4,
    "doing_acc": [0.3, 0.5, 0.9, 0.99], "doing_ci": [[0.2, 0.4]] * 4,
    "knowing_acc_disagree": [0.3, None, 0.2, 0.1], "doing_acc_disagree": [0.2, 0.4, 0.7, 0.9],
    "chance": 0.3, "divergence_layer": 2,
}  # fmt: skip
MEDIATION = {"layers": [0, 1, 2], "layer_profile": [0.1, 0.5, 0.3],
             "layer_profile_ci": [[0, 0.2], [0.4, 0.6], [0.2, 0.4]],
             "mediated_fraction": 0.9, "mediated_fraction_ci": [0.85, 0.95]}  # fmt: skip
CURVES = {
    "ucb": {"coverage_curve": [0.2, 0.4, 1.0], "regret_curve": [0.1, 0.3, 0.4]},
    "random": {"coverage_curve": [0.2, 0.4, 0.6], "regret_curve": [0.3, 0.6, 0.9]},
}
FB = {"m": {"repetitions": [0, 50, 100], "F_f_curve": [0.1, 0.2, 0.3], "F_g_curve": [0.5] * 3,
            "F_o_curve": [0.4, 0.3, 0.2], "entropy": [1.0, 0.8, 0.5]}}  # fmt: skip

CASES = {
    "kd": lambda stem: F.kd_matrix(KD, stem),
    "probes": lambda stem: F.probe_layers(PROBES, stem),
    "heat": lambda stem: F.patching_heatmap(
        np.linspace(0, 1, 12).reshape(3, 4), list("abcd"), stem
    ),  # noqa: E501
    "mediation": lambda stem: F.mediation_profile(MEDIATION, stem),
    "behavior": lambda stem: F.behavior_curves(CURVES, stem),
    "freqbias": lambda stem: F.frequency_bias(FB, stem),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_figures_are_byte_reproducible_and_warning_free(tmp_path, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = CASES[name](tmp_path / "a" / name)
        b = CASES[name](tmp_path / "b" / name)
    assert [p.suffix for p in a] == [".png", ".pdf"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.stat().st_size > 1000
    assert not list((tmp_path / "a").glob(".*tmp"))  # atomic: no temp files left


def test_every_axis_is_labelled(tmp_path, monkeypatch):
    seen = []
    real_save = F.save

    def spy(fig, stem):
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            seen.append((stem.name, ax.get_xlabel(), ax.get_ylabel()))
        return real_save(fig, stem)

    monkeypatch.setattr(F, "save", spy)
    for name, fn in CASES.items():
        fn(tmp_path / name)
    assert len(seen) >= len(CASES)
    for stem, xl, yl in seen:
        assert xl and yl, f"{stem} has an unlabelled axis"
    plt.close("all")


def test_heatmap_checks_token_count(tmp_path):
    with pytest.raises(ValueError, match="tokens"):
        F.patching_heatmap(np.zeros((2, 3)), ["a"], tmp_path / "x")


@pytest.mark.parametrize(
    "share, ci, n, expected",
    [(0.95, (0.9, 1.0), 64, "rationale-mediated"), (0.02, (0.0, 0.1), 64, "bypass"),
     (0.5, (0.4, 0.6), 64, "mixed"), (0.12, (0.05, 0.2), 64, "undetermined"),
     (0.85, (0.8, 0.9), 64, "undetermined"), (0.95, (0.9, 1.0), 8, "undetermined"),
     (None, None, 0, "undetermined"), (0.85, (0.85, 0.95), 64, "rationale-mediated"),
     (0.1, (0.02, 0.1), 64, "bypass")],
)  # fmt: skip
def test_verdict_rule(share, ci, n, expected):
    """The interval decides: a region only when it lies wholly inside it (boundaries belong
    to the outer regions, as the rule says); otherwise undetermined with a reason."""
    word, reason = verdict(share, ci, n)
    assert word == expected
    assert (reason is None) == (expected != "undetermined")


def test_verdict_reason_names_the_boundary_and_the_step_count():
    assert "boundary 0.1;" in verdict(0.12, (0.05, 0.2), 64)[1]
    assert "boundary 0.85;" in verdict(0.85, (0.8, 0.9), 64)[1]
    assert "8 analysed steps" in verdict(0.9, (0.9, 1.0), 8)[1]
