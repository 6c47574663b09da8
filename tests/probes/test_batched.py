"""The batched torch trainer agrees with scikit-learn on every cell of a sweep."""

from __future__ import annotations

import numpy as np
import pytest

from kdgap.probes import LogisticProbe, fit_logistic_batched, sweep


def test_batched_matches_sklearn_on_every_cell(bypass_store):
    kw = dict(probes=("logistic",), Cs=(1e-3, 1e-2, 1e-1, 1.0), cv=3, n_boot=50)
    fast = sweep(bypass_store, trainer="batched", **kw)
    ref = sweep(bypass_store, trainer="sklearn", **kw)
    assert len(fast) == len(ref) == 4 * 5  # hooks x labels
    for col in ("accuracy", "control_accuracy"):
        diff = (fast[col] - ref[col]).abs()
        assert diff.max() <= 0.01 + 1e-9, fast.assign(ref=ref[col], diff=diff)[
            ["hook", "label", "diff"]
        ]
    assert (fast["n_train"] == ref["n_train"]).all() and (fast["n_test"] == ref["n_test"]).all()


def test_batched_solution_matches_sklearn_coefficients():
    rng = np.random.default_rng(0)
    n, d = 600, 10
    groups = np.repeat(np.arange(30), 20)
    X = rng.normal(size=(2, n, d))
    y = np.stack([np.argmax(X[0, :, :4] + rng.normal(size=(n, 4)), 1),  # 4 classes
                  (X[1, :, 0] + rng.normal(size=n) > 0).astype(int)])  # binary  # fmt: skip
    y[0, :25] = -1  # missing labels leave rows out of that task only
    fit = fit_logistic_batched(X, y, groups, Cs=(0.01, 0.1), cv=3)
    for layer, task in ((0, 0), (1, 1)):
        ok = y[task] >= 0
        ref = LogisticProbe(Cs=(0.01, 0.1), cv=3).fit(X[layer][ok], y[task][ok], groups[ok])
        assert fit.C[layer, task] == ref.C_
        np.testing.assert_allclose(fit.cv_scores[layer, task], ref.cv_scores_, atol=0.01)
        K = len(ref.classes_)
        coef = fit.coef[layer, task, :K].numpy()
        assert np.abs(coef - ref.coef_).max() < 0.02 * np.abs(ref.coef_).max()
        dirs = fit.directions()[layer, task, :K].numpy()
        np.testing.assert_allclose(dirs, ref.directions_, atol=0.02 * np.abs(dirs).max())
    assert fit.predict(X).shape == (2, 2, n)


def test_batched_errors():
    X = np.zeros((2, 10, 3))
    with pytest.raises(ValueError, match="X must be"):
        fit_logistic_batched(X[0], np.zeros(10), np.arange(10))
    with pytest.raises(ValueError, match="align"):
        fit_logistic_batched(X, np.zeros((1, 9)), np.arange(10))
    with pytest.raises(ValueError, match=">= 2"):
        fit_logistic_batched(X, np.zeros((1, 10)), np.arange(10))
